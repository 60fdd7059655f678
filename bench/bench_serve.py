"""Serving throughput, latency and cold start: `vit-serve` (engine chosen at load) vs a naive server vs a seed-style
server vs the raw forward pass.

Same run, same machine, same model package, same CIFAR-10 test images (32×32 PNG uploads, one image per request, so
requests/s = images/s), the same number of closed-loop clients (`--clients`, default 16) for the same time per server
(`--seconds`):

- **seed-style**: a FastAPI endpoint that, for every request, loads `ViTImageProcessor` and the model from the package
  directory and predicts that one image (what the seed project did); embedded below (`--seed-server DIR --port N`);
- **naive**: the same endpoint with the processor and model loaded *once* at start: fp32, one image per forward pass,
  PyTorch's default threads (all CPUs): what a first FastAPI wrapper of the model looks like; embedded below
  (`--naive-server DIR --port N`);
- **vit-serve**: the service with its defaults (`VIT_ENGINE=auto`, `VIT_THREADS` unset: engine and thread count
  measured at load; micro-batcher, telemetry on), started from an empty `VIT_CACHE` like a fresh instance; its
  **cold start** is the seconds from spawning the process to the first 200 from `/readyz`. With
  `--engines onnx-int8,torch-fp32` it also runs pinned (`VIT_ENGINE=<name>`) once per listed engine;
- **raw forward**: in this process, with no server, the batched forward pass (`--raw-batch` images, default
  `--clients`) of fp32 eager PyTorch and of the engine `vit-serve` chose, both at the thread count it measured
  (from `/readyz`'s `engine`), for at most about `--raw-seconds`: the ceiling for any server.

Models: `--models` presets (default `vit-cifar-small,vit-b16`), each a package with random weights
(`torch.manual_seed(0)`) registered in a LocalStore; or `--package NAME=DIR` for an existing package (e.g.
`vit_nbdev/checkpoints/vit-cifar-small-cifar10`, the shipped trained checkpoint). Before `vit-serve` starts,
`vit-models export` is run once (`vit_nbdev.engine.export_engines`: ONNX graphs and 1,000-image checks stored beside
the version; its time is printed). For ViT-B/16 that takes many minutes on 2 cores: `--cache DIR` keeps the packages,
stores and exported engines between runs and reuses them. `--no-export` serves from a store without them (then
`vit-serve` checks what fits in its 30 s budget at start and serves fp32 otherwise).

Besides wall-clock throughput the table gives each server process's CPU time per image, which other load on a shared
machine disturbs much less. The servers get this environment without `VIT_*`, `OMP_NUM_THREADS` and `MKL_NUM_THREADS`
(each picks its own thread count), listen on 127.0.0.1 (free ports) and are always stopped (also on SIGTERM); everything
is written under a temporary folder, `--cache` (also this process's `VIT_CACHE`), or `--out`.

    python bench/bench_serve.py --models vit-cifar-small,vit-b16 --seconds 30 --clients 16 --cache /tmp/bench-cache
    python bench/bench_serve.py --models vit-cifar-tiny --seconds 3 --clients 4                  # a quick check
    python bench/bench_serve.py --package trained=vit_nbdev/checkpoints/vit-cifar-small-cifar10 --models '' \
        --engines torch-fp32

Prints the host (CPU model and flags, CPU budget, torch and onnxruntime versions), one table per model and the ratios,
and writes bench/results/serve.json and serve.md (overwritten).
"""

import argparse, asyncio, contextlib, hashlib, io, json, os, platform, shutil, signal, socket, subprocess, sys
import tempfile, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)  # not passed to the servers: each uses its own default or measurement


# -- the baseline servers ---------------------------------------------------------------------------


def _hf():
    "`ViTImageProcessor` (the PIL one where transformers has it: no torchvision here) and `ViTForImageClassification`."
    from transformers import ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor
    return ViTImageProcessor, ViTForImageClassification


def _predict_one(processor, model, data: bytes) -> list[dict]:
    import torch
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    probs = logits.softmax(-1)[0]
    i = int(probs.argmax())
    return [{"label": model.config.id2label[i], "score": float(probs[i])}]


