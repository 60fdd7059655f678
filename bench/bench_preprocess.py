"""Preprocessing throughput: `vit_nbdev.data.preprocess` vs `transformers.ViTImageProcessor`, same images, same run.

uint8 32×32 → normalised 224×224, batches of 256. Also times the first decode of a full CIFAR-10
folder into the cache and a cached reload.

    python bench/bench_preprocess.py --data path/to/cifar10 [--batches 5]
"""

import argparse, tempfile, time
import torch
from transformers import ViTImageProcessor
from vit_nbdev.data import PreprocessConfig, load_cifar10, preprocess


def best_of(fn, n):
    "Best wall time of `n` calls (the least disturbed by other load on the machine)."
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a local CIFAR-10 parquet folder (HF layout) or a hub id")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        data = load_cifar10(a.data, cache_dir=cache)
        t_decode = time.perf_counter() - t
        t = time.perf_counter()
        load_cifar10(a.data, cache_dir=cache, progress=False)
        t_cached = time.perf_counter() - t
    n = len(data.train) + len(data.validation) + len(data.test)
    print(
        f"decode {n} images into the cache: {t_decode:.1f} s ({n / t_decode:,.0f} img/s); "
        f"cached reload: {t_cached:.2f} s ({t_decode / t_cached:.0f}x faster)"
    )

    x = data.test.images[: a.batch]
    pils = [im.permute(1, 2, 0).numpy() for im in x]  # HxWxC uint8, what the processor takes
    cfg = PreprocessConfig(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    proc = ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ours = best_of(lambda: preprocess(x, cfg), a.batches)
    theirs = best_of(lambda: proc(pils, return_tensors="pt"), a.batches)
    diff = (preprocess(x, cfg) - proc(pils, return_tensors="pt")["pixel_values"]).abs().mean().item()
    print(f"batch {a.batch}, 32x32 -> 224x224 (best of {a.batches}):")
    print(f"  vit_nbdev.preprocess   {a.batch / ours:10,.0f} img/s")
    print(f"  ViTImageProcessor      {a.batch / theirs:10,.0f} img/s")
    print(f"  ratio (ours / HF)      {theirs / ours:10.1f}x     (mean |difference| of outputs: {diff:.3f})")


if __name__ == "__main__":
    main()
