"""Serving throughput and latency: `vit-serve` vs a seed-style server vs the raw batched forward pass.

Same run, same machine, same model and weights (random, `torch.manual_seed(0)`), same CIFAR-10 test
images (32×32 PNG uploads), 16 concurrent clients for a bounded time per configuration:

- **ours**: `vit-serve` (micro-batcher, defaults: max batch 32, max wait 5 ms, fp32, telemetry on);
- **seed-style**: a FastAPI endpoint that, for every request, loads `ViTImageProcessor` and the
  model from the package directory and predicts that one image (what the seed project did);
  embedded below, started with `--seed-server DIR --port N`;
- **raw**: the model's batched forward pass in process (`forward_features` on preprocessed batches
  of `--clients` images): the ceiling for any server; `ours` vs `raw` is the server overhead.

All three get the same PyTorch intra-op thread count (`--threads`, default: the service's own
default, one less than the CPUs, at least 1): on a small shared machine a second OpenMP thread can
make a forward pass many times slower, and the comparison is about serving, not thread tuning.
Besides wall-clock throughput the table gives the CPU time per image of each server process,
which other load on the machine disturbs much less.

    python bench/bench_serve.py [--models vit-cifar-tiny,vit-b16] [--seconds 25] [--clients 16]

Prints a table and the ratios, and writes bench/results/serve.json and serve.md.
"""
import argparse, asyncio, io, json, os, platform, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# -- the seed-style server ------------------------------------------------------------------------

def seed_app(model_dir: str, threads: int):
    "FastAPI app in the style of the seed project: processor and model loaded per request, one image per forward pass."
    import torch
    torch.set_num_threads(threads)
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor
    app = FastAPI()

    @app.post("/predict")
    def predict(file: UploadFile = File(...)):
        processor = ViTImageProcessor.from_pretrained(model_dir)
        model = ViTForImageClassification.from_pretrained(model_dir)
        model.eval()
        image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad(): logits = model(**inputs).logits
        probs = logits.softmax(-1)[0]
        i = int(probs.argmax())
        return [{"label": model.config.id2label[i], "score": float(probs[i])}]

    @app.get("/readyz")
    def readyz(): return {"ready": True}
    return app


# -- load generation -------------------------------------------------------------------------------

