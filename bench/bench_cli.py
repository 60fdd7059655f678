"""Command-line start-up: how long `--help` and `vit-cloud train --dry-run` take, against the old entry points.

Ours: the installed console scripts (`vit_nbdev.cli` parses with the light `config` module, then imports a chapter).
Baseline, in the same run: what the old entry points paid before parsing: importing the chapter that held the CLI
(`vit_nbdev.train`, `vit_nbdev.serve`, `vit_nbdev.monitor`), and `vit_nbdev.train` for `vit-cloud` (it validated
parameters with it). Best of `--runs` wall times (the least disturbed by other load on this machine).

    python bench/bench_cli.py [--runs 5]
"""

import argparse, platform, statistics, subprocess, sys, time
from pathlib import Path

BIN, ROOT = Path(sys.executable).parent, Path(__file__).resolve().parents[1]


def best(cmd, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def cpu():
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags"))
        return f"{name}; " + " ".join(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(f"cpu: {cpu()}; python {platform.python_version()}; best / median of {a.runs} runs")
    dry = [
        "train",
        "--project",
        "p-1234",
        "--store",
        "gs://my-bucket/vit",
        "-f",
        str(ROOT / "configs/sample.yaml"),
        "--run-id",
        "r1",
        "--dry-run",
    ]
    cases = [
        ("vit-train --help", [BIN / "vit-train", "--help"], [sys.executable, "-c", "import vit_nbdev.train"]),
        ("vit-serve --help", [BIN / "vit-serve", "--help"], [sys.executable, "-c", "import vit_nbdev.serve"]),
        ("vit-monitor --help", [BIN / "vit-monitor", "--help"], [sys.executable, "-c", "import vit_nbdev.monitor"]),
        ("vit-cloud train --dry-run", [BIN / "vit-cloud", *dry], [sys.executable, "-c", "import vit_nbdev.train"]),
    ]
    print(f"{'command':<28}{'ours s':>14}{'baseline s':>16}{'baseline/ours':>15}")
    for name, ours, base in cases:
        o, om = best(ours, a.runs)
        b, bm = best(base, a.runs)
        print(f"{name:<28}{o:>7.2f} ({om:.2f}){b:>9.2f} ({bm:.2f}){b / o:>14.1f}x")


if __name__ == "__main__":
    main()
