"""Accuracy against CPU training time on the bundled sample: from scratch vs fine-tuning the shipped checkpoint.

For each epoch budget, in one run: today's from-scratch default (`vit-cifar-tiny`), the same `vit-cifar-small` shape
from scratch, and `vit-cifar-small` fine-tuned from the checkpoint shipped in the package. Each point is one `train`
call on the sample (4,000 train / 1,000 validation from CIFAR-10's train split, which pretraining saw; 1,000 test from
the test split, which it did not): its training seconds (evaluation excluded) and its test accuracy, the honest figure.

    python bench/bench_finetune.py [--checkpoint vit-cifar-small-cifar10] [--epochs 1 2 4]
Writes bench/results/finetune.csv and finetune.png.
"""

import argparse, json, sys, tempfile
from pathlib import Path

import pandas as pd
import torch
from vit_nbdev.config import TrainConfig
from vit_nbdev.train import device_info, train

OUT = Path(__file__).parent / "results"


def run(model, epochs, lr, warmup):
    with tempfile.TemporaryDirectory() as t:
        r = train(
            TrainConfig(
                dataset="sample",
                model=model,
                epochs=epochs,
                batch_size=128,
                lr=lr,
                warmup_steps=warmup,
                eval_every=0,
                checkpoint_every=0,
                tracker="none",
                store=f"{t}/store",
                checkpoint_dir=f"{t}/ck",
            )
        )
    return dict(
        model=model,
        epochs=epochs,
        lr=lr,
        train_s=r.metrics["train_time_s"],
        val_acc=r.metrics["val_acc"],
        test_acc=r.metrics["test_acc"],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="vit-cifar-small-cifar10")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args()
    print(f"{device_info()}; torch {torch.__version__}", flush=True)
    from vit_nbdev.data import load_cifar10, preprocess
    from vit_nbdev.model import build_model

    m, pre = build_model(a.checkpoint)
    test = load_cifar10("sample", progress=False).test
    with torch.inference_mode():
        acc0 = (m.eval()(preprocess(test.images, pre)).logits.argmax(-1) == test.labels).float().mean().item()
    rows = [
        dict(
            run="shipped, not fine-tuned",
            model=a.checkpoint,
            epochs=0,
            lr=0.0,
            train_s=0.0,
            val_acc=None,
            test_acc=acc0,
        )
    ]
    print(json.dumps(rows[-1]), flush=True)
    for e in a.epochs:
        for name, model, lr, warmup in [
            ("scratch tiny (the old default)", "vit-cifar-tiny", 2e-3, 20),
            ("scratch small", "vit-cifar-small", 1e-3, 20),
            ("fine-tune shipped", a.checkpoint, 3e-4, 5),
        ]:
            rows.append(dict(run=name, **run(model, e, lr, warmup)))
            print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    OUT.mkdir(exist_ok=True)
    df.to_csv(OUT / "finetune.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in df.groupby("run", sort=False):
        ax.plot(g.train_s, g.test_acc, "o-", label=name)
    ax.set_xlabel("training time on this CPU (s)")
    ax.set_ylabel("test accuracy (sample, 1,000 images)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(device_info(), fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "finetune.png", dpi=120)
    best = df.loc[df.groupby("run", sort=False).test_acc.idxmax()]
    print(best[["run", "epochs", "train_s", "test_acc"]].to_string(index=False))
    ft, old = best[best.run.str.startswith("fine")].iloc[0], best[best.run.str.startswith("scratch tiny")].iloc[0]
    print(
        f"fine-tuned / old default test accuracy: {ft.test_acc / old.test_acc:.2f}x "
        f"({ft.test_acc:.3f} vs {old.test_acc:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
