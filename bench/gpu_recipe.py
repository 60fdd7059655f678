"""The recipe for five GPU minutes (issue 25) in one timed run: tried on the CPU with --smoke first.

Trains configs/recipe-gpu.yaml (the `vit-cifar-wide` preset from scratch, TrivialAugment, erasing, mixup / CutMix,
EMA, torch.compile; the train chapter says why) on CIFAR-10's train split: it measures the recipe's speed for a few
steps (with `ours` of train_recipes.py, as bench/gpu_pretrain.py does), sizes `epochs` to `--minutes` of training,
runs `vit-train` on it (papermill: the executed notebook is the run record), which scores the 10,000 test images
once at the end with the best weights' average (the probes' throwaway models are scored too, and discarded). It
writes to `--out`:

- `curve.json`, `curve.png`: validation accuracy (the 5% carve) against seconds of training, one point per epoch;
- `checkpoint/vit-cifar-wide-cifar10/`: the fp16 checkpoint (each file at most 16 MiB), its card and the record;
- `<run_id>.ipynb` (the record), `metrics.json` (history and confusion), `summary.json` (speed, epochs, times).

The GPU machine has torch, transformers and accelerate but no registry: carry the data xz-compressed and the wheels it
lacks as bench/gpu_train.py's docstring says (.gpu/data, .gpu/wheels), then in one call of at most 8 minutes:

    pip install -q --no-deps --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD \\
      && mkdir -p /tmp/cifar10 && for f in .gpu/data/*.xz; do xz -dc $f > /tmp/cifar10/$(basename $f .xz); done \\
      && python bench/gpu_recipe.py --data /tmp/cifar10 --minutes 5 --out $OUT/recipe

Then ship it: copy `$OUT/recipe/checkpoint/vit-cifar-wide-cifar10` into vit_nbdev/checkpoints/ (or run
tools/ship_checkpoint.py on the registered model), and put `curve.png` in the train chapter.

    python bench/gpu_recipe.py --smoke      # CPU dry run: tiny preset, 256 images of the sample, no compile
"""

import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import torch, yaml
from train_recipes import ours
from vit_nbdev.data import load_cifar10
from vit_nbdev.model import ship_checkpoint
from vit_nbdev.store import open_store
from vit_nbdev.train import device_info

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "recipe-gpu.yaml"
RECIPE = ("val_fraction", "trivial_augment", "random_erasing", "mixup", "cutmix", "ema_decay", "compile")
SMOKE = dict(  # the same path on a CPU in seconds: the tiny preset, 256 images, two short epochs, no compilation
    model="vit-cifar-tiny", max_train_images=256, batch_size=32, warmup_steps=2, log_every=4, compile=False
)
MAX_FILE = 16 * 2**20  # what may come back from the GPU machine, per file


def probe(cfg: dict, data: str, steps: int) -> float:
    "Images/s of the recipe on this device: a short run to warm up (and compile), then the measured one."
    kw = {k: cfg[k] for k in RECIPE if k in cfg}
    runs = [ours(cfg["model"], data, n, cfg["batch_size"], mixed_precision="auto", **kw) for n in (steps // 5, steps)]
    return runs[-1]


def curve(metrics: dict, out: Path) -> list[dict]:
    "The validation accuracy against training seconds of a run's record, written as `curve.json` and `curve.png`."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        dict(step=h["step"], seconds=h["train_s"], val_acc=h["val_acc"]) for h in metrics["history"] if "train_s" in h
    ]
    (out / "curve.json").write_text(json.dumps(dict(points=pts, **metrics["metrics"]), indent=1, default=str))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["seconds"] for p in pts], [p["val_acc"] for p in pts], "o-", ms=3, label="validation (5% carve)")
    ax.axhline(0.9, color="gray", ls=":", label="target 0.90")
    ax.set(xlabel="seconds of training", ylabel="accuracy", title=f"test acc {metrics['metrics']['test_acc']:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    return pts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a local CIFAR-10 parquet folder (HF layout) or a hub id (not with --smoke)")
    ap.add_argument("--minutes", type=float, default=5.0, help="of training (evaluation excluded)")
    ap.add_argument("--out", default="gpu-recipe-out")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--model", default=None, help="another preset than the config's")
    ap.add_argument("--epochs", type=int, default=None, help="skip the probe and train this many epochs")
    ap.add_argument("--probe-steps", type=int, default=100)
    ap.add_argument("--direct", action="store_true", help="train in this process (no notebook record)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (see above)")
    a = ap.parse_args(argv)
    if not (a.smoke or a.data):
        ap.error("--data is required (or --smoke)")
    config = Path(a.config).resolve()
    cfg = {**yaml.safe_load(config.read_text()), **({"model": a.model} if a.model else {})}
    data, probe_steps = ("sample", 10) if a.smoke else (a.data, a.probe_steps)
    if a.smoke:
        cfg.update(SMOKE)
    out, store = Path(a.out).resolve(), Path(tempfile.mkdtemp(prefix="gpu-recipe-store-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {device_info()}; torch {torch.__version__}; {cfg['model']} on {data}", flush=True)
    t = time.time()
    carve = load_cifar10(data, val_fraction=cfg["val_fraction"], progress=False)  # decoded once into the cache
    n_train = min(len(carve.train), cfg.get("max_train_images") or len(carve.train))
    decode_s, t = time.time() - t, time.time()
    img_s = None if a.epochs or a.smoke else probe(cfg, data, probe_steps)
    epochs = a.epochs or (2 if a.smoke else max(1, int(a.minutes * 60 * img_s / n_train)))
    probe_s = time.time() - t
    print(f"{n_train} training images; {img_s or 0:,.0f} img/s measured -> {epochs} epochs", flush=True)
    run_id = f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    params = dict(dataset=data, epochs=epochs, store=str(store), run_id=run_id, tracker="none")
    # the config file gives the rest; the model (--model) and the smoke run's sizes go on top of it
    params.update(checkpoint_dir=str(store / "checkpoints"), **{k: v for k, v in cfg.items() if k in SMOKE})
    cmd = [sys.executable, "-c", "from vit_nbdev.cli import train_main; train_main()", "-f", str(config)]
    cmd += [x for k, v in params.items() for x in ("-p", k, json.dumps(v) if not isinstance(v, str) else v)]
    record = out / f"{run_id}.ipynb"
    cmd += ["--direct"] if a.direct else ["--output", str(record)]
    t = time.time()
    rc = subprocess.call(cmd, cwd=out)
    summary = dict(device=device_info(), run_id=run_id, decode_s=decode_s, probe_s=probe_s, probe_img_s=img_s)
    summary.update(epochs=epochs, train_rc=rc, run_wall_s=time.time() - t)
    if rc == 0:
        st = open_store(str(store))
        shutil.copy(store / "runs" / run_id / "metrics.json", out / "metrics.json")
        m = json.loads((out / "metrics.json").read_text())
        summary.update(version=m["version"], points=len(curve(m, out)), **m["metrics"])
        name = f"{cfg['model']}-cifar10"
        note = f"the recipe for five GPU minutes (issue 25): {config.name}, {epochs} epochs"
        ck = ship_checkpoint(
            st.fetch_model(m["version"]), out / "checkpoint" / name, [record] if record.exists() else [], note
        )
        big = [f"{f.name} ({f.stat().st_size:,} bytes)" for f in ck.iterdir() if f.stat().st_size > MAX_FILE]
        summary.update(checkpoint=str(ck.relative_to(out)), too_large=big)
        rc = 1 if big else 0
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, default=str), flush=True)
    shutil.rmtree(store, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
