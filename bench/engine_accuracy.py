"""Accuracy and top-1 agreement with fp32 of every engine on the full CIFAR-10 test split (10,000 images).

The model is the shipped checkpoint `vit-cifar-small-cifar10` (pretrained on the full CIFAR-10 train carve; the test
split was never trained on). Each engine runs the same `preprocess`d images; agreement is with PyTorch fp32.

    python bench/engine_accuracy.py --data /path/to/cifar10 [--model vit-cifar-small-cifar10]

Writes bench/results/engine_accuracy.md.
"""

import argparse, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a local CIFAR-10 parquet folder (HF layout) or a hub id")
    ap.add_argument("--model", default="vit-cifar-small-cifar10")
    a = ap.parse_args()
    from vit_nbdev.config import shipped_checkpoint
    from vit_nbdev.data import load_cifar10
    from vit_nbdev.engine import REFERENCE_ENGINE, build_engine, candidate_names, cpu_budget, host_info, predictions
    from vit_nbdev.model import load_package

    host = host_info()
    pkg = load_package(shipped_checkpoint(a.model) or a.model)
    test = load_cifar10(a.data, progress=False).test
    order = {n: i for i, n in enumerate(pkg.labels)}
    labels = test.labels  # CIFAR-10's order is the package's (checked below)
    assert list(order) == load_cifar10(a.data, progress=False).label_names
    folder, rows, ref = Path(tempfile.mkdtemp(prefix="engines-")), [], None
    for name in [REFERENCE_ENGINE] + [n for n in candidate_names() if n != REFERENCE_ENGINE]:
        e = build_engine(name, pkg, cpu_budget(), folder)
        t0 = time.perf_counter()
        pred = predictions(e, pkg, test.images, batch_size=250)
        s = time.perf_counter() - t0
        ref = pred if ref is None else ref
        rows.append((name, (pred == labels).float().mean().item(), (pred == ref).float().mean().item(), len(test) / s))
        _, acc, agree, img_s = rows[-1]
        print(f"{name:11s} accuracy {100 * acc:.2f}%  agreement {100 * agree:.2f}%  {img_s:.0f} img/s", flush=True)
    lines = [
        f"# Engines on the full CIFAR-10 test split\n\nModel `{a.model}`; {len(test):,} test images; CPU {host['cpu']} "
        f"({', '.join(host['flags'])}), {cpu_budget()} threads.\n",
        "| engine | accuracy | top-1 agreement with fp32 | flips | img/s (batch 250) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {100 * acc:.2f} % | {100 * ag:.2f} % | {round((1 - ag) * len(test))} | {r:.0f} |"
        for n, acc, ag, r in rows
    ]
    (ROOT / "bench" / "results" / "engine_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