def baseline_app(model_dir: str, per_request: bool):
    """FastAPI app of a baseline server: one image per forward pass, fp32, PyTorch's default threads.
    `per_request`: load the processor and model for every request (seed-style); else once at start (naive)."""
    import torch
    from fastapi import FastAPI, File, UploadFile

    ViTImageProcessor, ViTForImageClassification = _hf()

    def load():
        return (
            ViTImageProcessor.from_pretrained(model_dir),
            ViTForImageClassification.from_pretrained(model_dir, dtype=torch.float32).eval(),
        )  # fp32 even from fp16 weights

    loaded = None if per_request else load()
    app = FastAPI()

    @app.post("/predict")
    def predict(file: UploadFile = File(...)):
        processor, model = load() if per_request else loaded
        return _predict_one(processor, model, file.file.read())

    @app.get("/readyz")
    def readyz():
        return {"ready": True, "threads": torch.get_num_threads()}

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
                    r = await h.post(
                        url + "/predict", files={"file": ("x.png", blobs[(c * 13 + i) % len(blobs)], "image/png")}
                    )
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(lat) if lat else np.array([np.nan])
    ok = int(np.isfinite(lat).sum())
    return dict(
        requests=ok,
        errors=len(errors),
        error_samples=[str(e) for e in errors[:3]],
        wall_s=round(wall, 3),
        images_per_s=ok / wall,
        p50_ms=float(np.nanpercentile(lat, 50) * 1e3),
        p99_ms=float(np.nanpercentile(lat, 99) * 1e3),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(extra: dict) -> dict:
    "This environment without VIT_* settings and thread-count variables, plus `extra`."
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_") and k not in THREAD_ENV}
    return {**env, **extra}


def _start(
    cmd: list, env: dict, log: Path, port: int, cwd: Path, timeout: float = 900
) -> tuple[subprocess.Popen, float, dict]:
    "Start a server: the process, its cold start (seconds from spawning to the first 200 from /readyz), that answer."
    import httpx

    t0 = time.perf_counter()
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{Path(cmd[0]).name} exited ({p.returncode}): {log.read_text()[-3000:]}")
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if r.status_code == 200:
                    return p, time.perf_counter() - t0, r.json()
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"not ready after {timeout:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.05)
    except BaseException:
        _stop(p)
        raise


def _stop(p: subprocess.Popen):
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _cpu_s(pid: int | None = None) -> float:
    "CPU seconds (user + system, all threads) used so far by process `pid` (default: this one)."
    if pid is None:
        return time.process_time()
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
    for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in f.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


# -- packages, stores, export ----------------------------------------------------------------------


def _fingerprint(preset: str | None, pkg_src: Path | None) -> str:
    import torch, transformers
    from vit_nbdev.config import PRESETS

    if preset:
        what = dict(preset=PRESETS[preset], seed=0, torch=torch.__version__, transformers=transformers.__version__)
    else:
        what = dict(
            path=str(pkg_src.resolve()),
            files={p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(pkg_src.glob("*")) if p.is_file()},
        )
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def prepare_model(name: str, pkg_src: Path | None, base: Path, export: bool) -> dict:
    """The package folder, the store it is registered in (as `latest`) and, unless `export` is off,
    `vit-models export` run once for it. Kept in `base` and reused while the preset (or the package's files) are
    unchanged."""
    import torch
    from vit_nbdev.engine import candidate_names, engine_key, engines_prefix, export_engines
    from vit_nbdev.model import build_model, save_package
    from vit_nbdev.store import open_store

    fp = _fingerprint(None if pkg_src else name, pkg_src)
    if (base / "fingerprint").exists() and (base / "fingerprint").read_text() != fp:
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    (base / "fingerprint").write_text(fp)
    if pkg_src:
        pkg_dir = pkg_src
    else:
        pkg_dir = base / "package"
        if not (pkg_dir / "model.safetensors").exists():
            torch.manual_seed(0)
            model, pre = build_model(name)
            tmp = base / ".package.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_package(model, pre, tmp, card={"note": "random weights, torch.manual_seed(0) (benchmark)"})
            shutil.rmtree(pkg_dir, ignore_errors=True)
            tmp.rename(pkg_dir)
    store_dir = base / ("store" if export else "store-plain")  # two stores: --no-export never sees the exported engines
    st = open_store(store_dir)
    if not st.versions():
        st.register(pkg_dir, aliases=["latest"])
    version = st.resolve("latest")
    out = dict(package=str(pkg_dir), store=str(store_dir), version=version, export=None)
    if export:
        have = set(st.list(engines_prefix(version)))
        missing = [n for n in candidate_names() if f"{engines_prefix(version)}{engine_key(n)}/check.json" not in have]
        t0 = time.perf_counter()
        if missing:
            print(f"  vit-models export {version}: making and checking {', '.join(missing)} ...", flush=True)
            export_engines(st, version, names=missing)
        took = time.perf_counter() - t0
        checks = {}
        for n in candidate_names():
            try:
                c = json.loads(st.get_bytes(f"{engines_prefix(version)}{engine_key(n)}/check.json"))
            except Exception:
                continue
            checks[n] = {
                k: c.get(k) for k in ("agreement", "accuracy", "reference_accuracy", "drop", "eligible", "images")
            }
        out["export"] = dict(
            seconds=round(took, 1),
            made=missing,
            reused=[n for n in candidate_names() if n not in missing],
            checks=checks,
        )
        print(
            f"  export: {took:.1f} s"
            + (f" (made {', '.join(missing)})" if missing else " (all engines reused from the store)"),
            flush=True,
        )
        for n, c in checks.items():
            print(
                f"    {n}: agreement {c['agreement']}, accuracy {c['accuracy']} (fp32 {c['reference_accuracy']}), "
                f"{'eligible' if c['eligible'] else 'NOT eligible'}",
                flush=True,
            )
    return out


# -- the raw forward pass --------------------------------------------------------------------------


def raw_forward(
    m: dict, engines: list[tuple[str, int]], images, batch: int, seconds: float, folder: Path
) -> list[dict]:
    """Images/s and CPU ms/image of each `(engine, threads)` on one batch of `batch` images, in this process: a
    warm-up call, then calls for about `seconds` (at least one)."""
    import torch
    from vit_nbdev.data import preprocess
    from vit_nbdev.engine import build_engine, sync_engines
    from vit_nbdev.model import load_package
    from vit_nbdev.store import open_store

    pkg, default_threads = load_package(m["package"]), torch.get_num_threads()
    folder = sync_engines(open_store(m["store"]), m["version"], folder)  # the exported graphs, if any (else made here)
    x = preprocess(images[:batch], pkg.preprocess)
    out = []
    for name, threads in engines:
        try:
            e = build_engine(name, pkg, threads, folder)
        except Exception as ex:
            out.append(dict(engine=name, threads=threads, error=repr(ex)))
            print(f"  raw {name}×{threads}: {ex!r}", flush=True)
            continue
        e(x)  # warm-up
        n, t0, c0 = 0, time.perf_counter(), _cpu_s()
        while n == 0 or time.perf_counter() - t0 < seconds:
            e(x)
            n += len(x)
        wall = time.perf_counter() - t0
        out.append(
            dict(
                engine=name,
                threads=threads,
                batch=len(x),
                images=n,
                images_per_s=n / wall,
                cpu_ms_per_image=(_cpu_s() - c0) * 1e3 / n,
            )
        )
        print(
            f"  raw forward {name}×{threads} (batch {len(x)}): {out[-1]['images_per_s']:.1f} img/s, "
            f"{out[-1]['cpu_ms_per_image']:.1f} CPU ms/img",
            flush=True,
        )
        del e
    torch.set_num_threads(default_threads)  # an engine sets the calling thread's count
    return out


# -- one model -------------------------------------------------------------------------------------


def _engine_str(e: dict | None) -> str:
    if not e:
        return "n/a"
    skipped = f"; {len(e['skipped'])} engine(s) skipped" if e.get("skipped") else ""
    rate = f"{e['images_per_s']:.1f} img/s at load" if e.get("images_per_s") is not None else ""
    return f"{e['name']}×{e['threads']}" + (f" ({rate}{skipped})" if rate or skipped else "")


def _say(label: str, s: dict):
    print(
        f"  {label}: {s['images_per_s']:.2f} req/s, p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
        f"{s['cpu_ms_per_image']:.1f} CPU ms/img, "
        f"errors {s['errors']}{' ' + str(s['error_samples']) if s['errors'] else ''}, "
        f"cold start {s['cold_start_s']:.2f} s"
        + (f", engine {_engine_str(s.get('engine'))}" if s["server"].startswith("vit-serve") else ""),
        flush=True,
    )


def _ratio(s: dict, other: dict | None, key: str = "images_per_s") -> float | None:
    "Throughput of `s` over `other`; for CPU per image, how many times less `s` needs."
    if not other or not other.get(key) or not s.get(key):
        return None
    return s[key] / other[key] if key == "images_per_s" else other[key] / s[key]


def bench_model(name: str, m: dict, a, work: Path, images, blobs) -> dict:
    from vit_nbdev.engine import cpu_budget

    res = dict(model=name, package=m["package"], version=m["version"], export=m["export"], servers=[])
    clients, seconds = a.clients, a.seconds
    with open(Path(m["package"]) / "config.json") as f:
        res["image_size"] = json.load(f)["image_size"]

    def run(label, key, cmd, env, warm_clients, warm_s):
        port = _free_port()
        log = work / f"{name}-{key}.log"
        cwd = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=work))
        p, cold, ready = _start([*cmd, "--port", str(port)], _server_env(env), log, port, cwd)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(_load(url, blobs, warm_clients, warm_s))  # warm-up (imports, page cache, batch sizes)
            m0 = _metrics(url) if key.startswith("vit-serve") else None
            s = _timed_load(url, blobs, clients, seconds, p.pid)
            if m0 is not None:
                m1 = _metrics(url)
                s["mean_batch"] = (m1["vit_batch_size_sum"] - m0["vit_batch_size_sum"]) / max(
                    1, m1["vit_batch_size_count"] - m0["vit_batch_size_count"]
                )
        finally:
            _stop(p)
        s.update(
            server=label, key=key, cold_start_s=round(cold, 2), engine=ready.get("engine"), threads=ready.get("threads")
        )
        res["servers"].append(s)
        _say(label, s)
        return s

    pkg = m["package"]
    me = [sys.executable, str(Path(__file__).resolve())]
    run("seed-style (model loaded per request)", "seed", [*me, "--seed-server", pkg], {}, 2, min(1.0, seconds / 5))
    run(
        "naive (loaded once, fp32, 1 image/forward)",
        "naive",
        [*me, "--naive-server", pkg],
        {},
        clients,
        min(3.0, seconds / 5),
    )
    serve = [str(BIN / "vit-serve"), "--host", "127.0.0.1"]
    runs = [("vit-serve (auto)", "vit-serve", {})] + [
        (f"vit-serve (VIT_ENGINE={e})", f"vit-serve-{e}", {"VIT_ENGINE": e}) for e in a.engine_list
    ]
    for label, key, env in runs:
        cache = Path(tempfile.mkdtemp(prefix="vit-cache-", dir=work))  # an empty cache: a fresh instance
        try:
            run(
                label,
                key,
                serve,
                {"VIT_STORE": m["store"], "VIT_CACHE": str(cache), **env},
                clients,
                min(3.0, seconds / 5),
            )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(
                Path(m["store"]) / "telemetry", ignore_errors=True
            )  # the store may live in --cache: keep it clean
    eng = next(s for s in res["servers"] if s["key"] == "vit-serve").get("engine")
    if not eng:
        print("  engine: n/a (/readyz has no engine object)", flush=True)
    threads = int(eng["threads"]) if eng else cpu_budget()
    raw = [("torch-fp32", threads)] + ([(eng["name"], threads)] if eng and eng["name"] != "torch-fp32" else [])
    res["raw"] = raw_forward(
        m, raw, images, a.raw_batch or min(clients, 32), a.raw_seconds, work / f"{name}-raw-engines"
    )

    fp32 = next((r for r in res["raw"] if r["engine"] == "torch-fp32" and "images_per_s" in r), None)
    by = {s["key"]: s for s in res["servers"]}
    res["ratios"] = []
    for s in res["servers"]:
        if not s["key"].startswith("vit-serve"):
            continue
        e = s.get("engine") or {}
        own = next(
            (
                r
                for r in res["raw"]
                if (r["engine"], r["threads"]) == (e.get("name"), e.get("threads")) and "images_per_s" in r
            ),
            None,
        )
        res["ratios"].append(
            dict(
                server=s["server"],
                engine=e.get("name"),
                vs_seed=_ratio(s, by["seed"]),
                vs_naive=_ratio(s, by["naive"]),
                vs_raw_fp32=_ratio(s, fp32),
                vs_raw_own_engine=_ratio(s, own),
                cpu_vs_seed=_ratio(s, by["seed"], "cpu_ms_per_image"),
                cpu_vs_naive=_ratio(s, by["naive"], "cpu_ms_per_image"),
                cpu_vs_raw_fp32=_ratio(s, fp32, "cpu_ms_per_image"),
            )
        )
    return res


