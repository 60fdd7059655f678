"""The module map as the code has it: one-way imports, light command lines, the package usable from a wheel."""

import json, os, shutil, subprocess, sys, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAVY = ("torch", "transformers", "fastapi", "pandas", "numpy", "evidently", "accelerate")
sys.path.insert(0, str(ROOT / "tools"))
import module_map  # noqa: E402


def loaded_after(code: str) -> list[str]:
    "The heavy packages and vit_nbdev's modules in `sys.modules` after running `code` in a fresh interpreter."
    probe = (
        code
        + "\nimport sys, json\nprint(json.dumps(sorted({m for m in sys.modules if m.split('.')[0] in "
        + repr(HEAVY)
        + "} | {m for m in sys.modules if m.startswith('vit_nbdev.')})))"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_monitor_loads_neither_fastapi_nor_serve():
    mods = loaded_after("import vit_nbdev.monitor")
    assert "fastapi" not in mods and "vit_nbdev.serve" not in mods and "vit_nbdev.monitor" in mods, mods


def test_config_is_a_leaf_that_loads_nothing_heavy():
    assert loaded_after("import vit_nbdev.config") == ["vit_nbdev.config"]


@pytest.mark.parametrize("main", ["train_main", "serve_main", "monitor_main", "models_main", "data_main"])
def test_help_loads_nothing_heavy(main):
    code = (
        f"import contextlib, io\nfrom vit_nbdev.cli import {main}\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): {main}(['--help'])"
    )
    assert loaded_after(code) == ["vit_nbdev.cli", "vit_nbdev.config"]


@pytest.mark.parametrize("cmd", ["vit-train", "vit-serve", "vit-monitor", "vit-models", "vit-cloud", "vit-data"])
def test_installed_scripts_answer_help(cmd):
    p = subprocess.run([BIN / cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


def test_bad_training_value_fails_before_torch_is_loaded():
    code = (
        # importing torch would now fail
        "import sys; sys.modules['torch'] = None\nfrom vit_nbdev.cli import train_main\n"
        "try: train_main(['-p', 'mixed_precision', 'fp8'])\nexcept SystemExit as e: print('exit', e.code)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "exit 2" in p.stdout and "mixed_precision must be" in p.stderr, (p.stdout, p.stderr)


def test_bad_service_setting_names_its_variable_before_torch_is_loaded():
    "A bad `VIT_*` value stops `vit-serve` with exit status 2 and one line naming the variable, not pydantic's report."
    code = (
        "import sys; sys.modules['torch'] = None\nfrom vit_nbdev.cli import serve_main\n"
        "try: serve_main([])\nexcept SystemExit as e: print('exit', e.code)"
    )
    env = {**os.environ, "VIT_MAX_BATCH": "eight"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "exit 2" in p.stdout and p.stderr.strip().splitlines()[-1] == (
        "vit-serve: error: VIT_MAX_BATCH='eight': invalid literal for int() with base 10: 'eight'"
    ), (p.stdout, p.stderr)


def test_cloud_train_dry_run_never_imports_torch(tmp_path):
    code = (
        "import sys\nfor m in ('torch', 'transformers', 'fastapi', 'accelerate'): sys.modules[m] = None\n"
        "from vit_nbdev.cloud import main\nsys.exit(main(sys.argv[1:]))"
    )
    args = [
        "train",
        "--project",
        "p-1234",
        "--store",
        "gs://bucket/vit",
        "-f",
        str(ROOT / "configs/cifar10-scratch.yaml"),
        "-p",
        "epochs",
        "3",
        "--run-id",
        "20261126-120000-abc123",
        "--dry-run",
    ]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "gcloud compute instances create" in p.stdout, p.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-c", code, *args[:-1], "-p", "lr", "-1", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "lr must be > 0" in bad.stderr, bad.stderr[-2000:]


def test_models_list_never_imports_torch(tmp_path):
    "`vit-models list` and `show` read the registry only: PyTorch is loaded by the gate, not before."
    code = (
        "import sys\nfor m in ('torch', 'transformers', 'fastapi', 'accelerate'): sys.modules[m] = None\n"
        "from vit_nbdev.cli import models_main\nsys.exit(models_main(sys.argv[1:]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "list", "--store", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "no versions yet" in p.stdout, p.stderr[-2000:]


def test_documented_module_map_matches_the_imports():
    assert module_map.check() == []


def test_module_map_check_sees_a_change(tmp_path):
    "The check is not vacuous: a package with one more import is reported."
    pkg = tmp_path / "vit_nbdev"
    pkg.mkdir()
    for f in (ROOT / "vit_nbdev").glob("*.py"):
        (pkg / f.name).write_text(f.read_text())
    (pkg / "config.py").write_text((pkg / "config.py").read_text() + "\nfrom .serve import create_app\n")
    assert module_map.check(pkg) and ("config", "serve") in module_map.edges(pkg)[0]
    (pkg / "cli.py").write_text((pkg / "cli.py").read_text() + "\nfrom .config import _env_bool\n")
    assert module_map.private_imports(pkg) == ["cli: _env_bool from config"]


def test_no_module_imports_private_names_of_another():
    assert module_map.private_imports(ROOT / "vit_nbdev") == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out, src = (
        tmp_path_factory.mktemp("wheel"),
        tmp_path_factory.mktemp("src") / "vit-nbdev",
    )  # setuptools writes build/ beside the source
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", ".ci", "build", "*.egg-info", "__pycache__", "_proc"),
    )
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return next(out.glob("vit_nbdev-*.whl"))


def test_wheel_ships_the_notebook_templates_and_sample(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for f in (
        "vit_nbdev/train.ipynb",
        "vit_nbdev/templates/upload.html",
        "vit_nbdev/templates/base.html",
        "vit_nbdev/sample/train-00000-of-00001.parquet",
    ):
        assert f in names, f
    nb = json.loads(zipfile.ZipFile(wheel).read("vit_nbdev/train.ipynb"))
    assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"]), "the real notebook, not a link"


def test_vit_train_runs_from_the_wheel(wheel, tmp_path):
    "Installed from the wheel (no checkout beside it), `vit-train` finds its notebook and ends with the results table."
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "VIT_CACHE": str(tmp_path / "cache")}
    code = (
        "import vit_nbdev, sys; assert vit_nbdev.__file__.startswith(sys.argv[1]), vit_nbdev.__file__\n"
        "from vit_nbdev.cli import train_main; train_main(sys.argv[2:])"
    )
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(site),
            "-p",
            "max_steps",
            "3",
            "-p",
            "batch_size",
            "64",
            "-p",
            "eval_every",
            "3",
            "-p",
            "tracker",
            "none",
            "-p",
            "store",
            str(tmp_path / "store"),
            "-p",
            "checkpoint_dir",
            str(tmp_path / "ck"),
            "-p",
            "run_id",
            "from-wheel",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    table = dict(
        l.split(None, 1) for l in p.stdout.splitlines() if l.split(None, 1)[0] in ("run", "version", "steps", "record")
    )
    assert (
        table["run"] == "from-wheel" and table["steps"].startswith("3 ") and "runs/from-wheel.ipynb" in table["record"]
    ), p.stdout
    assert "test acc" in p.stdout and (work / "runs" / "from-wheel.ipynb").exists()
