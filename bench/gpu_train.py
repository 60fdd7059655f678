"""GPU training benchmark, prepared for one run on a lent H100 (and tried on the CPU with --smoke).

1. ViT-B/16 at 224, random weights: our loop (bf16) vs the seed recipe (HF Trainer, fp16,
   ViTImageProcessor per batch) in images/s, and our model FLOPs utilisation against
   798 TFLOP/s (the bf16 matmul rate measured on that H100).  Targets: >= 5x seed, >= 45% MFU.
2. The from-scratch preset (configs/cifar10-scratch.yaml) on the full CIFAR-10 for <= 5 minutes:
   the test accuracy reached (target >= 90%).

The device has torch/transformers/accelerate but no registry: carry the data and the missing wheels, e.g.
    mkdir -p .gpu/data && cp ../shared/data/cifar10/*.parquet .gpu/data/
    pip download --no-deps -d .gpu/wheels datasets dill multiprocess papermill wandb google-cloud-storage ...
and on the device: pip install --no-deps .gpu/wheels/*.whl -e . && python bench/gpu_train.py --data .gpu/data

    python bench/gpu_train.py --smoke      # CPU dry run with tiny sizes
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(__file__))
import torch, yaml
from train_recipes import ours, seed
from vit_nbdev.model import preset_config
from vit_nbdev.train import TrainConfig, train

PEAK_BF16 = 798e12

def train_flops_per_image(cfg) -> float:
    "Matmul FLOPs of one training step per image (forward + backward = 3x forward) of a ViT config."
    t, d, m, L = (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    fwd = 2 * t * L * (4 * d * d + 2 * d * m) + L * 4 * t * t * d + 2 * (t - 1) * 3 * cfg.patch_size ** 2 * d + 2 * d * cfg.num_labels
    return 3 * fwd

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cifar10"); ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=60); ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=5.0); ap.add_argument("--skip-scratch", action="store_true")
    a = ap.parse_args()
    model, data, steps, batch, out = "vit-b16", a.data, a.steps, a.batch, {}
    if a.smoke: model, data, steps, batch = "vit-cifar-tiny", "sample", 4, 32
    mp = "bf16" if torch.cuda.is_available() else "no"
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; {model}, batch {batch}, {steps} steps", flush=True)
    flops = train_flops_per_image(preset_config(model))
    out["ours_img_s"] = ours(model, data, steps, batch, mixed_precision=mp, augment=False)
    out["seed_img_s"] = seed(model, data, steps, batch, fp16=torch.cuda.is_available())
    out["ratio"] = out["ours_img_s"] / out["seed_img_s"]
    out["mfu"] = out["ours_img_s"] * flops / PEAK_BF16
    print(json.dumps(out), flush=True)
    print(f"ours {out['ours_img_s']:.0f} img/s, seed {out['seed_img_s']:.0f} img/s, ratio {out['ratio']:.2f}x (target 5x), MFU {out['mfu']:.1%} (target 45%)", flush=True)
    if a.skip_scratch: return
    cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10-scratch.yaml")))
    cfg.update(dataset=data, tracker="none", store="/tmp/gpu-store", checkpoint_dir="/tmp/gpu-ck", checkpoint_every=0)
    # size the run to the time budget from a measured throughput of this preset
    probe = ours(cfg["model"], data, 3 if a.smoke else 30, cfg["batch_size"], mixed_precision=cfg["mixed_precision"])
    n_train = 4000 if a.smoke else 40000
    epochs = max(1, int(a.minutes * 60 * 0.85 * probe / n_train)) if not a.smoke else 1
    cfg.update(epochs=epochs, eval_every=0)
    t = time.time(); r = train(TrainConfig.from_dict(cfg)); dt = time.time() - t
    print(json.dumps(dict(scratch_epochs=epochs, scratch_seconds=dt, **r.metrics)), flush=True)
    print(f"from-scratch {cfg['model']}: {epochs} epochs in {dt / 60:.1f} min, test acc {r.metrics['test_acc']:.4f} (target 0.90)")

if __name__ == "__main__":
    main()
