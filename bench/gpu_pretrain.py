"""Pretraining the shipped checkpoint on a GPU in one timed run (tried on the CPU with --smoke first).

Measures the preset's training speed on this device for a few steps, sizes `epochs` of configs/pretrain-small-gpu.yaml
to the time budget, runs `vit-train` on it (papermill: the executed notebook is the run record), then packs the run's
store (records and model, without the dataset snapshot) for shipping with tools/ship_checkpoint.py:

    python bench/gpu_pretrain.py --data /path/to/cifar10 --minutes 5 --out gpu-out
    mkdir st && tar xzf gpu-out/store.tgz -C st
    python tools/ship_checkpoint.py --store st --model pretrain --record gpu-out/<run_id>.ipynb

    python bench/gpu_pretrain.py --smoke      # CPU dry run: tiny preset, bundled sample
    python bench/gpu_pretrain.py --config configs/cifar10-scratch.yaml --minutes 5   # issue 3's 5-minute target
"""

import argparse, json, os, platform, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import torch, yaml
from train_recipes import ours
from vit_nbdev.data import load_cifar10
from vit_nbdev.train import device_info

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain-small-gpu.yaml"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a local CIFAR-10 parquet folder (HF layout) or a hub id")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--out", default="gpu-out")
    ap.add_argument("--store", default=None, help="default: a temporary folder")
    ap.add_argument("--probe-steps", type=int, default=100)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--direct", action="store_true", help="train in this process (no papermill record)")
    ap.add_argument("--epochs", type=int, default=None, help="skip the probe and train this many epochs")
    ap.add_argument("--config", default=str(CONFIG), help="the training config (default: the shipped checkpoint's)")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    model, data, probe_steps = cfg["model"], a.data, a.probe_steps
    if a.smoke:
        model, data, probe_steps = "vit-cifar-tiny", "sample", 3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(a.store or tempfile.mkdtemp(prefix="gpu-store-"))
    print(f"device: {device_info()}; python {platform.python_version()}, torch {torch.__version__}", flush=True)
    t0 = time.time()
    n_train = len(load_cifar10(data).train)  # decodes once into the cache the runs below read
    decode_s = time.time() - t0
    if a.epochs:
        img_s, epochs = None, a.epochs
    else:
        img_s = [
            ours(model, data, n, cfg["batch_size"], mixed_precision="auto")
            for n in (max(2, probe_steps // 5), probe_steps)
        ][-1]  # the first warms up
        epochs = max(1, int(a.minutes * 60 * img_s / n_train))
    run_id = f"{Path(a.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"probe: {img_s:,.0f} img/s on {n_train} training images -> {epochs} epochs in {a.minutes} min"
        if img_s
        else f"{epochs} epochs",
        flush=True,
    )
    params = [
        "-p",
        "dataset",
        data,
        "-p",
        "model",
        model,
        "-p",
        "epochs",
        str(epochs),
        "-p",
        "store",
        str(store),
        "-p",
        "run_id",
        run_id,
        "-p",
        "tracker",
        "none",
        "-p",
        "checkpoint_dir",
        str(store / "checkpoints"),
    ]
    cmd = [sys.executable, "-c", "from vit_nbdev.cli import train_main; train_main()", "-f", a.config, *params]
    cmd += ["--direct"] if a.direct else ["--output", str(out / f"{run_id}.ipynb")]
    t1 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t1
    summary = dict(
        device=device_info(),
        run_id=run_id,
        decode_s=decode_s,
        probe_img_s=img_s,
        epochs=epochs,
        train_rc=rc,
        wall_s=wall,
    )
    if (m := store / "runs" / run_id / "metrics.json").exists():
        summary.update(json.loads(m.read_text()))
    with tarfile.open(out / "store.tgz", "w:gz") as tar:  # records and models; the dataset snapshot stays behind
        for top in ("runs", "models"):
            if (store / top).exists():
                tar.add(store / top, arcname=top)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, default=str), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
