"""Training end to end: papermill run of the notebook, determinism, resume after SIGKILL, 2-process DDP, errors, the
data snapshot a card names; the recipe's options (augmentation on the device, mixup / CutMix, EMA), its GPU script."""

import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, nbformat, torch
from vit_nbdev.train import EMA, TrainConfig, erase_batch, mix_batch, train, train_inputs, trivial_augment_batch
from vit_nbdev.data import PreprocessConfig, preprocess
from vit_nbdev.model import load_package
from vit_nbdev.store import open_store
from vit_nbdev.data import CIFAR10_LABELS, has_snapshot, load_cifar10, write_snapshot

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = dict(  # a few steps are enough to show what a test asks of a run; most of their time is training
    model="vit-cifar-tiny",
    max_steps=6,
    batch_size=64,
    eval_every=3,
    checkpoint_every=0,
    log_every=3,
    tracker="none",
    eval_batch_size=500,
)


def env(**kw):
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **kw}


def quick(tmp_path, **kw):
    return TrainConfig(**{**QUICK, "store": str(tmp_path / "store"), "checkpoint_dir": str(tmp_path / "ck"), **kw})


def test_papermill_run_is_the_record(tmp_path):
    """`vit-train` runs the notebook headless with a YAML file and -p overrides; the record lands in the store. The run
    is the README's first command (the shipped checkpoint fine-tuned one epoch on the sample), and its model reaches
    0.70 on the test split."""
    store = tmp_path / "store"
    out = subprocess.run(
        [
            BIN / "vit-train",
            "-f",
            ROOT / "configs/sample.yaml",
            "-p",
            "eval_every",
            "10",
            "-p",
            "store",
            str(store),
            "-p",
            "checkpoint_dir",
            str(tmp_path / "ck"),
            "-p",
            "run_id",
            "pm-run",
            "--output",
            str(tmp_path / "out.ipynb"),
        ],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs), (
        "curves and confusion matrix inline"
    )
    st = open_store(str(store))
    assert {"runs/pm-run/train.ipynb", "runs/pm-run/metrics.json", "runs/pm-run/params.json"} <= set(
        st.list("runs/pm-run")
    )
    m = json.loads(st.get_bytes("runs/pm-run/metrics.json"))
    version = st.resolve("latest")
    assert m["version"] == version and m["metrics"]["steps"] == 4000 // 128
    # 1,000 images of CIFAR-10's test split, unseen in pretraining
    assert m["metrics"]["test_acc"] >= 0.70, m["metrics"]
    card = json.loads(st.get_bytes(f"models/{version}/card.json"))
    assert card["dataset"]["fingerprint"] and card["dataset"]["splits"] == {
        "train": 4000,
        "validation": 1000,
        "test": 1000,
    }
    assert (
        card["params"]["batch_size"] == 128
        and card["params"]["eval_every"] == 10
        and card["code_commit"]
        and card["metrics"]["test_acc"] == m["metrics"]["test_acc"]
    )
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B ran offline and left its files"


def test_same_params_same_metrics(tmp_path):
    a = train(quick(tmp_path, run_id="a"))
    b = train(quick(tmp_path, run_id="b"))
    assert a.metrics["test_loss"] == b.metrics["test_loss"] and a.metrics["val_acc"] == b.metrics["val_acc"]
    untimed = lambda r: [{k: v for k, v in h.items() if k != "train_s"} for h in r.history]  # seconds differ
    assert untimed(a) == untimed(b) and all("train_s" in h for h in a.history if "val_acc" in h)
    assert open_store(str(tmp_path / "store")).versions() == sorted([a.version, b.version])


