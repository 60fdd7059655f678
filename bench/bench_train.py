"""CPU training throughput: our loop vs the seed recipe (HF Trainer + ViTImageProcessor) vs a bare PyTorch loop.

Same preset, same data, same batch size, in the same run. The seed recipe runs in fp32 (as the seed
did); our loop and the bare loop run at `--precision` (default: bf16 autocast where the CPU supports
it, as `mixed_precision="bf16"` does in our loop; `no` for fp32), so the ceiling has our precision;
the three are interleaved for `--rounds` rounds and the best round of each is kept (the least
disturbed by other load).
Targets: ours ≥ 1.15× seed, ≥ 0.95× bare.

    python bench/bench_train.py [--model vit-cifar-small] [--dataset sample] [--steps 20] [--batch 128] [--rounds 2]
"""

import argparse, os, sys

sys.path.insert(0, os.path.dirname(__file__))
import torch
from train_recipes import ours, seed, bare


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit-cifar-small")
    ap.add_argument("--dataset", default="sample")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--precision", choices=["bf16", "no"], default="bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    )
    a = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.model} on {a.dataset}, "
        f"batch {a.batch}, {a.steps} steps, ours/bare at {a.precision}, seed fp32"
    )
    best = {"ours": 0.0, "seed": 0.0, "bare": 0.0}
    for r in range(a.rounds):
        runs = (
            ("ours", lambda: ours(a.model, a.dataset, a.steps, a.batch, mixed_precision=a.precision)),
            ("seed", lambda: seed(a.model, a.dataset, a.steps, a.batch)),
            (
                "bare",
                lambda: bare(
                    a.model,
                    a.dataset,
                    a.steps,
                    a.batch,
                    autocast_dtype=torch.bfloat16 if a.precision == "bf16" else None,
                ),
            ),
        )
        for name, fn in runs:
            v = fn()
            best[name] = max(best[name], v)
            print(f"  round {r + 1} {name:5s} {v:8.1f} img/s", flush=True)
    print(f"\n{'loop':28s} {'img/s':>8s}")
    for name, label in (
        ("ours", "ours (vit_nbdev.train)"),
        ("seed", "seed (Trainer+ViTImageProcessor)"),
        ("bare", "bare PyTorch (ceiling)"),
    ):
        print(f"{label:28s} {best[name]:8.1f}")
    print(f"ours / seed = {best['ours'] / best['seed']:.2f}x   (target >= 1.15)")
    print(f"ours / bare = {best['ours'] / best['bare']:.2f}x   (target >= 0.95)")


if __name__ == "__main__":
    main()
