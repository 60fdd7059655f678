"""Project hygiene: README in step with nbs/index.ipynb, the docs site lists every chapter in reading order,
docstrings on the public API, the configs parse, the README's test command installs what the tests need first."""

import importlib, inspect, json, subprocess
from pathlib import Path
import yaml
from vit_nbdev.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_in_step_with_index():
    readme = ROOT.joinpath("README.md").read_text()
    nb = json.loads(ROOT.joinpath("nbs/index.ipynb").read_text())
    for c in nb["cells"]:
        src = (
            "".join(c["source"]).strip().replace("```{mermaid}", "```mermaid").replace("](images/", "](nbs/images/")
        )  # Quarto's diagram block is GitHub's; images live in nbs/
        if c["cell_type"] == "markdown" and not src.startswith("# vit-nbdev"):
            assert src in readme, f"README.md lacks this part of nbs/index.ipynb (regenerate it):\n{src[:300]}"


def test_docs_site_has_every_chapter_in_reading_order():
    chapters = yaml.safe_load((ROOT / "nbs/sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    assert chapters == [
        "index.ipynb",
        "config.ipynb",
        "data.ipynb",
        "model.ipynb",
        "store.ipynb",
        "train.ipynb",
        "sweep.ipynb",
        "registry.ipynb",
        "evidence.ipynb",
        "telemetry.ipynb",
        "batch.ipynb",
        "engine.ipynb",
        "errors.ipynb",
        "service.ipynb",
        "serve.ipynb",
        "monitor.ipynb",
        "robustness.ipynb",
        "retrain.ipynb",
        "canary.ipynb",
        "cli.ipynb",
        "cloud.ipynb",
        "design.ipynb",
    ]
    assert set(chapters) == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}, (
        "a notebook is missing from nbs/sidebar.yml"
    )
    quarto = yaml.safe_load((ROOT / "nbs/_quarto.yml").read_text())
    assert "sidebar.yml" in quarto["metadata-files"]
    index = (ROOT / "nbs/index.ipynb").read_text()
    assert "{mermaid}" in index and all(
        w in index for w in ("Cloud Storage", "Cloud Run", "Weights and Biases", "GPU VM")
    )


def _own_doc(obj):
    "The docstring written on `obj` itself (not inherited, not the signature a dataclass makes up)."
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return None if not doc or doc.startswith(f"{obj.__name__}(") else doc


def test_every_public_exported_name_has_a_docstring():
    missing, checked = [], 0
    for mod in [p.stem for p in (ROOT / "vit_nbdev").glob("*.py") if not p.stem.startswith("_")]:
        m = importlib.import_module(f"vit_nbdev.{mod}")
        for name in getattr(m, "__all__", []):
            obj = getattr(m, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == m.__name__:
                checked += 1
                if not _own_doc(obj):
                    missing.append(f"{mod}.{name}")
    assert checked > 50 and not missing, f"no docstring: {missing}"


def test_docstring_check_sees_a_missing_one():
    from dataclasses import dataclass

    @dataclass
    class Bare:
        x: int = 0

    class Child(Bare):
        pass

    assert (
        _own_doc(Bare) is None and _own_doc(Child) is None and _own_doc(test_docstring_check_sees_a_missing_one) is None
    )


def test_configs_are_valid_training_parameters():
    "Every config is training parameters, but the canary policy (the policy's defaults) and the sweeps (checked whole)."
    from vit_nbdev.canary import Policy, load_policy
    from vit_nbdev.sweep import load_spec

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    policies = [f for f in configs if f.name.endswith("-policy.yaml")]
    sweeps = [f for f in configs if f.name.startswith("sweep-")]
    assert [f.name for f in policies] == ["canary-policy.yaml"] and [f.name for f in sweeps] == ["sweep-sample.yaml"]
    for f in configs:
        if f not in policies + sweeps:
            TrainConfig.from_dict(yaml.safe_load(f.read_text()))
    assert load_policy(policies[0]) == Policy()
    assert load_spec(sweeps[0]).trials == 12


def test_the_test_command_sets_up_the_system_first():
    "The README's test command works on a fresh machine: `tools/setup-system.sh` installs Chromium (and git) first."
    from devtools import shellcheck

    readme, script = (ROOT / "README.md").read_text(), ROOT / "tools" / "setup-system.sh"
    command = readme.split("# run all tests\n", 1)[1].splitlines()[0]
    assert command.startswith("bash tools/setup-system.sh && pytest "), command
    assert "grep -A1 '^# run all tests' README.md" in (ROOT / ".ci" / "run").read_text()  # CI runs that same line
    assert 'CHROMIUM = Path("/usr/bin/chromium")' in (ROOT / "tests" / "devtools.py").read_text()
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_project.py"]
    browser_tests = [p.name for p in tests if "launch_chromium(" in p.read_text()]
    assert len(browser_tests) >= 3 and "apt-get install" in script.read_text(), browser_tests
    shellcheck(script, cwd=ROOT)
    assert Path("/usr/bin/chromium").exists(), "run tools/setup-system.sh (the README's test command does)"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)  # all there: no apt-get
    assert r.returncode == 0 and "installing" not in r.stdout and "Chromium" in r.stdout, r.stdout + r.stderr