def _wait_for(path: Path, proc, timeout=300):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t < timeout
        time.sleep(0.2)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = [
        "-p",
        "model",
        "vit-cifar-tiny",
        "-p",
        "max_steps",
        "24",
        "-p",
        "batch_size",
        "64",
        "-p",
        "checkpoint_every",
        "8",
        "-p",
        "eval_every",
        "8",
        "-p",
        "tracker",
        "none",
        "-p",
        "store",
        str(tmp_path / "store"),
        "-p",
        "checkpoint_dir",
        str(tmp_path / "ck"),
    ]
    run = lambda rid, *extra: subprocess.Popen(
        [BIN / "vit-train", "--direct", *common, "-p", "run_id", rid, *extra],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    p = run("killed")
    _wait_for(tmp_path / "ck/killed/step_16", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "ck/killed/package").exists(), "killed before the end"
    p = run("killed", "-p", "resume", "true")
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    p = run("whole")
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    whole = json.loads(out.strip().splitlines()[-1])
    for k in ("val_acc", "test_acc", "test_loss", "steps"):
        assert resumed[k] == whole[k], k


def test_two_process_ddp(tmp_path):
    args = [
        "-p",
        "model",
        "vit-cifar-tiny",
        "-p",
        "max_steps",
        "16",
        "-p",
        "batch_size",
        "64",
        "-p",
        "eval_every",
        "8",
        "-p",
        "checkpoint_every",
        "8",
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
        "ddp",
    ]
    p = subprocess.run(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "--no-python",
            BIN / "vit-train",
            "--direct",
            *args,
        ],
        cwd=tmp_path,
        env=env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1 and lines[0]["processes"] == 2  # only the main process prints the result
    assert sum(l.startswith("val acc") for l in p.stdout.splitlines()) == 1  # and its results table
    assert p.stdout.count("registered ") == 1  # logs and saves once
    st = open_store(str(tmp_path / "store"))
    assert len(st.versions()) == 1 and st.list("runs/ddp") == ["runs/ddp/metrics.json", "runs/ddp/params.json"]
    assert sorted(x.name for x in (tmp_path / "ck/ddp").iterdir()) == ["package", "step_8"]
    single = train(
        TrainConfig(
            **{
                **QUICK,
                "max_steps": 16,
                "eval_every": 8,
                "store": str(tmp_path / "store1"),
                "checkpoint_dir": str(tmp_path / "ck1"),
            }
        )
    )
    assert abs(single.metrics["test_acc"] - lines[0]["test_acc"]) < 0.05, (single.metrics, lines[0])


def test_errors_users_meet(tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        train(quick(tmp_path, batch_size=100, grad_accum=3))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(quick(tmp_path, run_id="nope", resume=True))
    with pytest.raises(ValueError, match="preset"):
        train(quick(tmp_path, model="vit-huge-typo"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RuntimeError, match="cannot write to the store"):
        train(quick(tmp_path, store=str(tmp_path / "afile" / "store")))
    with pytest.raises(ValueError, match="unknown training parameter"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="mixed_precision"):
        train(quick(tmp_path, mixed_precision="fp8"))


def test_card_names_the_snapshot_and_extra_train(tmp_path, monkeypatch):
    """A run writes the snapshot of its data when the store lacks it and its card names it; a run on `store:<fp>` with
    `extra_train` trains on more."""
    monkeypatch.setenv("VIT_CACHE", str(tmp_path / "cache"))  # snapshots are fetched into the cache: a throwaway one
    st = open_store(str(tmp_path / "store"))
    a = train(quick(tmp_path, run_id="snap", max_steps=4, eval_every=4))
    card = st.card(a.version)
    fp = card["dataset"]["fingerprint"]
    assert (
        card["dataset"]["snapshot"] == f"datasets/{fp}"
        and has_snapshot(st, fp)
        and "extra_train" not in card["dataset"]
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(40) % 10
    write_snapshot(
        st,
        "feedback-test",
        {"train": (x[:32], y[:32]), "test": (x[32:], y[32:])},
        {"kind": "feedback", "source": "a test", "label_names": CIFAR10_LABELS},
    )
    b = train(
        quick(
            tmp_path, run_id="more", max_steps=4, eval_every=4, dataset=f"store:{fp}", extra_train="store:feedback-test"
        )
    )
    card = st.card(b.version)
    assert card["dataset"]["fingerprint"] == fp and card["dataset"]["snapshot"] == f"datasets/{fp}"
    extra = {
        "source": "store:feedback-test",
        "fingerprint": "feedback-test",
        "snapshot": "datasets/feedback-test",
        "images": 32,
    }
    assert card["dataset"]["extra_train"] == extra and "extra_train" not in card  # recorded once, with the data
    assert card["dataset"]["splits"] == {
        "train": 4000 + 32,
        "validation": 1000,
        "test": 1000,
    }  # training grew; held-out splits did not
    assert card["params"]["extra_train"] == "store:feedback-test"
    write_snapshot(
        st, "other-labels", {"train": (x, y)}, {"source": "a test", "label_names": [n.upper() for n in CIFAR10_LABELS]}
    )
    with pytest.raises(ValueError, match="must be the same"):
        train(quick(tmp_path, run_id="bad", extra_train="store:other-labels"))
    with pytest.raises(FileNotFoundError, match="no dataset snapshot"):
        train(quick(tmp_path, run_id="bad2", dataset="store:0123456789abcdef"))
    assert len(load_cifar10(f"store:{fp}", store=st, progress=False).train) == 4000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_recipe_ops_keep_shapes_and_repeat_with_their_seed():
    x = torch.randint(0, 256, (32, 3, 32, 32), generator=_gen(), dtype=torch.uint8)
    y = torch.arange(32) % 10
    ta = trivial_augment_batch(x, _gen(1))
    assert ta.dtype == torch.uint8 and ta.shape == x.shape
    assert torch.equal(ta, trivial_augment_batch(x, _gen(1))) and not torch.equal(ta, trivial_augment_batch(x, _gen(2)))
    xn = preprocess(x)
    er = erase_batch(xn, 1.0, _gen(1))
    assert er.shape == xn.shape and er.dtype == torch.float32 and torch.equal(er, erase_batch(xn, 1.0, _gen(1)))
    assert ((er == 0) & (xn != 0)).flatten(1).any(1).all(), "p=1: every image loses a rectangle"
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mx, t = mix_batch(xn, y, 10, mixup, cutmix, _gen(3))
        assert mx.shape == xn.shape and t.shape == (32, 10) and torch.allclose(t.sum(1), torch.ones(32))
        assert torch.equal(mx, mix_batch(xn, y, 10, mixup, cutmix, _gen(3))[0])
    # the defaults are crop and flip as before, drawing the generator as before; the labels stay class indices
    px, py = train_inputs(x, y, PreprocessConfig(), TrainConfig(), 10, _gen(5))
    assert torch.equal(px, preprocess(x, train=True, generator=_gen(5))) and py is y
    recipe = TrainConfig(trivial_augment=True, random_erasing=0.5, mixup=0.8, cutmix=1.0)
    rx, rt = train_inputs(x, y, PreprocessConfig(), recipe, 10, _gen(5))
    assert rx.shape == px.shape and rt.dtype == torch.float32 and torch.allclose(rt.sum(1), torch.ones(32))


def test_ema_is_evaluated_and_published(tmp_path):
    """The average does not change training (same losses), but it is what is scored and published, and the card
    records the recipe's options."""
    small = dict(max_train_images=256, batch_size=32, max_steps=4, eval_every=4, log_every=2)
    a = train(quick(tmp_path, run_id="raw", **small))
    b = train(quick(tmp_path, run_id="ema", ema_decay=0.9, **small))
    loss = lambda r: [h["train_loss"] for h in r.history if "train_loss" in h]
    assert loss(a) == loss(b)
    raw, avg = load_package(a.package_dir).model.state_dict(), load_package(b.package_dir).model.state_dict()
    assert not torch.equal(raw["classifier.weight"], avg["classifier.weight"])
    assert a.metrics["test_loss"] != b.metrics["test_loss"]
    card = open_store(str(tmp_path / "store")).card(b.version)
    assert card["params"]["ema_decay"] == 0.9 and card["params"]["mixup"] == 0 and card["params"]["compile"] is False
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # early on the decay is (1 + 1) / (10 + 1), not 0.5
    assert torch.allclose(ema.model.weight, m.weight - 2 / 11)


def test_gpu_recipe_script_smoke(tmp_path):
    """bench/gpu_recipe.py end to end on the CPU (tiny preset, 256 images, in this process's way: --direct): the curve,
    the fp16 checkpoint with its card, the summary."""
    p = subprocess.run(
        [sys.executable, ROOT / "bench/gpu_recipe.py", "--smoke", "--direct", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    points = json.loads((out / "curve.json").read_text())["points"]
    assert summary["epochs"] == 2 and len(points) == 2 and points[0]["seconds"] < points[1]["seconds"]
    assert (out / "curve.png").stat().st_size > 0 and not summary["too_large"]
    ck = out / summary["checkpoint"]
    card = json.loads((ck / "card.json").read_text())
    assert card["shipped"]["weights"] == "fp16" and card["params"]["trivial_augment"] and card["params"]["ema_decay"]
    assert load_package(ck).model.config.hidden_size == 128