async def _load(url: str, blobs: list[bytes], clients: int, seconds: float) -> dict:
    "`clients` closed-loop clients post one image per request for `seconds` (in-flight requests finish)."
    import httpx
    lat, errors, t_end = [], [], time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as h:
        async def client(c):
            i = 0
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    r = await h.post(url + "/predict", files={"file": ("x.png", blobs[(c * 13 + i) % len(blobs)], "image/png")})
                    (lat if r.status_code == 200 else errors).append(time.perf_counter() - t0 if r.status_code == 200 else r.status_code)
                except httpx.HTTPError as e: errors.append(repr(e))
                i += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(lat) if lat else np.array([np.nan])
    return dict(requests=int(np.isfinite(lat).sum()), errors=len(errors), error_samples=[str(e) for e in errors[:3]], wall_s=wall,
                images_per_s=np.isfinite(lat).sum() / wall, p50_ms=float(np.nanpercentile(lat, 50) * 1e3),
                p99_ms=float(np.nanpercentile(lat, 99) * 1e3))

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _start(cmd: list, env: dict, log: Path, port: int, timeout: float = 300) -> subprocess.Popen:
    import httpx
    with open(log, "ab") as f: p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None: raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200: return p
        except httpx.HTTPError: pass
        if time.monotonic() > deadline: raise RuntimeError(f"not ready after {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.2)

def _stop(p: subprocess.Popen):
    p.send_signal(signal.SIGTERM)
    try: p.wait(60)
    except subprocess.TimeoutExpired: p.kill(); p.wait()

def _cpu_s(pid: int | None = None) -> float:
    "CPU seconds (user + system, all threads) used so far by process `pid` (default: this one)."
    if pid is None: return time.process_time()
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def _timed_load(url: str, blobs, clients: int, seconds: float, pid: int) -> dict:
    "`_load`, plus the server's CPU time per answered image (robust to other load on a shared machine)."
    c0 = _cpu_s(pid)
    r = asyncio.run(_load(url, blobs, clients, seconds))
    r["cpu_ms_per_image"] = (_cpu_s(pid) - c0) * 1e3 / max(1, r["requests"])
    return r

def _metrics(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for f in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in f.samples:
            if not s.labels: out[s.name] = s.value
    return out


# -- one model -------------------------------------------------------------------------------------

def bench_model(preset: str, seconds: float, clients: int, work: Path, images, threads: int) -> dict:
    import torch
    from PIL import Image
    from vit_nbdev.data import preprocess
    from vit_nbdev.model import build_model, forward_features, load_package, save_package
    from vit_nbdev.store import open_store
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, pre = build_model(preset)
    pkg_dir = save_package(model, pre, work/preset/"package", card={"note": "random weights (benchmark)"})
    store = work/preset/"store"
    open_store(store).register(pkg_dir, "bench")
    del model
    blobs = []
    for x in images:
        b = io.BytesIO(); Image.fromarray(x.permute(1, 2, 0).numpy()).save(b, "PNG"); blobs.append(b.getvalue())
    res = dict(model=preset, image_size=pre.image_size)

    # raw: batched forward passes of `clients` images, in process, nothing else running
    pkg = load_package(pkg_dir)
    x = preprocess(images[:clients], pkg.preprocess)
    with torch.inference_mode():
        forward_features(pkg.model, x)                                     # warm-up
        n, t0, c0 = 0, time.perf_counter(), _cpu_s()
        while (time.perf_counter() - t0 < seconds) or n < 2:
            forward_features(pkg.model, x); n += 1
        res["raw"] = dict(batch=clients, images_per_s=n * clients / (time.perf_counter() - t0), batches=n,
                          cpu_ms_per_image=(_cpu_s() - c0) * 1e3 / (n * clients))
    del pkg
    print(f"  raw batched forward (batch {clients}): {res['raw']['images_per_s']:.1f} img/s, {res['raw']['cpu_ms_per_image']:.1f} CPU ms/img", flush=True)

    # ours
    port = _free_port()
    p = _start([str(BIN/"vit-serve"), "--host", "127.0.0.1", "--port", str(port)],
               {"VIT_STORE": str(store), "VIT_MODEL": "bench", "VIT_CACHE": str(work/"cache"), "VIT_TORCH_THREADS": str(threads)},
               work/f"{preset}-ours.log", port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_load(url, blobs, clients, min(3.0, seconds / 5)))      # warm-up (every batch size)
        m0 = _metrics(url)
        res["ours"] = _timed_load(url, blobs, clients, seconds, p.pid)
        m1 = _metrics(url)
        res["ours"]["mean_batch"] = (m1["vit_batch_size_sum"] - m0["vit_batch_size_sum"]) / max(1, m1["vit_batch_size_count"] - m0["vit_batch_size_count"])
    finally: _stop(p)
    print(f"  ours: {res['ours']['images_per_s']:.1f} img/s, p50 {res['ours']['p50_ms']:.0f} ms, p99 {res['ours']['p99_ms']:.0f} ms, "
          f"mean batch {res['ours']['mean_batch']:.1f}, {res['ours']['cpu_ms_per_image']:.1f} CPU ms/img, errors {res['ours']['errors']}", flush=True)

    # seed-style
    port = _free_port()
    p = _start([sys.executable, __file__, "--seed-server", str(pkg_dir), "--port", str(port), "--threads", str(threads)],
               {"OMP_NUM_THREADS": str(threads)}, work/f"{preset}-seed.log", port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_load(url, blobs, 2, 1))                                 # warm-up (imports, page cache)
        res["seed"] = _timed_load(url, blobs, clients, seconds, p.pid)
    finally: _stop(p)
    print(f"  seed-style: {res['seed']['images_per_s']:.2f} img/s, p50 {res['seed']['p50_ms']:.0f} ms, p99 {res['seed']['p99_ms']:.0f} ms, "
          f"{res['seed']['cpu_ms_per_image']:.1f} CPU ms/img, errors {res['seed']['errors']}", flush=True)
    res["speedup_vs_seed"] = res["ours"]["images_per_s"] / res["seed"]["images_per_s"]
    res["overhead_vs_raw_pct"] = 100 * (1 - res["ours"]["images_per_s"] / res["raw"]["images_per_s"])
    res["cpu_speedup_vs_seed"] = res["seed"]["cpu_ms_per_image"] / res["ours"]["cpu_ms_per_image"]
    res["cpu_overhead_vs_raw_pct"] = 100 * (res["ours"]["cpu_ms_per_image"] / res["raw"]["cpu_ms_per_image"] - 1)
    return res


def table(results: list[dict], clients: int, seconds: float) -> str:
    rows = ["| model | server | images/s | p50 ms | p99 ms | CPU ms / image | requests | errors |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        name = f"{r['model']} ({r['image_size']}px)"
        rows.append(f"| {name} | raw batched forward (batch {r['raw']['batch']}) | {r['raw']['images_per_s']:.1f} | – | – | "
                    f"{r['raw']['cpu_ms_per_image']:.1f} | – | – |")
        for k, label in (("ours", f"vit-serve (mean batch {r['ours']['mean_batch']:.1f})"), ("seed", "seed-style (load per request)")):
            s = r[k]
            rows.append(f"| {name} | {label} | {s['images_per_s']:.2f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {s['cpu_ms_per_image']:.1f} | "
                        f"{s['requests']} | {s['errors']} |")
    rows += ["", "| model | vit-serve / seed-style: throughput | (CPU per image) | server overhead vs raw forward: throughput | (CPU per image) |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['model']} | {r['speedup_vs_seed']:.1f}× | {r['cpu_speedup_vs_seed']:.1f}× | {r['overhead_vs_raw_pct']:.1f}% | "
                    f"{r['cpu_overhead_vs_raw_pct']:.1f}% |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit-cifar-tiny,vit-b16")
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT/"bench"/"results"))
    ap.add_argument("--threads", type=int, default=0, help="PyTorch intra-op threads for all three (default: the service's default)")
    ap.add_argument("--seed-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.seed_server:
        import uvicorn
        return uvicorn.run(seed_app(a.seed_server, a.threads), host="127.0.0.1", port=a.port, log_level="warning")

    import torch
    from vit_nbdev.data import load_cifar10
    from vit_nbdev.config import ServeConfig
    threads = a.threads or ServeConfig(torch_threads=a.threads).model_threads
    images = load_cifar10(progress=False).test.images[:64]
    env = dict(python=platform.python_version(), torch=torch.__version__, threads=threads, cpus=os.cpu_count(),
               cpu=platform.processor() or platform.machine(), load_before=os.getloadavg())
    print(f"{env}\n{a.clients} clients, {a.seconds:g} s per configuration, one 32×32 PNG per request", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results = []
    try:
        for preset in a.models.split(","):
            print(f"{preset}:", flush=True)
            results.append(bench_model(preset, a.seconds, a.clients, work, images, threads))
    finally: shutil.rmtree(work, ignore_errors=True)
    env["load_after"] = os.getloadavg()
    md = table(results, a.clients, a.seconds)
    print("\n" + md + f"\n\nload average before {env['load_before']}, after {env['load_after']}")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out/"serve.json").write_text(json.dumps(dict(env=env, clients=a.clients, seconds=a.seconds, results=results), indent=1))
    (out/"serve.md").write_text(f"# Serving benchmark\n\n{a.clients} concurrent clients, {a.seconds:g} s per configuration, "
                                f"one 32×32 PNG per request; {env['cpus']} CPUs, torch {env['torch']}, {threads} intra-op thread(s) "
                                f"for each; load average {env['load_before']} before, {env['load_after']} after.\n\n{md}\n")

if __name__ == "__main__":
    main()