# -- report ----------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}", none="–") -> str:
    return none if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def _cold(s: dict) -> str:
    "Cold start, and of it the seconds vit-serve spent choosing its engine."
    e = s.get("engine") or {}
    return f"{s['cold_start_s']:.2f}" + (f" (choosing {e['seconds']:.1f})" if e.get("seconds") is not None else "")


def table(r: dict, clients: int) -> str:
    ex = r["export"]
    exp = (
        "not run (--no-export)"
        if ex is None
        else f"{ex['seconds']:.1f} s"
        + (f" (made {', '.join(ex['made'])})" if ex["made"] else " (reused: already in the store)")
    )
    rows = [f"### {r['model']} ({r['image_size']} px)\n", f"Package `{r['package']}`; `vit-models export`: {exp}.", ""]
    if ex and ex["checks"]:
        rows.append(
            "Engine checks (top-1 agreement with fp32 / accuracy, on the check images): "
            + "; ".join(
                f"{n} {_f(c['agreement'], '{:.3f}')} / {_f(c['accuracy'], '{:.3f}')}"
                + ("" if c["eligible"] else " (not eligible)")
                for n, c in ex["checks"].items()
            )
            + ".\n"
        )
    rows += [
        "| server | req/s (= img/s) | p50 ms | p99 ms | errors | CPU ms / image | engine (measured at load) "
        "| cold start s (of which choosing the engine) | requests |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in r["servers"]:
        label = s["server"] + (f", mean batch {s['mean_batch']:.1f}" if s.get("mean_batch") else "")
        engine = (
            _engine_str(s["engine"])
            if s["key"].startswith("vit-serve")
            else f"torch fp32 eager ×{s.get('threads') or '?'}"
        )
        rows.append(
            f"| {label} | {s['images_per_s']:.2f} | {_f(s['p50_ms'], '{:.0f}')} | {_f(s['p99_ms'], '{:.0f}')} "
            f"| {s['errors']} | "
            f"{s['cpu_ms_per_image']:.1f} | {engine} | {_cold(s)} | {s['requests']} |"
        )
    for x in r["raw"]:
        if "images_per_s" not in x:
            rows.append(f"| raw forward {x['engine']}×{x['threads']} | failed: {x['error'][:80]} | | | | | | | |")
            continue
        rows.append(
            f"| raw forward, in process (batch {x['batch']}) | {x['images_per_s']:.2f} | – | – | – "
            f"| {x['cpu_ms_per_image']:.1f} | "
            f"{x['engine']}×{x['threads']} | – | {x['images']} |"
        )
    return "\n".join(rows)


def ratio_table(results: list[dict]) -> str:
    x = lambda v: _f(v, "{:.1f}×")
    rows = [
        "| model | vit-serve | / seed-style | / naive | / raw fp32 forward | / raw forward of its engine |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for q in r["ratios"]:
            rows.append(
                f"| {r['model']} | {q['server']} ({q['engine'] or 'engine n/a'}) "
                f"| {x(q['vs_seed'])} ({x(q['cpu_vs_seed'])}) | {x(q['vs_naive'])} ({x(q['cpu_vs_naive'])}) "
                f"| {x(q['vs_raw_fp32'])} ({x(q['cpu_vs_raw_fp32'])}) | {x(q['vs_raw_own_engine'])} |"
            )
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default="vit-cifar-small,vit-b16", help="presets, comma-separated (random weights); '' for none"
    )
    ap.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an existing model package to bench too (repeatable)",
    )
    ap.add_argument("--seconds", type=float, default=25, help="timed load per server")
    ap.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients, one image per request")
    ap.add_argument(
        "--engines",
        default="",
        help="also run vit-serve pinned to each of these engines (VIT_ENGINE), e.g. onnx-int8,torch-fp32",
    )
    ap.add_argument(
        "--cache",
        help="keep packages, stores and exported engines here between runs (the ViT-B/16 export takes many minutes)",
    )
    ap.add_argument(
        "--no-export", action="store_true", help="skip `vit-models export`: vit-serve checks what fits its start budget"
    )
    ap.add_argument(
        "--raw-batch", type=int, default=0, help="images per raw forward pass (default: --clients, at most 32)"
    )
    ap.add_argument(
        "--raw-seconds",
        type=float,
        default=5,
        help="about how long each raw forward pass is timed (after a warm-up call)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--seed-server", help=argparse.SUPPRESS)
    ap.add_argument("--naive-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.seed_server or a.naive_server:
        import uvicorn

        app = baseline_app(a.seed_server or a.naive_server, per_request=bool(a.seed_server))
        return uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")

    from vit_nbdev.config import ENGINES, PRESETS

    a.engine_list = [e for e in a.engines.split(",") if e]
    if bad := [e for e in a.engine_list if e not in ENGINES]:
        ap.error(f"unknown engine(s) {bad}: choose from {', '.join(ENGINES)}")
    models = [(p, None) for p in a.models.split(",") if p]
    if bad := [p for p, _ in models if p not in PRESETS]:
        ap.error(f"unknown preset(s) {bad}: presets are {', '.join(PRESETS)}")
    for spec in a.package:
        n, sep, d = spec.partition("=")
        if not sep or not n or not (Path(d) / "config.json").exists():
            ap.error(f"--package {spec!r}: expected NAME=DIR of a model package")
        models.append((n, Path(d).expanduser().resolve()))  # the servers run elsewhere
    if not models:
        ap.error("nothing to bench: give --models and/or --package")

    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # `timeout`, `kill`: still stop the servers (finally blocks)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    keep = Path(a.cache).expanduser().resolve() if a.cache else work
    os.environ["VIT_CACHE"] = str(keep / "vit-cache")  # this process's dataset and engine cache: never ~/.cache
    import torch
    from PIL import Image
    from vit_nbdev.data import load_cifar10
    from vit_nbdev.engine import host_info
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # no "Loading weights" bars in the report
    with contextlib.suppress(ImportError):
        import datasets

        datasets.logging.set_verbosity_error()
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    host = host_info()
    env = dict(
        host,
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=ort,
        cpu_count=os.cpu_count(),
        torch_default_threads=torch.get_num_threads(),
        load_before=os.getloadavg(),
    )
    print(
        f"CPU: {host['cpu']}\nflags: {', '.join(host['flags']) or 'none'}; bf16: {host['bf16']}\n"
        f"CPU budget {host['cpus']} (os.cpu_count {os.cpu_count()}); torch {torch.__version__}, "
        f"onnxruntime {ort or 'not installed'}; "
        f"Python {env['python']}; load average {env['load_before']}\n"
        f"{a.clients} clients, {a.seconds:g} s per server, one 32×32 PNG per request",
        flush=True,
    )
    images = load_cifar10(progress=False).test.images[:64]
    blobs = []
    for x in images:
        b = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(b, "PNG")
        blobs.append(b.getvalue())
    results = []
    try:
        for name, src in models:
            print(f"{name}:", flush=True)
            m = prepare_model(name, src, keep / name, export=not a.no_export)
            results.append(bench_model(name, m, a, work, images, blobs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["load_after"] = os.getloadavg()
    head = (
        f"CPU: {host['cpu']} (flags {', '.join(host['flags']) or 'none'}; bf16 {host['bf16']}); "
        f"CPU budget {host['cpus']}; torch {env['torch']}, onnxruntime {ort or 'not installed'}.\n"
        f"{a.clients} closed-loop clients, {a.seconds:g} s per server, "
        f"one 32×32 PNG per request (requests/s = images/s); "
        f"load average {tuple(round(v, 2) for v in env['load_before'])} before, "
        f"{tuple(round(v, 2) for v in env['load_after'])} after."
    )
    md = (
        f"{head}\n\n"
        + "\n\n".join(table(r, a.clients) for r in results)
        + "\n\n### Ratios\n\nThroughput of each vit-serve run over the others "
        + "(in brackets: how many times less CPU per image).\n\n"
        + ratio_table(results)
    )
    print("\n" + md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    args = dict(
        models=a.models,
        package=a.package,
        seconds=a.seconds,
        clients=a.clients,
        engines=a.engine_list,
        no_export=a.no_export,
        raw_batch=a.raw_batch,
        raw_seconds=a.raw_seconds,
        cache=a.cache,
    )
    (out / "serve.json").write_text(json.dumps(dict(env=env, args=args, results=results), indent=1, default=str))
    (out / "serve.md").write_text(f"# Serving benchmark\n\n{md}\n")
    print(f"\nwrote {out / 'serve.json'} and {out / 'serve.md'}")


if __name__ == "__main__":
    main()
