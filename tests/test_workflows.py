"""The GitHub workflows: valid against GitHub's workflow schema, their shell steps pass shellcheck,
and they do what the project relies on (tests via .ci/run, docs to Pages, images, a keyless deploy)."""
import re, subprocess
from pathlib import Path

import pytest, yaml
from devtools import dev_tool, shellcheck

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT/".github"/"workflows"
FILES = sorted(WF.glob("*.yaml"))
CHECK = dev_tool("check-jsonschema")

def load(name): return yaml.load((WF/name).read_text(), Loader=yaml.BaseLoader)   # BaseLoader: `on` stays a string key

def schema_check(*paths):
    return subprocess.run([CHECK, "--builtin-schema", "vendor.github-workflows", *map(str, paths)], capture_output=True, text=True)

def test_the_workflows_are_there():
    assert {p.name for p in FILES} == {"test.yaml", "deploy.yaml", "docker.yaml"}

def test_valid_against_githubs_schema():
    r = schema_check(*FILES); assert r.returncode == 0, r.stdout + r.stderr

def test_schema_check_catches_a_broken_workflow(tmp_path):
    bad = (WF/"test.yaml").read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest")
    (tmp_path/"bad.yaml").write_text(bad)
    assert schema_check(tmp_path/"bad.yaml").returncode != 0

def run_steps():
    for p in FILES:
        for job, j in load(p.name)["jobs"].items():
            for i, s in enumerate(j.get("steps", [])):
                if "run" in s: yield f"{p.name}:{job}:{i}", s["run"]

@pytest.mark.parametrize("where,script", list(run_steps()), ids=lambda x: x if ":" in str(x) else "")
def test_run_steps_pass_shellcheck(where, script):
    # GitHub substitutes ${{ ... }} before the shell sees the script; stand in a plain word for it
    shellcheck(text="#!/usr/bin/env bash\nset -e\n" + re.sub(r"\$\{\{[^}]*\}\}", "GHA_EXPR", script))

def test_tests_run_ci_on_every_push_and_pr():
    w = load("test.yaml")
    assert {"push", "pull_request"} <= set(w["on"])
    steps = w["jobs"]["test"]["steps"]
    assert any(s.get("run", "").strip() == ".ci/run" for s in steps)
    assert "TORCH_INDEX_URL" in w["jobs"]["test"]["env"] and "TORCH_INDEX_URL" in (ROOT/".ci/run").read_text()

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
    for m in images: assert (ROOT/build["with"]["file"].replace("${{ matrix.image }}", m)).exists(), m
    assert set(images) == {"train", "serve"} and "type=gha" in build["with"]["cache-from"] and "type=gha" in build["with"]["cache-to"]
    deploy = w["jobs"]["cloud-run"]
    assert deploy["needs"] == "image"
    assert any("vit-cloud deploy" in s.get("run", "") and "--image" in s.get("run", "") for s in deploy["steps"])
    assert w["permissions"]["id-token"] == "write"
    for job in (img, deploy):
        auth = next(s for s in job["steps"] if s.get("uses", "").startswith("google-github-actions/auth"))
        assert "workload_identity_provider" in auth["with"] and "credentials_json" not in auth["with"]
    text = "\n".join(p.read_text() for p in FILES)
    assert "credentials_json" not in text and "secrets.GCP" not in text
