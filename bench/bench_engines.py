"""The raw forward pass of every CPU engine, side by side: ViT-B/16 at 224 px, one batch, a fixed thread count,
interleaved rounds (each round times every engine once, so a busy neighbour slows them all alike).

    python bench/bench_engines.py                               # vit-b16, batch 16, 2 threads, 5 rounds
    python bench/bench_engines.py --model vit-cifar-small --rounds 3 --out /tmp/engines.md

Random weights (`torch.manual_seed(0)`): right for speed, not for agreement. Whether an engine may serve a model is
the engine chapter's check on a trained one. The OpenVINO int8 IR is calibrated on `--calibration` held-out images
(the export uses 300; the speed does not depend on it). Writes a Markdown table (`bench/results/engines.md`) with the
host's CPU and flags and the share of the AMX roofline (2 cores, about 8 bf16 TFLOP/s)."""

import argparse, os, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_serve import prepare_model  # noqa: E402 (the same random-weight package the serving benchmark uses)

ROOFLINE_FLOPS = 8e12  # 2 AMX cores, bf16, about
B16_FLOPS = 2 * 17.6e9  # one 224 px ViT-B/16 forward: 17.6 GMACs


def build(names: list[str], pkg, threads: int, folder: Path, calibration: int) -> dict:
    "Each engine that builds on this host (OpenVINO int8 calibrated on `calibration` images), else the reason."
    from vit_nbdev.engine import build_engine, calibration_images, convert_openvino, engine_key, make_artifacts

    out = {}
    for name in names:
        try:
            if name == "openvino-int8" and not (folder / engine_key(name) / "model.xml").exists():
                (folder / engine_key(name)).mkdir(parents=True, exist_ok=True)
                src = make_artifacts(pkg, "onnx-fp32", folder)
                convert_openvino(src, folder / engine_key(name) / "model.xml", calibration_images(pkg, calibration))
            out[name] = build_engine(name, pkg, threads, folder)
        except Exception as ex:
            out[name] = repr(ex)
        print(f"  {name}: {out[name]}", flush=True)
    return out


def rounds(engines: dict, x, n_rounds: int, calls: int) -> dict[str, list[float]]:
    "Images/s of each engine in each round: a warm-up call, then `calls` calls, engine after engine."
    rates = {n: [] for n, e in engines.items() if not isinstance(e, str)}
    for n in rates:
        engines[n](x)
    for r in range(n_rounds):
        for n in rates:
            t0 = time.perf_counter()
            for _ in range(calls):
                engines[n](x)
            rates[n].append(calls * len(x) / (time.perf_counter() - t0))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit-b16", help="a preset (random weights)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2, help="calls per engine per round")
    ap.add_argument("--calibration", type=int, default=32, help="images NNCF calibrates the int8 IR on")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench-engines"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engines.md")
    a = ap.parse_args()

    import torch
    from vit_nbdev.data import load_cifar10, preprocess
    from vit_nbdev.engine import host_info, openvino_available, openvino_precision
    from vit_nbdev.model import load_package

    info = host_info()
    cpu_flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    flags = [f for f in cpu_flags if f.startswith("amx") and f not in info["flags"]]
    print(f"host: {info['cpu']}; flags {info['flags'] + flags}; {info['cpus']} CPUs", flush=True)
    m = prepare_model(a.model, None, a.cache / a.model, export=False)
    pkg = load_package(m["package"])
    x = preprocess(load_cifar10(progress=False).test.images[: a.batch], pkg.preprocess)
    ov = f"openvino-{openvino_precision()}" if openvino_available() else "openvino-fp32"
    labels = {
        "torch-fp32": "PyTorch fp32",
        "torch-int8": "PyTorch dynamic int8",
        "torch-bf16": "PyTorch bf16 autocast",
        "onnx-int8": "ONNX Runtime int8",
        ov: f"OpenVINO, default precision ({ov.split('-')[1]})",
        "openvino-int8": "OpenVINO int8 (NNCF)",
    }
    engines = build(list(labels), pkg, a.threads, a.cache / a.model / "engines", a.calibration)
    rates = rounds(engines, x, a.rounds, a.calls)
    torch.set_num_threads(a.threads)

    flops = B16_FLOPS * (pkg.model.config.image_size / 224) ** 2 if a.model == "vit-b16" else None
    lines = [
        f"# Raw forward pass, {a.model} (random weights), batch {a.batch}, {a.threads} threads",
        "",
        f"`python bench/bench_engines.py --model {a.model} --batch {a.batch} --threads {a.threads} "
        f"--rounds {a.rounds}`: {a.rounds} interleaved rounds of {a.calls} calls per engine; median and range.",
        "",
        f"Host: {info['cpu']}; flags {', '.join(info['flags'] + flags)}; {info['cpus']} CPUs "
        f"(load {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end).",
        "",
        "| engine | img/s (median) | range | vs PyTorch fp32 | share of roofline |",
        "|---|---:|---:|---:|---:|",
    ]
    base = statistics.median(rates["torch-fp32"]) if "torch-fp32" in rates else None
    roof = ROOFLINE_FLOPS / flops if flops else None
    for n, label in labels.items():
        if n not in rates:
            lines.append(f"| {label} | – | {engines[n]} | | |")
            continue
        med = statistics.median(rates[n])
        vs = f"{med / base:.2f}×" if base else "–"
        share = f"{100 * med / roof:.0f} %" if roof else "–"
        lines.append(f"| {label} | {med:.2f} | {min(rates[n]):.2f}–{max(rates[n]):.2f} | {vs} | {share} |")
    if roof:
        lines += ["", f"Roofline: 8 bf16 TFLOP/s / {flops / 1e9:.1f} GFLOP per image = {roof:.0f} img/s."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
