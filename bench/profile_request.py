"""One prediction request, end to end: where the time goes (issue "Inference engine", item 4).

For each model package (default: two built with random weights, `torch.manual_seed(0)`: the presets
`vit-cifar-small`, 32 px, and `vit-b16`, 224 px; or `--package DIR`, repeatable), in this process:

- **stages**, timed on their own with the library's public functions: decode (`decode_image`: PNG
  bytes → PIL), preprocess (`image_tensor` + `preprocess` at the native 32 px, what `prepare_image`
  does after decoding, then `to_model_size` to the model's input size), forward (batch of 1:
  `forward_features` + softmax under `torch.inference_mode`, what the fp32 engine runs);
- **the request**: `POST /predict` of one 32×32 CIFAR-10 test image as a PNG (multipart field
  `file`) to `create_app(model=load_package(dir), telemetry=False, engine="torch-fp32",
  threads=N)`, driven by `fastapi.testclient.TestClient` (no sockets). HTTP + batching overhead =
  request − (decode + preprocess + forward), and also, request by request, the request minus its
  own decode/normalise, resize and forward segments (robust to the forward's noise). The request is also cut into segments by probes
  wrapped, in this process only, around `serve.read_uploads`, `serve.prepare_image` (in the decode
  thread pool), `Served.forward` (in the batcher thread) and `serve.to_model_size`, and around the
  ASGI app: how long each hop takes (TestClient → app, multipart parse, thread-pool hop, decode,
  batcher wait, resize, model, response);
- **the forward's ops**: `torch.profiler` (CPU, no shapes), top ops by self CPU time, grouped into
  op families (share of the forward's wall time; what no op accounts for is Python/HF glue and
  dispatch);
- at 1 and 2 intra-op threads (`torch.set_num_threads`; the app pinned to the same count);
- **experiments** for the fixes the profile suggests, interleaved with their baseline in the same
  process (runtime changes to this process's app object only, the library is not edited): no
  batcher wait for a lone request (`batcher.max_wait = 0`), decoding inline instead of the thread
  pool hop (compared per round on the request's overhead, so the forward's noise drops out),
  TorchScript trace + freeze of the forward (where over 5 % of it is outside ops), the engine
  chapter's `torch-int8`; and fresh child processes that start the app first, as `vit-serve`
  does, then time the forward alone, at 2 threads, with `OMP_WAIT_POLICY` unset (fast models
  only) and `PASSIVE`: libgomp's spin-waiting threads can make a 2-thread forward many times
  slower on a busy 2-core host.

Every measurement warms up first and repeats until a time budget (`--seconds`) is spent, at least
`--min-reps` times (at most 4 for a forward over 250 ms, 2 over a second); medians are reported. The CPU time
of the process (all threads) is kept beside the wall time: on a shared machine the ratio shows how
much of the wall time was spent waiting for a CPU.

    python bench/profile_request.py [--package DIR ...] [--threads 1,2] [--seconds 1.5] [--no-child]

Prints the markdown and writes bench/results/profile.md and bench/results/profile.json.
"""

from __future__ import annotations
import argparse, contextlib, dataclasses, datetime, io, json, os, platform, statistics, subprocess, sys, tempfile, time
from concurrent.futures import Executor, Future
from pathlib import Path

import torch
from PIL import Image

from vit_nbdev.data import decode_image, image_tensor, load_cifar10, prepare_image, preprocess, to_model_size
from vit_nbdev.model import build_model, forward_features, load_package, save_package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PRESETS = ("vit-cifar-small", "vit-b16")
T0 = time.perf_counter()


# -- timing ---------------------------------------------------------------------------------------


def summarise(wall: list[float], cpu: list[float] | None = None) -> dict:
    "Median / min / p90 of wall times (ms), and the median process CPU time (ms, all threads)."
    w = sorted(wall)
    out = dict(
        n=len(w),
        median_ms=round(1000 * statistics.median(w), 4),
        min_ms=round(1000 * w[0], 4),
        p90_ms=round(1000 * w[min(len(w) - 1, int(0.9 * len(w)))], 4),
    )
    if cpu:
        out["cpu_median_ms"] = round(1000 * statistics.median(cpu), 4)
    return out


def measure(fn, seconds: float, min_reps: int = 5, max_reps: int = 2000, warmup: int = 1) -> dict:
    "Warm up, then call `fn` until `seconds` have passed and at least `min_reps` times (at most `max_reps`)."
    for _ in range(warmup):
        fn()
    wall, cpu, stop = [], [], time.perf_counter() + seconds
    while len(wall) < max_reps and (len(wall) < min_reps or time.perf_counter() < stop):
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return summarise(wall, cpu)


