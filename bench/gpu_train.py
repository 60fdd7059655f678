"""GPU training benchmark, prepared for one run on a lent H100 (and tried on the CPU with --smoke).

ViT-B/16 at 224, random weights: our loop (bf16) vs the seed recipe (HF Trainer, fp16, ViTImageProcessor per batch)
in images/s, and our model FLOPs utilisation against 798 TFLOP/s (the bf16 matmul rate measured on that H100).
Targets: >= 5x seed, >= 45% MFU. The from-scratch preset on the full CIFAR-10 in a time budget (target >= 90% test
accuracy in <= 5 minutes) is bench/gpu_pretrain.py, e.g. `--config configs/cifar10-scratch.yaml --minutes 5`.

The device has torch/transformers/accelerate but no registry: carry the data and the missing wheels. The parquet files
xz-compress from 57 to 18 MB (the JPEG headers repeat), which keeps the tree under the device's transfer limit:
    mkdir -p .gpu/data && for f in path/to/cifar10/*.parquet; do xz -9 -c $f > .gpu/data/$(basename $f).xz; done
    pip download --no-deps --python-version 3.12 --only-binary=:all: -d .gpu/wheels \
        datasets dill multiprocess papermill ...
and on the device: pip install --no-deps --target /tmp/site .gpu/wheels/*.whl, PYTHONPATH=/tmp/site:$PWD, unxz the data,
then python bench/gpu_train.py --data <that folder> (and bench/gpu_pretrain.py).

    python bench/gpu_train.py --smoke      # CPU dry run with tiny sizes
"""

import argparse, json, os, sys

sys.path.insert(0, os.path.dirname(__file__))
import torch
from train_recipes import ours, seed
from vit_nbdev.model import preset_config

PEAK_BF16 = 798e12


def train_flops_per_image(cfg) -> float:
    "Matmul FLOPs of one training step per image (forward + backward = 3x forward) of a ViT config."
    t, d, m, L = (
        (cfg.image_size // cfg.patch_size) ** 2 + 1,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    )
    fwd = (
        2 * t * L * (4 * d * d + 2 * d * m)
        + L * 4 * t * t * d
        + 2 * (t - 1) * 3 * cfg.patch_size**2 * d
        + 2 * d * cfg.num_labels
    )
    return 3 * fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a local CIFAR-10 parquet folder (HF layout) or a hub id")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    model, data, steps, batch, out = "vit-b16", a.data, a.steps, a.batch, {}
    if a.smoke:
        model, data, steps, batch = "vit-cifar-tiny", "sample", 4, 32
    mp = "bf16" if torch.cuda.is_available() else "no"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; {model}, batch {batch}, {steps} steps", flush=True)
    flops = train_flops_per_image(preset_config(model))
    out["ours_img_s"] = ours(model, data, steps, batch, mixed_precision=mp, augment=False)
    out["seed_img_s"] = seed(model, data, steps, batch, fp16=torch.cuda.is_available())
    out["ratio"] = out["ours_img_s"] / out["seed_img_s"]
    out["mfu"] = out["ours_img_s"] * flops / PEAK_BF16
    print(json.dumps(out), flush=True)
    print(
        f"ours {out['ours_img_s']:.0f} img/s, seed {out['seed_img_s']:.0f} img/s, "
        f"ratio {out['ratio']:.2f}x (target 5x), MFU {out['mfu']:.1%} (target 45%)",
        flush=True,
    )


if __name__ == "__main__":
    main()
