"""The GitHub workflows: valid against GitHub's workflow schema, their shell steps pass shellcheck,
and they do what the project relies on (tests via .ci/run, docs to Pages, images, a keyless deploy)."""

import re, shlex, subprocess, sys
from pathlib import Path

import pytest, yaml
from devtools import dev_tool, shellcheck

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / ".github" / "workflows"
FILES = sorted(WF.glob("*.yaml"))
CHECK = dev_tool("check-jsonschema")


def load(name):
    return yaml.load((WF / name).read_text(), Loader=yaml.BaseLoader)  # BaseLoader: `on` stays a string key


def schema_check(*paths):
    return subprocess.run(
        [CHECK, "--builtin-schema", "vendor.github-workflows", *map(str, paths)], capture_output=True, text=True
    )


def test_the_workflows_are_there():
    assert {p.name for p in FILES} == {"test.yaml", "deploy.yaml", "docker.yaml"}


def test_valid_against_githubs_schema():
    r = schema_check(*FILES)
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    bad = (WF / "test.yaml").read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest")
    (tmp_path / "bad.yaml").write_text(bad)
    assert schema_check(tmp_path / "bad.yaml").returncode != 0


def run_steps():
    for p in FILES:
        for job, j in load(p.name)["jobs"].items():
            for i, s in enumerate(j.get("steps", [])):
                if "run" in s:
                    yield f"{p.name}:{job}:{i}", s["run"]


@pytest.mark.parametrize("where,script", list(run_steps()), ids=lambda x: x if ":" in str(x) else "")
def test_run_steps_pass_shellcheck(where, script):
    # GitHub substitutes ${{ ... }} before the shell sees the script; stand in a plain word for it
    shellcheck(text="#!/usr/bin/env bash\nset -e\n" + re.sub(r"\$\{\{[^}]*\}\}", "GHA_EXPR", script))


def test_tests_run_ci_on_every_push_and_pr():
    w, d = load("test.yaml"), load("docker.yaml")
    assert {"push", "pull_request", "workflow_call"} <= set(w["on"])
    assert w["on"]["push"] == {"branches-ignore": ["main"]}  # main and v* tags: through docker.yaml ...
    assert (
        d["on"]["push"] == {"branches": ["main"], "tags": ["v*"]}
        and d["jobs"]["test"]["uses"] == "./.github/workflows/test.yaml"
    )
    assert (
        "github.workflow" in w["concurrency"]["group"] and "concurrency" not in d
    )  # ... in a concurrency group of its own
    steps = w["jobs"]["test"]["steps"]
    assert any(s.get("run", "").strip() == ".ci/run" for s in steps)
    assert "TORCH_INDEX_URL" in w["jobs"]["test"]["env"] and "TORCH_INDEX_URL" in (ROOT / ".ci/run").read_text()


def test_docs_render_with_nbdev_and_publish_to_pages():
    w = load("deploy.yaml")
    steps = w["jobs"]["build"]["steps"]
    assert any(s.get("uses", "").startswith("quarto-dev/quarto-actions/setup") for s in steps)
    assert any(s.get("run", "").strip() == "nbdev-docs" for s in steps)
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in w["jobs"]["publish"]["steps"])


def test_images_are_built_with_cache_and_deployed_without_keys():
    w = load("docker.yaml")
    assert set(w["on"]["push"]["branches"]) == {"main"} and w["on"]["push"]["tags"] == ["v*"]
    img = w["jobs"]["image"]
    build = next(s for s in img["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    images = img["strategy"]["matrix"]["image"]
    for m in images:
        assert (ROOT / build["with"]["file"].replace("${{ matrix.image }}", m)).exists(), m
    assert (
        set(images) == {"train", "serve"}
        and "type=gha" in build["with"]["cache-from"]
        and "type=gha" in build["with"]["cache-to"]
    )
    deploy = w["jobs"]["cloud-run"]
    assert img["needs"] == "test" and deploy["needs"] == "image"  # tests, then images, then the deploy
    names = [s.get("uses", s.get("name", "")) for s in img["steps"]]
    smoke = next(s for s in img["steps"] if "docker/smoke-test.sh" in s.get("run", ""))
    assert (
        names.index(smoke["name"]) > names.index(build["uses"])
        and "serve" in smoke["if"]
        and "vit-serve:" in smoke["env"]["IMAGE"]
    )
    assert any("vit-cloud deploy" in s.get("run", "") and "--image" in s.get("run", "") for s in deploy["steps"])
    assert w["permissions"]["id-token"] == "write"
    for job in (img, deploy):
        auth = next(s for s in job["steps"] if s.get("uses", "").startswith("google-github-actions/auth"))
        assert "workload_identity_provider" in auth["with"] and "credentials_json" not in auth["with"]
    text = "\n".join(p.read_text() for p in FILES)
    assert "credentials_json" not in text and "secrets.GCP" not in text


def _installed_by(step: str) -> set[str]:
    "The distributions a `run:` step installs with pip, besides the package itself."
    out = set()
    for line in step.splitlines():
        toks = shlex.split(line)
        if toks[:2] != ["pip", "install"]:
            continue
        it = iter(toks[2:])
        for t in it:
            if t in ("-c", "-e", "-r", "--constraint", "--index-url"):
                next(it, None)
            elif not t.startswith("-"):
                out.add(t.lower())
    return out


def _deploy_with_only(modules: set[str]) -> subprocess.CompletedProcess:
    "`vit-cloud deploy --dry-run` in a Python that imports the standard library, vit_nbdev and `modules`, nothing else."
    code = (
        f"import sys, importlib.abc\nallowed = {sorted(modules)!r}\n"
        "class Only(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top in sys.stdlib_module_names or top in allowed or top == 'vit_nbdev': return None\n"
        "        raise ModuleNotFoundError(f'No module named {name!r} (not installed by the deploy job)')\n"
        "sys.meta_path.insert(0, Only())\nfrom vit_nbdev.cloud import main\nmain(sys.argv[1:])"
    )
    args = [
        "deploy",
        "--project",
        "p-1234",
        "--store",
        "gs://bucket/vit",
        "--image",
        "us-central1-docker.pkg.dev/p-1234/vit/vit-serve:abc",
        "--dry-run",
    ]
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_deploy_job_installs_what_vit_cloud_deploy_imports():
    "The cloud-run job installs the package without its dependencies: what `vit-cloud deploy` imports, it names."
    step = next(
        s["run"] for s in load("docker.yaml")["jobs"]["cloud-run"]["steps"] if "pip install" in s.get("run", "")
    )
    modules = {{"pyyaml": "yaml"}.get(d, d.replace("-", "_")) for d in _installed_by(step)}
    ok = _deploy_with_only(modules)
    assert ok.returncode == 0 and "gcloud run services replace" in ok.stdout, ok.stderr[-2000:]
    bare = _deploy_with_only(set())  # the check is not vacuous: without them it fails
    assert bare.returncode != 0 and "No module named 'yaml'" in bare.stderr, bare.stderr[-2000:]