def ms(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %" if x >= 0.001 else "<0.1 %"


# -- host -----------------------------------------------------------------------------------------


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return dict(
        cpu=cpu,
        cpus=os.cpu_count(),
        affinity=len(os.sched_getaffinity(0)),
        torch=torch.__version__,
        default_threads=torch.get_num_threads(),
        python=platform.python_version(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        loadavg_start=[round(x, 2) for x in os.getloadavg()],
    )


# -- inputs ---------------------------------------------------------------------------------------


def cifar_png(i: int) -> bytes:
    "CIFAR-10 test image `i` (the bundled sample) as PNG bytes, what a client uploads."
    img = load_cifar10(progress=False).test.images[i]
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def make_packages(folder: Path) -> list[Path]:
    out = []
    for preset in PRESETS:
        torch.manual_seed(0)
        model, pre = build_model(preset)
        out.append(save_package(model, pre, folder / preset, card={"version": f"profile-{preset}"}))
        del model
    return out


# -- probes around the serving code (this process only) ------------------------------------------

MARKS: dict[str, float] = {}


def mark(k: str) -> None:
    MARKS[k] = time.perf_counter()


def install_probes() -> None:
    "Wrap the serving module's hops with time marks (module globals and a class attribute of this process)."
    import vit_nbdev.serve as serve

    orig_read, orig_prep, orig_resize, orig_fwd = (
        serve.read_uploads,
        serve.prepare_image,
        serve.to_model_size,
        serve.Served.forward,
    )

    async def read_uploads(*a, **k):
        mark("read0")
        r = await orig_read(*a, **k)
        mark("read1")
        return r

    def prepare(*a, **k):
        mark("prep0")
        r = orig_prep(*a, **k)
        mark("prep1")
        return r

    def resize(*a, **k):
        mark("rs0")
        r = orig_resize(*a, **k)
        mark("rs1")
        return r

    def forward(self, pixels):
        mark("fwd0")
        r = orig_fwd(self, pixels)
        mark("fwd1")
        return r

    serve.read_uploads, serve.prepare_image, serve.to_model_size, serve.Served.forward = (
        read_uploads,
        prepare,
        resize,
        forward,
    )


def probe_asgi(app):
    "The app, with a mark when a request enters and when its last body chunk leaves."

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        mark("app0")

        async def send_(msg):
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                mark("app1")
            await send(msg)

        await app(scope, receive, send_)

    return wrapped


SEGMENTS = [  # name, start mark, end mark, what it is
    (
        "client → app",
        "c0",
        "app0",
        "TestClient builds the multipart body and hands it to the app's event loop (its thread portal)",
    ),
    ("routing + middleware", "app0", "read0", "request id middleware, FastAPI routing, up to reading the body"),
    ("multipart parse", "read0", "read1", "`read_uploads`: the streaming multipart parser"),
    ("thread-pool hop", "read1", "prep0", "`run_in_executor`: until a decode thread starts `prepare_image`"),
    ("decode + normalise", "prep0", "prep1", "`prepare_image` in the decode thread"),
    (
        "to the batcher",
        "prep1",
        "fwd0",
        "back to the event loop, `batcher.submit`, the batcher thread wakes and waits `max_wait_ms` for company",
    ),
    ("resize to model size", "rs0", "rs1", "`to_model_size` in the batcher thread"),
    ("model forward + softmax", None, None, "`Served.forward` minus the resize: the engine, then softmax"),
    ("response", "fwd1", "app1", "future → event loop, top-k, metrics, JSON body"),
    ("app → client", "app1", "c1", "TestClient receives the response"),
]

PROBED = "overhead (probes)"


def segments(m: dict) -> dict:
    out = {}
    for name, a, b, _ in SEGMENTS:
        if name == "model forward + softmax":
            if "fwd0" in m and "fwd1" in m:
                out[name] = m["fwd1"] - m["fwd0"] - (m["rs1"] - m["rs0"] if "rs0" in m and "rs1" in m else 0.0)
        elif a in m and b in m:
            out[name] = m[b] - m[a]
    out["request"] = m["c1"] - m["c0"]
    inner = [out.get(k) for k in ("decode + normalise", "resize to model size", "model forward + softmax")]
    if None not in inner:
        out[PROBED] = out["request"] - sum(inner)  # per request, so the noise of the forward cancels
    return out


class InlineExecutor(Executor):
    "Runs the submitted call at once in the caller's thread (the event loop): no thread hop."

    def submit(self, fn, /, *args, **kwargs):
        f = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


class AppUnderTest:
    "The serving app for `pkg` (engine torch-fp32, `threads` intra-op threads, no telemetry) behind a TestClient."

    def __init__(self, pkg, png: bytes, threads: int):
        from fastapi.testclient import TestClient
        from vit_nbdev.serve import create_app

        t = time.perf_counter()
        self.app = create_app(model=pkg, telemetry=False, engine="torch-fp32", threads=threads)
        self.client = TestClient(probe_asgi(self.app))
        self.client.__enter__()  # lifespan: batcher, decode pool, engine timing, warm-up
        self.startup_s = time.perf_counter() - t
        self.svc = self.app.state.service
        self.files = {"file": ("cifar.png", png, "image/png")}
        self.max_wait, self.pool = self.svc.batcher.max_wait, self.svc.pool

    def request(self) -> dict:
        MARKS.clear()
        mark("c0")
        r = self.client.post("/predict", files=self.files)
        mark("c1")
        if r.status_code != 200:
            raise RuntimeError(f"POST /predict: {r.status_code} {r.text[:300]}")
        body = r.json()
        assert isinstance(body, list) and len(body) == 1 and "label" in body[0], body
        return segments(dict(MARKS))

    def requests(self, seconds: float, min_reps: int, warmup: int = 2) -> dict:
        for _ in range(warmup):
            self.request()
        segs, stop = [], time.perf_counter() + seconds
        cpu = []
        while len(segs) < min_reps or (time.perf_counter() < stop and len(segs) < 500):
            c = time.process_time()
            segs.append(self.request())
            cpu.append(time.process_time() - c)
        keys = [k for k in [*(s[0] for s in SEGMENTS), PROBED, "request"] if all(k in s for s in segs)]
        out = {k: summarise([s[k] for s in segs]) for k in keys}
        out["request"] = summarise([s["request"] for s in segs], cpu)
        from fastapi.responses import JSONResponse

        body = self.client.post("/predict", files=self.files).json()
        out["json_render"] = measure(
            lambda: JSONResponse(body), 0.2, min_reps=20
        )  # the response body's JSON, on its own
        return out

    def setting(self, max_wait: bool = True, pool: bool = True) -> None:
        self.svc.batcher.max_wait = self.max_wait if max_wait else 0.0
        self.svc.pool = self.pool if pool else InlineExecutor()

    def close(self) -> None:
        self.setting()
        self.client.__exit__(None, None, None)


# -- the forward's ops ----------------------------------------------------------------------------

FAMILIES = {  # exact aten op name → family
    "matmul (linear: addmm/mm/bmm)": {
        "addmm",
        "mm",
        "bmm",
        "matmul",
        "linear",
        "baddbmm",
        "mkldnn_linear",
        "_addmm_activation",
    },
    "attention (SDPA kernel)": {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    },
    "layer_norm": {"layer_norm", "native_layer_norm"},
    "gelu": {"gelu"},
    "softmax": {"softmax", "_softmax"},
    "patch embedding (conv)": {
        "conv2d",
        "convolution",
        "_convolution",
        "mkldnn_convolution",
        "_nnpack_spatial_convolution",
        "thnn_conv2d",
        "_slow_conv2d_forward",
    },
    "resize (upsample bilinear)": {
        "upsample_bilinear2d",
        "_upsample_bilinear2d_aa",
        "interpolate",
        "upsample_nearest2d",
    },
    "elementwise (add/mul/div)": {"add", "add_", "mul", "mul_", "div", "div_", "sub", "rsub", "where"},
}
VIEWS = {
    "view",
    "reshape",
    "_reshape_alias",
    "transpose",
    "permute",
    "expand",
    "t",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "_unsafe_view",
    "as_strided",
    "flatten",
    "split",
    "chunk",
    "detach",
    "alias",
    "contiguous",
    "copy_",
    "clone",
    "cat",
    "empty",
    "empty_like",
    "empty_strided",
    "to",
    "_to_copy",
    "stack",
    "resolve_conj",
    "resolve_neg",
    "zeros",
    "fill_",
    "narrow",
    "unbind",
    "lift_fresh",
    "repeat",
    "item",
    "_local_scalar_dense",
    "sum",
    "topk",
    "max",
    "argmax",
}

OUTSIDE = "outside ops (Python, HF modules, dispatch, profiler)"


def family(op: str) -> str:
    n = op.split("::", 1)[-1]
    for fam, names in FAMILIES.items():
        if n in names:
            return fam
    if "scaled_dot_product" in n or "attention" in n:
        return "attention (SDPA kernel)"
    if n in VIEWS:
        return "views, copies, small ops"
    return "other ops"


def op_profile(model, pre, pixels: torch.Tensor, reps: int, top: int = 12, warm: bool = True) -> dict:
    "Top ops by self CPU time per forward (resize + forward + softmax, as `Served.forward`), grouped into families."
    from torch.profiler import ProfilerActivity, profile

    x = pixels[None]
    with torch.inference_mode():
        fwd = lambda: forward_features(model, to_model_size(x, pre))[1].softmax(-1)
        if warm:
            fwd()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t = time.perf_counter()
            for _ in range(reps):
                fwd()
            wall_ms = 1000 * (time.perf_counter() - t) / reps
    ops = [
        dict(op=e.key, self_ms=e.self_cpu_time_total / 1000 / reps, calls=e.count / reps) for e in prof.key_averages()
    ]
    ops = [o for o in ops if o["self_ms"] > 0]
    ops.sort(key=lambda o: -o["self_ms"])
    in_ops = sum(o["self_ms"] for o in ops)
    fams: dict[str, float] = {}
    for o in ops:
        fams[family(o["op"])] = fams.get(family(o["op"]), 0.0) + o["self_ms"]
    fams = dict(sorted(fams.items(), key=lambda kv: -kv[1]))
    fams[OUTSIDE] = max(0.0, wall_ms - in_ops)
    r = lambda v: round(v, 4)
    return dict(
        reps=reps,
        wall_ms=r(wall_ms),
        in_ops_ms=r(in_ops),
        families={k: dict(ms=r(v), share=r(v / wall_ms)) for k, v in fams.items()},
        top=[
            dict(
                op=o["op"],
                calls=round(o["calls"], 1),
                self_ms=r(o["self_ms"]),
                share=r(o["self_ms"] / wall_ms),
                family=family(o["op"]),
            )
            for o in ops[:top]
        ],
    )


# -- one model at one thread count ----------------------------------------------------------------


def reps_for(ms_: float, a) -> int:
    "Fewer repeats for slow forwards: 2 over a second, 4 over 250 ms (within the time budget, more)."
    return 2 if ms_ > 1000 else min(4, a.min_reps) if ms_ > 250 else a.min_reps


def stage_times(pkg, png: bytes, a) -> dict:
    "decode, preprocess (normalise at native size, resize to model size), forward (batch 1), each on its own."
    pre, model = pkg.preprocess, pkg.model
    native = dataclasses.replace(pre, image_size=pre.native_size)
    im = decode_image(png, draft_size=2 * pre.native_size)
    px = preprocess(image_tensor(im)[None], native)[0]
    x = to_model_size(px[None], pre)
    fast = dict(seconds=min(a.seconds, 0.6), min_reps=20)
    out = dict(
        decode=measure(lambda: decode_image(png, draft_size=2 * pre.native_size), **fast),
        normalise=measure(lambda: preprocess(image_tensor(im)[None], native), **fast),
        resize=measure(lambda: to_model_size(px[None], pre), **fast),
        prepare_image=measure(lambda: prepare_image(png, pre), **fast),
    )

    def fwd():
        with torch.inference_mode():
            return forward_features(model, x)[1].softmax(-1)

    t = time.perf_counter()
    fwd()
    first = 1000 * (time.perf_counter() - t)  # the warm-up, and how slow it is
    out["forward"] = measure(fwd, a.seconds, min_reps=reps_for(first, a), warmup=0)
    return out


def profile_config(pkg, png: bytes, threads: int, a, parts=("stages", "http", "ops")) -> dict:
    "Stages (or only the forward), the request through the app, the forward's ops, at `threads`; with `app_first`, the app runs first."
    torch.set_num_threads(threads)
    res: dict = dict(threads=threads)
    t0, est = time.perf_counter(), None

    def direct():
        nonlocal est
        if "stages" in parts:
            res["stages"] = stage_times(pkg, png, a)
        else:
            x = to_model_size(prepare_image(png, pkg.preprocess).pixels[None], pkg.preprocess)

            def fwd():
                with torch.inference_mode():
                    return forward_features(pkg.model, x)[1].softmax(-1)

            t = time.perf_counter()
            fwd()
            first = 1000 * (time.perf_counter() - t)
            res["stages"] = dict(forward=measure(fwd, a.seconds, min_reps=reps_for(first, a), warmup=0))
        est = res["stages"]["forward"]["median_ms"]

    def http():
        nonlocal est
        app = AppUnderTest(pkg, png, threads)
        try:
            res["app_startup_s"] = round(app.startup_s, 2)
            res["engine"] = rep = getattr(app.svc.served, "engine_report", None)
            if est is None and rep and rep.get("images_per_s"):
                est = 1000 / rep["images_per_s"]
            slow = (est or 0) > 250
            res["http"] = app.requests(a.seconds, min_reps=reps_for(est or 0, a), warmup=1 if slow else 2)
            if "experiments" in parts and not slow:
                res["experiments"] = request_experiments(app, a)
        finally:
            app.close()

    order = ("http", "direct") if "app_first" in parts else ("direct", "http")
    for step in order:
        if step == "direct" and ("stages" in parts or "forward" in parts):
            direct()
        if step == "http" and "http" in parts:
            http()
    if "ops" in parts:
        slow = est > 250
        res["ops"] = op_profile(
            pkg.model,
            pkg.preprocess,
            prepare_image(png, pkg.preprocess).pixels,
            reps=1 if slow else 3 if est > 40 else 10,
            warm=not slow,
        )
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# -- experiments ----------------------------------------------------------------------------------

ARMS = {
    "baseline (max_wait 5 ms, decode pool)": dict(),
    "max_wait 0 (no batcher wait)": dict(max_wait=False),
    "decode inline (no pool hop)": dict(pool=False),
    "both": dict(max_wait=False, pool=False),
}


def request_experiments(app: AppUnderTest, a) -> dict:
    "The request with and without the batcher wait and the thread-pool hop, interleaved round by round (fast models only)."
    rounds = max(a.min_reps, 12)
    got = {k: [] for k in ARMS}
    stop = time.perf_counter() + 3 * a.seconds
    r = 0
    while r < rounds or (time.perf_counter() < stop and r < 200):
        for k, kw in ARMS.items():
            app.setting(**kw)
            got[k].append(app.request())
        r += 1
    app.setting()
    out, base = {}, got[next(iter(ARMS))]
    for k, segs in got.items():
        out[k] = {
            s: summarise([g[s] for g in segs])
            for s in (
                "request",
                PROBED,
                "thread-pool hop",
                "decode + normalise",
                "to the batcher",
                "model forward + softmax",
                "response",
            )
            if all(s in g for g in segs)
        }
        if all(
            PROBED in g for g in segs + base
        ):  # paired by round, on the overhead: the forward's noise does not enter
            d = [b[PROBED] - g[PROBED] for b, g in zip(base, segs, strict=True)]
            out[k]["paired"] = dict(
                median_saved_ms=round(1000 * statistics.median(d), 4),
                faster_share=round(sum(x > 0 for x in d) / len(d), 3),
            )
    return out


def forward_experiments(pkg, png: bytes, threads: int, a, slow: bool, jit: bool = True) -> dict:
    "Eager fp32 vs TorchScript trace + freeze (`jit`) vs the engine chapter's torch-int8, interleaved."
    torch.set_num_threads(threads)
    x = to_model_size(prepare_image(png, pkg.preprocess).pixels[None], pkg.preprocess)

    class Features(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, px):
            return forward_features(self.m, px)

    arms, notes = {}, {}
    with torch.inference_mode():
        ref = forward_features(pkg.model, x)[1]
        arms["eager fp32"] = lambda: forward_features(pkg.model, x)
        if not jit:
            notes["jit"] = (
                "not tried: under 5 % of the forward is outside ops, so removing Python/module glue cannot gain much"
            )
        else:
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = time.perf_counter()
                    traced = torch.jit.freeze(torch.jit.trace(Features(pkg.model).eval(), x, strict=False))
                    traced(x)
                    traced(x)
                    notes["jit build_s"] = round(time.perf_counter() - t, 2)
                notes["jit max|Δlogits|"] = float((traced(x)[1] - ref).abs().max())
                x2 = torch.cat([x, x.flip(-1)])
                notes["jit batch-2 max|Δlogits|"] = float(
                    (traced(x2)[1] - forward_features(pkg.model, x2)[1]).abs().max()
                )
                arms["TorchScript trace+freeze"] = lambda: traced(x)
            except Exception as e:
                notes["jit"] = f"failed: {type(e).__name__}: {e}"[:300]
        try:
            from vit_nbdev.engine import build_engine

            t = time.perf_counter()
            e8 = build_engine("torch-int8", pkg, threads)
            notes["int8 build_s"] = round(time.perf_counter() - t, 2)
            notes["int8 max|Δlogits|"] = float((e8(x)[1] - ref).abs().max())
            notes["int8 top-1 same"] = bool(e8(x)[1].argmax() == ref.argmax())
            arms["engine torch-int8"] = lambda: e8(x)
        except Exception as e:
            notes["int8"] = f"failed: {type(e).__name__}: {e}"[:300]
        for f in arms.values():
            f()
        rounds = 4 if slow else a.min_reps * 2
        got = {k: [] for k in arms}
        stop = time.perf_counter() + (0 if slow else a.seconds * 2)
        r = 0
        while r < rounds or (time.perf_counter() < stop and r < 300):
            for k, f in arms.items():
                t = time.perf_counter()
                f()
                got[k].append(time.perf_counter() - t)
            r += 1
    return dict(threads=threads, arms={k: summarise(v) for k, v in got.items()}, notes=notes)


# -- child process: OMP_WAIT_POLICY=PASSIVE ------------------------------------------------------


def child_main(spec: dict) -> None:
    "A fresh process, as the service starts: the app first (request), then the direct forward, at each thread count over 1; JSON on the last line."
    a = argparse.Namespace(**spec["args"])
    install_probes()
    png = cifar_png(a.image)
    out = {}
    for d in spec["packages"]:
        pkg = load_package(d)
        out[Path(d).name] = {
            str(t): profile_config(pkg, png, t, a, parts=("app_first", "http", "forward"))
            for t in spec["threads"]
            if t > 1
        }
    print(json.dumps(dict(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), results=out)))


def run_child(packages: list[Path], threads: list[int], a, policy: str | None) -> dict:
    "`child_main` under `OMP_WAIT_POLICY=policy` (None: unset, libgomp's default)."
    spec = dict(
        packages=[str(p) for p in packages],
        threads=threads,
        args=dict(seconds=min(a.seconds, 1.0), min_reps=a.min_reps, image=a.image),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=a.child_timeout,
    )
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}): {p.stderr[-1500:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res


# -- report ---------------------------------------------------------------------------------------


def stage_rows(cfg: dict) -> list[tuple[str, float | None]]:
    s, req = cfg["stages"], cfg["http"]["request"]["median_ms"]
    dec, norm, rs, fw = (s[k]["median_ms"] for k in ("decode", "normalise", "resize", "forward"))
    return [
        ("decode (PNG bytes → PIL, `decode_image`)", dec),
        ("preprocess: to tensor + normalise at 32 px", norm),
        ("preprocess: resize to the model's input size (`to_model_size`)", rs),
        ("forward, batch 1 (`forward_features` + softmax)", fw),
        (
            "HTTP + batching overhead (request − the stages above)",
            req - (dec + norm + rs + fw) if req > dec + norm + rs + fw else None,
        ),
        (
            "HTTP + batching overhead, within the same requests (request − its own decode/normalise, resize and forward segments)",
            cfg["http"].get(PROBED, {}).get("median_ms"),
        ),
        ("**request** (`POST /predict` via TestClient)", req),
    ]


def model_section(name: str, pkg_info: dict, cfgs: dict) -> list[str]:
    ts = list(cfgs)
    L = [f"## {name} ({pkg_info['image_size']} px input, {pkg_info['params_m']:.1f} M parameters)", ""]
    L += [
        "### Stages of one request",
        "",
        "| stage | " + " | ".join(f"{t} thread{'s' * (t != '1')}: median ms | share" for t in ts) + " |",
        "|---|" + "---:|---:|" * len(ts),
    ]
    rows = {t: stage_rows(cfgs[t]) for t in ts}
    for i, (label, _) in enumerate(rows[ts[0]]):
        cells = []
        for t in ts:
            v, req = rows[t][i][1], cfgs[t]["http"]["request"]["median_ms"]
            cells += [ms(v), "–" if v is None else "> request" if v > req else pct(v / req)]
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    reps = "; ".join(
        f"{t} thread{'s' * (t != '1')}: forward ×{cfgs[t]['stages']['forward']['n']}, request ×{cfgs[t]['http']['request']['n']}, "
        f"request CPU {ms(cfgs[t]['http']['request'].get('cpu_median_ms'))} ms of {ms(cfgs[t]['http']['request']['median_ms'])} ms wall"
        for t in ts
    )
    L += [
        "",
        "The first overhead row subtracts medians taken at different moments (and, for the forward, in another thread); the second "
        "subtracts, request by request, the stages timed inside that request: read the second where the forward is slow or noisy.",
    ]
    odd = [t for t in ts if stage_rows(cfgs[t])[4][1] is None]
    if odd:
        L += [
            "",
            f"At {', '.join(odd)} threads the forward timed on its own (in the script's main thread) was slower than the whole request, "
            "whose forward runs in the batcher thread ("
            + ", ".join(f"{ms(cfgs[t]['http']['model forward + softmax']['median_ms'])} ms" for t in odd)
            + "): not the same OpenMP conditions, so no overhead is derived; see *Intra-op threads and OpenMP's wait policy* below.",
        ]
    L += [
        "",
        f"Repeats (medians over): {reps}. `prepare_image` as one call (decode + normalise): "
        + ", ".join(f"{ms(cfgs[t]['stages']['prepare_image']['median_ms'])} ms ({t}t)" for t in ts)
        + ".",
        "",
    ]
    L += [
        "### Inside the request (probes on the serving code's hops; medians, so they need not add up)",
        "",
        "| segment | " + " | ".join(f"{t}t ms" for t in ts) + " | what it is |",
        "|---|" + "---:|" * len(ts) + "---|",
    ]
    for seg, *_, what in SEGMENTS:
        if all(seg in cfgs[t]["http"] for t in ts):
            L.append(f"| {seg} | " + " | ".join(ms(cfgs[t]["http"][seg]["median_ms"]) for t in ts) + f" | {what} |")
    L.append("| **request** | " + " | ".join(f"**{ms(cfgs[t]['http']['request']['median_ms'])}**" for t in ts) + " | |")
    L += [
        "",
        "The JSON body alone (`JSONResponse` of the answer): "
        + ", ".join(
            f"{ms(cfgs[t]['http']['json_render']['median_ms'])} ms ({t}t)"
            for t in ts
            if "json_render" in cfgs[t]["http"]
        )
        + ".",
    ]
    L += [
        "",
        "### Forward: op families (torch.profiler, self CPU time per forward, share of the profiled forward's wall time)",
        "",
        "| op family | " + " | ".join(f"{t}t ms | share" for t in ts) + " |",
        "|---|" + "---:|---:|" * len(ts),
    ]
    fams = list(dict.fromkeys(f for t in ts for f in cfgs[t]["ops"]["families"]))
    for f in fams:
        L.append(
            f"| {f} | "
            + " | ".join(
                f"{ms(cfgs[t]['ops']['families'][f]['ms'])} | {pct(cfgs[t]['ops']['families'][f]['share'])}"
                if f in cfgs[t]["ops"]["families"]
                else "– | –"
                for t in ts
            )
            + " |"
        )
    L.append(
        "| **profiled forward (wall)** | " + " | ".join(f"**{ms(cfgs[t]['ops']['wall_ms'])}** | " for t in ts) + " |"
    )
    L += [
        "",
        "Profiled over "
        + ", ".join(f"{cfgs[t]['ops']['reps']} forward(s) at {t}t" for t in ts)
        + " (resize + forward + softmax, as `Served.forward`), in the script's main thread"
        + (
            ": at 2 threads under the same OpenMP conditions as the forward timed alone, so per-op times there include waiting for the "
            "second thread (see *Intra-op threads and OpenMP's wait policy*)"
            if len(ts) > 1
            else ""
        )
        + ". Top ops:",
        "",
    ]
    for t in ts:
        L += [f"| op ({t} thread{'s' * (t != '1')}) | calls | self ms | share | family |", "|---|---:|---:|---:|---|"]
        L += [
            f"| `{o['op']}` | {o['calls']:g} | {ms(o['self_ms'])} | {pct(o['share'])} | {o['family']} |"
            for o in cfgs[t]["ops"]["top"]
        ]
        L.append("")
    return L


def experiments_section(R: dict) -> list[str]:
    L = ["## Experiments (fixes tried in this process, interleaved with their baseline)", ""]
    for name, m in R["models"].items():
        exp = m.get("request_experiments")
        if exp:
            L += [
                f"**{name}, request, {exp['threads']} thread(s)** ({exp['arms'][next(iter(exp['arms']))]['request']['n']} interleaved rounds):",
                "",
                "Overhead = each request minus its own decode/normalise, resize and forward segments; *saved* = the median over rounds of "
                "(baseline's overhead − this setting's overhead) in the same round, and the share of rounds where this setting's was lower.",
                "",
                "| setting | request median ms | overhead ms | saved ms (rounds faster) | thread-pool hop | decode + normalise | to the batcher | model forward + softmax | response |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for k, v in exp["arms"].items():
                pr = v.get("paired")
                L.append(
                    f"| {k} | {ms(v['request']['median_ms'])} | **{ms(v.get(PROBED, {}).get('median_ms'))}** | "
                    + (
                        f"{ms(pr['median_saved_ms'])} ({pct(pr['faster_share'])})"
                        if pr and k != next(iter(exp['arms']))
                        else "–"
                    )
                    + " | "
                    + " | ".join(
                        ms(v.get(sg, {}).get("median_ms"))
                        for sg in (
                            "thread-pool hop",
                            "decode + normalise",
                            "to the batcher",
                            "model forward + softmax",
                            "response",
                        )
                    )
                    + " |"
                )
            L.append("")
        fx = m.get("forward_experiments")
        if fx:
            L += [
                f"**{name}, forward (batch 1), {fx['threads']} thread(s)** ({next(iter(fx['arms'].values()))['n']} interleaved rounds):",
                "",
                "| forward | median ms | min ms | vs eager |",
                "|---|---:|---:|---:|",
            ]
            base = fx["arms"]["eager fp32"]["median_ms"]
            for k, v in fx["arms"].items():
                L.append(f"| {k} | {ms(v['median_ms'])} | {ms(v['min_ms'])} | {base / v['median_ms']:.2f}× |")
            L += [
                "",
                "Notes: "
                + "; ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in fx["notes"].items()),
                "",
            ]
    ch = R.get("children") or {}
    if ch:
        L += [
            "### Intra-op threads and OpenMP's wait policy",
            "",
            "The same forward at 2 threads, in different processes: this one (stages timed first, in the main thread, then the app), "
            "and fresh child processes that start the app first, as `vit-serve` does, then time the forward on its own in their main thread. "
            "`OMP_WAIT_POLICY` unset is libgomp's default (threads spin-wait between parallel regions); `PASSIVE` makes them sleep. "
            + "; ".join(
                f"{k} child: {v.get('seconds', '?')} s" + (f" ({v['error'][:200]})" if "error" in v else "")
                for k, v in ch.items()
            )
            + ".",
            "",
            "| model | threads | process | OMP_WAIT_POLICY | request ms | forward inside the request ms | forward alone ms (main thread) |",
            "|---|---:|---|---|---:|---:|---:|",
        ]
        for name, m in R["models"].items():
            for t, c in m["threads"].items():
                L.append(
                    f"| {name} | {t} | this one | unset | {ms(c['http']['request']['median_ms'])} | "
                    f"{ms(c['http']['model forward + softmax']['median_ms'])} | {ms(c['stages']['forward']['median_ms'])} |"
                )
                if t == "1":
                    continue
                for pol, v in ch.items():
                    c2 = v.get("results", {}).get(name, {}).get(t)
                    if not c2:
                        continue
                    L.append(
                        f"| {name} | {t} | fresh, app first | {'unset' if pol == 'default' else pol} | {ms(c2['http']['request']['median_ms'])} | "
                        f"{ms(c2['http']['model forward + softmax']['median_ms'])} | {ms(c2['stages']['forward']['median_ms'])} |"
                    )
        L.append("")
    return L


def findings(R: dict) -> list[str]:
    "The 'What the profile shows' list, worded from this run's numbers (each point only where its measurements exist)."
    F = ["## What the profile shows", ""]
    M = R["models"]
    g = lambda c, seg: c["http"][seg]["median_ms"] if seg in c["http"] else None
    fast = {
        n: m for n, m in M.items() if "1" in m["threads"] and m["threads"]["1"]["stages"]["forward"]["median_ms"] < 250
    }

    def bullet(fn):
        try:
            if text := fn():
                F.append("- " + text)
        except (KeyError, TypeError, ZeroDivisionError, StopIteration) as e:
            F.append(f"- *(point skipped: {type(e).__name__} {e})*")

    for name, m in M.items():
        c = m["threads"].get("1")
        if not c:
            continue

        def where(name=name, c=c):
            req, fw = c["http"]["request"]["median_ms"], c["http"]["model forward + softmax"]["median_ms"]
            over = c["http"][PROBED]["median_ms"]
            fam = c["ops"]["families"]
            share = lambda f: fam.get(f, {}).get("share", 0)
            return (
                f"**{name} (1 thread): the forward is {pct(fw / req)} of the request** ({ms(fw)} of {ms(req)} ms inside the request, "
                f"{ms(c['stages']['forward']['median_ms'])} ms timed alone; HTTP + batching overhead {ms(over)} ms, {pct(over / req)}, "
                f"measured within the same requests). In the forward, the linear layers' matmuls take "
                f"{pct(share('matmul (linear: addmm/mm/bmm)'))}, the attention kernel {pct(share('attention (SDPA kernel)'))}, "
                f"GELU + layer norm + adds {pct(share('gelu') + share('layer_norm') + share('elementwise (add/mul/div)'))}, "
                f"and {pct(share(OUTSIDE))} is spent outside any op (Python, the HF modules, dispatch; the profiler inflates this part). "
                f"The request used {ms(c['http']['request'].get('cpu_median_ms'))} ms of CPU for {ms(req)} ms of wall time: "
                f"the rest is sleeping (the batcher's wait) and waiting for a core on this shared machine."
            )

        bullet(where)

    def small_stages():
        big = max(M.values(), key=lambda m: m["package"]["image_size"])
        c, cb = next(iter(M.values()))["threads"]["1"], big["threads"]["1"]
        rs = cb["stages"]["resize"]["median_ms"]
        return (
            f"**Decoding, preprocessing, resizing and the JSON answer cost next to nothing**: PNG decode {ms(c['stages']['decode']['median_ms'])} ms, "
            f"to tensor + normalise {ms(c['stages']['normalise']['median_ms'])} ms, the 32→{big['package']['image_size']} bilinear resize in float "
            f"{ms(rs)} ms ({pct(rs / cb['http']['request']['median_ms'])} of that model's request; {pct(cb['ops']['families'].get('resize (upsample bilinear)', {}).get('share', 0))} "
            f"of its profiled forward), the JSON body {ms(c['http']['json_render']['median_ms'])} ms. No fix is worth making there. "
            f"(Inside the request, `prepare_image` in the decode thread takes {ms(g(c, 'decode + normalise'))} ms against "
            f"{ms(c['stages']['prepare_image']['median_ms'])} ms alone: that thread competes for the GIL and a core, still under a millisecond.)"
        )

    bullet(small_stages)

    for name, m in fast.items():
        c = m["threads"]["1"]
        exp = (m.get("request_experiments") or {}).get("arms")

        def overhead(name=name, c=c, exp=exp):
            tc = (g(c, "client → app") or 0) + (g(c, "app → client") or 0)
            txt = (
                f"**{name}: where the HTTP + batching overhead goes.** Of the request, "
                f"{ms(g(c, 'to the batcher'))} ms go from the end of decoding to the start of the forward: `MicroBatcher` makes the first image "
                f"of a batch wait `max_wait_ms` (5 ms) for company even when no other request is in flight. TestClient's own hand-over "
                f"(client → app → client through its thread portal) is {ms(tc)} ms, an artefact of the in-process client (uvicorn and a socket "
                f"replace it in production); routing + multipart parsing {ms((g(c, 'routing + middleware') or 0) + (g(c, 'multipart parse') or 0))} ms; "
                f"the hop into the decode pool {ms(g(c, 'thread-pool hop'))} ms; the response (batcher → event loop, top-k, JSON) {ms(g(c, 'response'))} ms."
            )
            if exp:
                K = (
                    "baseline (max_wait 5 ms, decode pool)",
                    "max_wait 0 (no batcher wait)",
                    "decode inline (no pool hop)",
                    "both",
                )
                b, w0, inl, both = (exp[k]["request"]["median_ms"] for k in K)
                o = [exp[k][PROBED]["median_ms"] for k in K]
                sv = {k: exp[k]["paired"] for k in K[1:]}
                n = exp["both"]["request"]["n"]
                chg = lambda x, y, k: (
                    f"request {ms(b)} → {ms(x)} ms, overhead {ms(o[0])} → {ms(y)} ms (paired: {ms(sv[k]['median_saved_ms'])} ms "
                    f"saved, lower in {pct(sv[k]['faster_share'])} of rounds)"
                )
                gain = lambda k: (
                    sv[k]["median_saved_ms"] > 0.3 and sv[k]["faster_share"] >= 0.6
                )  # beyond the noise between rounds
                txt += (
                    f" **Measured** ({n} interleaved rounds): no batcher wait: {chg(w0, o[1], K[1])}; decoding inline in the event loop "
                    f"instead of the pool: {chg(inl, o[2], K[2])}; both: {chg(both, o[3], K[3])}. "
                )
                w0, inl = K[1], K[2]
                if gain(w0):
                    txt += (
                        "**Fix**: let the batcher skip the wait when nothing can join the batch, e.g. count the requests that are between "
                        "`read_uploads` and `submit` and wait only while some are: a lone request starts at once, concurrent ones still batch "
                        "(a change to `serve`/`batch`, not made here; the gain is for a lone request, concurrent throughput is bench_serve's). "
                    )
                else:
                    txt += "Dropping the batcher wait made no difference beyond this machine's noise here. "
                extra = (
                    sv[K[3]]["median_saved_ms"] - sv[K[1]]["median_saved_ms"]
                )  # what inline decoding adds once the wait is gone
                if gain(inl) and extra > 0.3:
                    txt += (
                        f"Decoding small uploads inline (a few KB, well under a millisecond of work) and keeping the pool for large ones "
                        f"also helps: {ms(sv[inl]['median_saved_ms'])} ms on its own, {ms(extra)} ms on top of no batcher wait. "
                    )
                else:
                    txt += (
                        f"The thread-pool hop itself is {ms(g(c, 'thread-pool hop'))} ms; decoding inline saved {ms(sv[inl]['median_saved_ms'])} ms "
                        f"on its own and {ms(extra)} ms on top of no batcher wait: not worth giving up the pool, which keeps a large image's "
                        f"decode off the event loop. "
                    )
            return txt

        bullet(overhead)

    for name, m in M.items():
        fx = m.get("forward_experiments")
        if not fx:
            continue

        def fwd_fix(name=name, m=m, fx=fx):
            arms, base = fx["arms"], fx["arms"]["eager fp32"]["median_ms"]
            parts = [
                f"{k} {ms(v['median_ms'])} ms ({base / v['median_ms']:.2f}×)"
                for k, v in arms.items()
                if k != "eager fp32"
            ]
            fam = m["threads"]["1"]["ops"]["families"]
            txt = (
                f"**{name}: the forward itself** — eager fp32 {ms(base)} ms at 1 thread; "
                + "; ".join(parts)
                + f" ({next(iter(arms.values()))['n']} interleaved rounds). "
            )
            if "TorchScript trace+freeze" in arms and base / arms["TorchScript trace+freeze"]["median_ms"] >= 1.05:
                txt += (
                    f"A traced + frozen forward gives the same logits (max |Δ| {fx['notes'].get('jit max|Δlogits|', float('nan')):.2g}, also at batch 2) "
                    f"and removes part of the {pct(fam.get(OUTSIDE, {}).get('share', 0))} spent outside ops: a cheap extra engine candidate for "
                    f"small models (TorchScript is in maintenance mode; `torch.compile` would be the longer-lived route but needs a compiler at start-up). "
                )
            elif "TorchScript trace+freeze" in arms:
                txt += "Tracing + freezing the forward gained less than 5 % here: not worth an engine of its own. "
            else:
                txt += f"Only {pct(fam.get(OUTSIDE, {}).get('share', 0))} is outside ops, so tracing was not tried: matmuls are the cost. "
            if "engine torch-int8" in arms:
                txt += (
                    f"The engine chapter's dynamic int8 is the lever for the matmuls (max |Δlogits| {fx['notes'].get('int8 max|Δlogits|', float('nan')):.2g} "
                    f"on random weights; whether it may serve is the engine check's call on the trained model, and `VIT_ENGINE=auto` already times it)."
                )
            return txt

        bullet(fwd_fix)

    def threads_point():
        ch = R.get("children") or {}
        rows = []
        for name, m in M.items():
            c1, c2 = m["threads"].get("1"), m["threads"].get("2")
            if not (c1 and c2):
                continue
            f1, f2 = c1["stages"]["forward"]["median_ms"], c2["stages"]["forward"]["median_ms"]
            s = (
                f"{name}: 1 thread {ms(f1)} ms, 2 threads {ms(f2)} ms ({f2 / f1:.1f}× the 1-thread time) alone in this process's main thread, "
                f"but {ms(g(c2, 'model forward + softmax'))} ms inside the request (1 thread: {ms(g(c1, 'model forward + softmax'))} ms)"
            )
            for pol, v in ch.items():
                r = v.get("results", {}).get(name, {}).get("2")
                if r:
                    s += (
                        f"; fresh process, policy {'unset' if pol == 'default' else pol}: {ms(r['stages']['forward']['median_ms'])} ms alone, "
                        f"{ms(r['http']['model forward + softmax']['median_ms'])} ms inside the request"
                    )
            rows.append(s)
        if not rows:
            return None
        cost, fixed = "", []
        for name, m in M.items():
            c2, pv = m["threads"].get("2"), (ch.get("PASSIVE") or {}).get("results", {}).get(name, {}).get("2")
            if c2 and pv:
                fixed.append(
                    f"{name} {ms(c2['stages']['forward']['median_ms'])} → {ms(pv['stages']['forward']['median_ms'])} ms"
                )
        passive = (
            "; measured on the 2-thread forward timed alone (this process, policy unset → a fresh process with PASSIVE): "
            + ", ".join(fixed)
            if fixed
            else " (not measured in this run: no PASSIVE child)"
        )
        vs = []
        for name, m in M.items():
            c1, pv = m["threads"].get("1"), (ch.get("PASSIVE") or {}).get("results", {}).get(name, {}).get("2")
            if c1 and pv:
                vs.append(
                    f"{name} {ms(pv['stages']['forward']['median_ms'])} ms at 2 threads vs {ms(c1['stages']['forward']['median_ms'])} ms at 1"
                )
        vs = (
            "With PASSIVE, 2 threads against 1 (forward alone; different processes and moments of a shared machine): "
            + ", ".join(vs)
            + ". "
            if vs
            else ""
        )
        for name in M:
            u, pv = [(ch.get(k) or {}).get("results", {}).get(name, {}).get("2") for k in ("default", "PASSIVE")]
            if u and pv:
                a_, b_ = g(u, "model forward + softmax"), g(pv, "model forward + softmax")
                cost += (
                    f"Inside the request (fresh processes, unset → PASSIVE), {name}'s 2-thread forward went {ms(a_)} → {ms(b_)} ms"
                    + (
                        ": sleeping threads take longer to wake, so PASSIVE is not free where spinning does not hurt. "
                        if b_ > 1.1 * a_
                        else ": faster with PASSIVE too. "
                        if b_ < 0.9 * a_
                        else ": no measurable difference. "
                    )
                )
        return (
            "**Two intra-op threads can collapse on this shared 2-core host.** Forward medians — "
            + "; ".join(rows)
            + ". "
            "With the policy unset, libgomp's threads spin-wait between parallel regions; while other processes keep both cores busy, "
            "a spinning thread burns the time slice its partner needs, and every one of the forward's hundreds of parallel regions waits for a "
            "descheduled thread. libgomp throttles the spinning while the process has more OpenMP threads than CPUs, so whether 2 threads "
            "collapse depends on how many OpenMP threads the process has at that moment, and on the other load: in the app the batcher's "
            "thread pool is not the process's only one (the engine was timed and warmed up in another thread), consistent with its forward "
            "not collapsing. **Fix**: set `OMP_WAIT_POLICY=PASSIVE` "
            "in the serving environment (the serve image's `ENV`, or the `vit-serve` entry point before torch is imported)"
            + passive
            + ". "
            + cost
            + vs
            + "So the engine's thread choice should keep being measured on the host, under the wait policy the service runs with "
            "(`choose_engine` times the thread counts in the loading thread, not in the batcher's)."
        )

    bullet(threads_point)
    return F


def render(R: dict) -> str:
    h = R["host"]
    L = [
        "# One request, end to end: where the time goes",
        "",
        f"`{R['command']}` — {R['date']}, {R['total_s']:.0f} s in all after imports.",
        "",
        f"CPU: {h['cpu']} ({h['cpus']} CPUs, affinity {h['affinity']}); torch {h['torch']} (default {h['default_threads']} threads, "
        f"OpenMP); Python {h['python']}; OMP_WAIT_POLICY {h['omp_wait_policy'] or 'unset'}. "
        f"Load average {h['loadavg_start']} at the start, {h['loadavg_end']} at the end: **the machine is shared** "
        f"(other CPU-bound work ran on both cores throughout), so absolute times are inflated and noisy; "
        f"the request's CPU time is given beside its wall time, and every fix is compared with its baseline interleaved.",
        "",
        f"Input: CIFAR-10 test image #{R['image']} (sample) as a {R['png_bytes']}-byte 32×32 PNG, multipart field `file`. "
        f"Models: random weights (`torch.manual_seed(0)`), served by `create_app(model=…, telemetry=False, engine=\"torch-fp32\", "
        f"threads=N)`, which pins the fp32 engine (no engine checks at start-up) at N threads, the same N as the stage timings.",
        "",
    ]
    for name, m in R["models"].items():
        L += model_section(name, m["package"], m["threads"])
    L += experiments_section(R)
    L += findings(R)
    return "\n".join(L) + "\n"


# -- main -----------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--package",
        action="append",
        help="a model package directory (repeatable); default: vit-cifar-small and vit-b16, random weights",
    )
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=1.5, help="time budget of each measurement (default %(default)s)")
    ap.add_argument("--min-reps", type=int, default=5, help="repeats at least (3 for a forward over 250 ms)")
    ap.add_argument("--image", type=int, default=0, help="CIFAR-10 test image index (default %(default)s)")
    ap.add_argument(
        "--no-child", action="store_true", help="skip the fresh child processes (OMP_WAIT_POLICY unset / PASSIVE)"
    )
    ap.add_argument("--no-experiments", action="store_true", help="skip the fix experiments")
    ap.add_argument("--child-timeout", type=float, default=90, help="seconds per child process (default %(default)s)")
    ap.add_argument("--out", default=str(RESULTS), help="where profile.md / profile.json go (default bench/results)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(json.loads(a.child))

    host = host_info()
    threads = [int(t) for t in a.threads.split(",")]
    print(
        f"CPU {host['cpu']}, {host['cpus']} CPUs; torch {host['torch']}, default threads {host['default_threads']}; "
        f"load average {host['loadavg_start']}",
        flush=True,
    )
    install_probes()
    png = cifar_png(a.image)
    with tempfile.TemporaryDirectory(prefix="vit-profile-") as tmp:
        t = time.perf_counter()
        dirs = [Path(p) for p in a.package] if a.package else make_packages(Path(tmp))
        print(f"packages ready in {time.perf_counter() - t:.1f} s: {', '.join(map(str, dirs))}", flush=True)
        R = dict(
            command="python bench/profile_request.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            host=host,
            image=a.image,
            png_bytes=len(png),
            settings=dict(threads=threads, seconds=a.seconds, min_reps=a.min_reps),
            models={},
        )
        for d in dirs:
            t = time.perf_counter()
            pkg = load_package(d)
            name = d.name
            info = dict(
                path=str(d) if a.package else f"<tmp>/{name}",
                image_size=pkg.preprocess.image_size,
                params_m=sum(p.numel() for p in pkg.model.parameters()) / 1e6,
                load_s=round(time.perf_counter() - t, 2),
            )
            m = R["models"][name] = dict(package=info, threads={})
            for th in threads:
                parts = ("stages", "http", "ops", *(("experiments",) if th == 1 and not a.no_experiments else ()))
                m["threads"][str(th)] = c = profile_config(pkg, png, th, a, parts)
                if "experiments" in c:
                    m["request_experiments"] = dict(threads=th, arms=c.pop("experiments"))
                print(
                    f"{name} @ {th} thread(s): forward {ms(c['stages']['forward']['median_ms'])} ms, request "
                    f"{ms(c['http']['request']['median_ms'])} ms ({c['seconds']} s; {time.perf_counter() - T0:.0f} s so far)",
                    flush=True,
                )
            if not a.no_experiments and 1 in threads:
                c1 = m["threads"]["1"]
                slow = c1["stages"]["forward"]["median_ms"] > 250
                glue = c1["ops"]["families"].get(OUTSIDE, {}).get("share", 1)
                m["forward_experiments"] = forward_experiments(pkg, png, 1, a, slow, jit=glue > 0.05)
                print(f"{name}: forward experiments done ({time.perf_counter() - T0:.0f} s so far)", flush=True)
            del pkg
        if not a.no_child and any(t > 1 for t in threads):
            fast = [
                d
                for d in dirs
                if R["models"][d.name]["threads"][str(min(threads))]["stages"]["forward"]["median_ms"] < 250
            ]
            R["children"] = {}
            for policy, pk in (
                ("default", fast),
                ("PASSIVE", dirs),
            ):  # libgomp's default wait only for fast models: slow ones take minutes
                if not pk:
                    continue
                try:
                    R["children"][policy] = run_child(pk, threads, a, None if policy == "default" else policy)
                except Exception as e:
                    R["children"][policy] = dict(error=f"{type(e).__name__}: {e}"[:2000])
                print(f"child ({policy}) done ({time.perf_counter() - T0:.0f} s so far)", flush=True)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    R["total_s"] = time.perf_counter() - T0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(R, indent=1))
    md = render(R)
    (out / "profile.md").write_text(md)
    print(md)
    print(f"wrote {out / 'profile.md'} and {out / 'profile.json'}")


if __name__ == "__main__":
    main()
