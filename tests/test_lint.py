"""Lint: ruff's linter and formatter are clean on the library, the notebooks, the tests, the benchmarks and the tools;
the pre-commit config is valid, has nbdev's clean hook and ruff's lint and format hooks over those folders, and its
hooks pass on this tree."""

import os, re, shutil, subprocess, sys
from pathlib import Path

import pytest, yaml
from devtools import dev_tool, shellcheck
from identify.identify import tags_from_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / ".pre-commit-config.yaml"
LINTED = ["vit_nbdev", "nbs", "tests", "bench", "tools"]
# nbdev-export writes vit_nbdev/*.py in its own layout (one blank line before each `# %%` cell marker, `__all__`
# wrapped its way): the formatter checks their source, the notebooks, and leaves the generated modules alone
FORMATTED, GENERATED = [p for p in LINTED if p != "vit_nbdev"], "vit_nbdev/data.py"
NBDEV, RUFF = "https://github.com/AnswerDotAI/nbdev", "https://github.com/astral-sh/ruff-pre-commit"
# The upstream hook definitions (.pre-commit-hooks.yaml of the two repos at the pinned revs), as `language: system`
# hooks that run the tools of this environment: pre-commit then needs no network (it would clone the repos otherwise).
RUFF_FILES = dict(types_or=["python", "pyi", "jupyter"], require_serial=True)
UPSTREAM = {
    "nbdev-clean": dict(entry="nbdev-clean", always_run=True, pass_filenames=False),
    "ruff-check": dict(entry="ruff check --force-exclude", **RUFF_FILES),
    "ruff-format": dict(entry="ruff format --force-exclude", **RUFF_FILES),
}


def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def hooks(cfg: dict) -> dict:
    "`{hook id: (repo, rev, hook)}`."
    return {h["id"]: (r["repo"], r.get("rev"), h) for r in cfg["repos"] for h in r["hooks"]}


def pinned(package: str) -> str:
    "The version of `package` in constraints.txt."
    [v] = re.findall(rf"(?im)^{re.escape(package)}==(\S+)", (ROOT / "constraints.txt").read_text())
    return v


def selects(hook: dict, path: str) -> bool:
    "Whether pre-commit would give `path` to `hook` (its `files` / `exclude` regexes and `types` / `types_or` filters)."
    tags = tags_from_path(str(ROOT / path))
    return (
        bool(re.search(hook.get("files", ""), path))
        and not (hook.get("exclude") and re.search(hook["exclude"], path))
        and set(hook.get("types", ["file"])) <= tags
        and bool(set(hook.get("types_or", ["file"])) & tags)
    )


def test_ruff_is_clean():
    r = subprocess.run([dev_tool("ruff"), "check", "--no-cache", *LINTED], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generated_modules_keep_the_line_budget():
    "The package's lines fit in 120 characters, but for the `__all__` that nbdev-export wraps at 120 and then prefixes."
    long = []
    for py in sorted((ROOT / "vit_nbdev").glob("*.py")):
        if py.name == "_modidx.py":
            continue
        lines = py.read_text().splitlines()
        long += [f"{py.name}:{i}" for i, l in enumerate(lines, 1) if len(l) > 120 and not l.startswith("__all__ = [")]
    assert long == [], long


def test_ruff_format_is_clean():
    "The code is laid out as `ruff format` would ([tool.ruff.format]): the formatter has nothing to change."
    r = subprocess.run(
        [dev_tool("ruff"), "format", "--check", "--no-cache", *FORMATTED], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_sees_the_notebooks():
    "The notebooks are linted (`extend-include`), not silently skipped: a lint error in one is reported."
    r = subprocess.run(
        [dev_tool("ruff"), "check", "--no-cache", "--show-files", "nbs"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert {"data.ipynb", "train.ipynb"} <= {Path(l).name for l in r.stdout.split()}


def test_precommit_config_is_valid_and_has_the_hooks():
    r = subprocess.run([dev_tool("pre-commit"), "validate-config", str(CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    hs = hooks(config())
    assert "nbdev-clean" in hs and hs["nbdev-clean"][:2] == (NBDEV, pinned("nbdev")), hs.get("nbdev-clean")
    ruff = [h for i, (repo, rev, h) in hs.items() if repo == RUFF and i in ("ruff-check", "ruff")]
    assert len(ruff) == 1 and hs[ruff[0]["id"]][1] == f"v{pinned('ruff')}", ruff
    assert "ruff-format" in hs and hs["ruff-format"][:2] == (RUFF, f"v{pinned('ruff')}"), hs.get("ruff-format")
    check, fmt = ({**UPSTREAM.get(h["id"], UPSTREAM["ruff-check"]), **h} for h in (ruff[0], hs["ruff-format"][2]))
    for p in ["nbs/data.ipynb", "nbs/train.ipynb", "tests/test_lint.py", "bench/bench_serve.py", "tools/module_map.py"]:
        assert selects(check, p) and selects(fmt, p), f"a ruff hook skips {p}"
    assert selects(check, GENERATED) and selects(check, "vit_nbdev/serve.py"), "the lint hook skips the library"
    assert not selects(fmt, GENERATED), "the format hook would rewrite a module nbdev-export writes"
    assert not selects(check, "pyproject.toml") and not selects(fmt, "pyproject.toml")


def test_precommit_hooks_pass_offline(tmp_path):
    "`pre-commit run --all-files` on a copy of this tree (tracked and new files), with the hooks as local ones."
    if not shutil.which("git"):
        pytest.skip("no git")
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    repo = tmp_path / "repo"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    local = {
        "repos": [
            {
                "repo": "local",
                "hooks": [
                    {
                        **UPSTREAM[h["id"]],
                        "name": h["id"],
                        "language": "system",
                        **{k: v for k, v in h.items() if k not in ("id", "rev")},
                        "id": h["id"],
                    }
                    for _, _, h in hooks(config()).values()
                ],
            }
        ]
    }
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, capture_output=True, check=True)
    git("init", "-q")
    git("add", "-A")
    r = subprocess.run(
        [dev_tool("pre-commit"), "run", "--all-files", "--show-diff-on-failure", "-c", str(tmp_path / "local.yaml")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for hook in ("nbdev-clean", "ruff-check", "ruff-format"):
        assert re.search(rf"{hook}\.+Passed", r.stdout), r.stdout


SCRIPTS = sorted([*ROOT.glob("docker/*.sh"), *ROOT.glob("tools/*.sh"), ROOT / ".ci/run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_clean(script):
    shellcheck(script, cwd=ROOT)
