"""Project hygiene: README in step with nbs/index.ipynb, docstrings on the public API, the configs parse."""
import importlib, inspect, json
from pathlib import Path
import yaml
from vit_nbdev.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

def test_readme_is_in_step_with_index():
    readme = ROOT.joinpath("README.md").read_text()
    nb = json.loads(ROOT.joinpath("nbs/index.ipynb").read_text())
    for c in nb["cells"]:
        src = "".join(c["source"]).strip()
        if c["cell_type"] == "markdown" and not src.startswith("# vit-nbdev"):
            assert src in readme, f"README.md lacks this part of nbs/index.ipynb (regenerate it):\n{src[:300]}"

def test_every_public_exported_name_has_a_docstring():
    missing = []
    for mod in [p.stem for p in (ROOT/"vit_nbdev").glob("*.py") if not p.stem.startswith("_")]:
        m = importlib.import_module(f"vit_nbdev.{mod}")
        for name in getattr(m, "__all__", []):
            obj = getattr(m, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj): missing.append(f"{mod}.{name}")
    assert not missing, f"no docstring: {missing}"

def test_configs_are_valid_training_parameters():
    for f in (ROOT/"configs").glob("*.yaml"):
        TrainConfig.from_dict(yaml.safe_load(f.read_text()))
