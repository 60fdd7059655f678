"""One prediction request, end to end: where the time goes.

For each model (random weights, `torch.manual_seed(0)`, from `--preset`: by default `vit-cifar-small`, 32 px, and
`vit-b16`, 224 px; or a model package, `--package DIR`) at each intra-op thread count (`--threads`), in this process:

- **the request**: `POST /predict` of one 32×32 CIFAR-10 test image as a PNG (multipart field `file`) to
  `create_app(model=package, telemetry=False, engine="torch-fp32", threads=N)` through FastAPI's `TestClient` (no
  sockets), cut into segments (`SEGMENTS`: read, parse, decode, queue, resize, forward, respond...) by probes on the
  callables the request passes through (`PROBES`);
- **the stages alone**: decode, preprocess, resize and forward, each timed on its own with the library's functions;
- **the forward's ops**: `torch.profiler`'s self CPU time per op family (what no op accounts for is Python and
  dispatch);
- **forward variants**, at 1 thread: eager fp32, a TorchScript trace + freeze, the engine `torch-int8`, interleaved.

Each measurement warms up, then repeats until `--seconds` are spent and at least `--min-reps` times (fewer for a
forward over 250 ms); medians are kept. The request's process CPU time is kept beside its wall time: on a shared machine
the gap is time spent waiting for a core. OpenMP's wait policy is the environment's: run the script under
`OMP_WAIT_POLICY=PASSIVE` (what `vit-serve` sets) and unset to compare.

    python bench/profile_request.py [--preset NAME ...] [--package DIR ...] [--threads 1,2] [--seconds 1.5]

Prints tables and writes `profile.json` to `--out` (default bench/results). What the numbers mean is for a person to
write (the engine chapter's "Where one request's time goes").
"""

from __future__ import annotations
import argparse, dataclasses, io, json, os, statistics, sys, tempfile, time, warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from vit_nbdev.data import decode_image, image_tensor, load_cifar10, prepare_image, preprocess, to_model_size
from vit_nbdev.engine import build_engine, host_info
from vit_nbdev.model import build_model, forward_features, load_package, save_package

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
PRESETS = ("vit-cifar-small", "vit-b16")
SLOW_MS = 250  # a forward slower than this gets fewer repeats and no warm-up before its op profile

# Each probe wraps one callable of the app that `create_app` returns, named by its path from the app; it marks
# `<probe>0` when called and `<probe>1` when done. A path that no longer resolves stops the script, and a probe that
# records nothing fails the run: a rename in the serving code cannot leave a stage silently unmeasured.
PROBES = {
    "app": "app",  # the ASGI app: marks too when it first reads the body (read0), has it all (read1), sends it (app1)
    "pool": "app.state.service.pool.submit",  # the decode executor: the upload handed over; decode0/1 in its thread
    "submit": "app.state.service.batcher.submit",  # the decoded image handed to the micro-batcher
    "forward": "app.state.service.served.forward",  # the batch in the batcher thread: resize, engine, softmax
    "engine": "app.state.service.served.engine",  # the model itself
}
SEGMENTS = {  # segment of a request: (from mark, to mark); c0/c1: the client's call
    "client → app": ("c0", "app0"),  # TestClient hands the request to the app's event loop
    "routing": ("app0", "read0"),  # middleware and routing, up to the first read of the body
    "read": ("read0", "read1"),  # the body, as the app receives it
    "parse": ("read1", "pool0"),  # the multipart parse, until the upload is handed to a decode thread
    "pool hop": ("pool0", "decode0"),  # until a decode thread starts on it
    "decode + preprocess": ("decode0", "decode1"),  # PNG → normalised pixels at the native size
    "to the batcher": ("decode1", "submit0"),  # back to the event loop
    "queue": ("submit0", "forward0"),  # until the batcher thread runs the batch
    "resize": ("forward0", "engine0"),  # to the model's input size
    "forward": ("engine0", "engine1"),
    "softmax": ("engine1", "forward1"),
    "respond": ("forward1", "app1"),  # back to the event loop: top-k, metrics, the JSON body
    "app → client": ("app1", "c1"),  # TestClient receives the answer
    "request": ("c0", "c1"),
}
INSIDE = ("decode + preprocess", "resize", "forward", "softmax")  # the work; the rest of a request is overhead


# -- timing ---------------------------------------------------------------------------------------


def summarise(wall: list[float], cpu: list[float] | None = None) -> dict:
    "Count, median, min and p90 of wall times in ms; the median process CPU time (all threads) if given."
    w = sorted(wall)
    r = lambda s: round(1000 * s, 4)
    out = dict(n=len(w), median_ms=r(statistics.median(w)), min_ms=r(w[0]), p90_ms=r(w[int(0.9 * (len(w) - 1))]))
    return out | (dict(cpu_median_ms=r(statistics.median(cpu))) if cpu else {})


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


def reps_for(forward_ms: float, a) -> int:
    "Fewer repeats for slow forwards: 2 over a second, at most 4 over `SLOW_MS`."
    return 2 if forward_ms > 1000 else min(4, a.min_reps) if forward_ms > SLOW_MS else a.min_reps


def forward(model, x: torch.Tensor) -> torch.Tensor:
    "What the fp32 engine and `Served.forward` run on a resized batch: the features, then softmax."
    with torch.inference_mode():
        return forward_features(model, x)[1].softmax(-1)


# -- inputs ---------------------------------------------------------------------------------------


def cifar_png(i: int) -> bytes:
    "CIFAR-10 test image `i` (the bundled sample) as PNG bytes, what a client uploads."
    img = load_cifar10(progress=False).test.images[i]
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def packages(a, folder: Path) -> dict[str, Path]:
    "`{name: package folder}`: each `--preset` with random weights (seed 0), saved under `folder`; each `--package`."
    out = {}
    for preset in a.preset or ([] if a.package else PRESETS):
        torch.manual_seed(0)
        model, pre = build_model(preset)
        out[preset] = save_package(model, pre, folder / preset, card={"version": f"profile-{preset}"})
    return out | {Path(d).name: Path(d) for d in a.package or []}


# -- probes on the request's path -----------------------------------------------------------------

MARKS: dict[str, float] = {}  # the marks of the request in flight (one at a time)


def mark(key: str) -> None:
    MARKS[key] = time.perf_counter()


class Timed:
    "`fn`, marking `<probe>0` when called and `<probe>1` when it returns; other attributes are `fn`'s."

    def __init__(self, probe: str, fn):
        self._probe, self._fn = probe, fn

    def __call__(self, *a, **k):
        mark(f"{self._probe}0")
        try:
            return self._fn(*a, **k)
        finally:
            mark(f"{self._probe}1")

    def __getattr__(self, name):  # an engine's `name`, `threads`...
        return getattr(self._fn, name)


def timed_submit(submit):
    "An executor's `submit`, marking `pool0` when a call is handed over, `decode0`/`decode1` around it in the worker."

    def wrapped(fn, /, *a, **k):
        mark("pool0")
        return submit(Timed("decode", fn), *a, **k)

    return wrapped


def timed_app(app):
    "The ASGI app, marking `app0` when a request enters, `read0`/`read1` around its body, `app1` when it is answered."

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        mark("app0")

        async def receive_():
            MARKS.setdefault("read0", time.perf_counter())
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body"):
                mark("read1")
            return msg

        async def send_(msg):
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                mark("app1")
            await send(msg)

        await app(scope, receive_, send_)

    return wrapped


def install(root, probe: str) -> None:
    "Replace the callable at `PROBES[probe]` (a path from `root`) with its probe; `AttributeError` if it is not there."
    *owner, attr = PROBES[probe].split(".")
    obj = root
    try:
        for part in owner:
            obj = getattr(obj, part)
        fn = getattr(obj, attr)
    except AttributeError as e:
        raise AttributeError(f"probe {probe!r}: {PROBES[probe]} is not there ({e}); update PROBES") from None
    wrap = {"app": timed_app, "pool": timed_submit}.get(probe, partial(Timed, probe))
    setattr(obj, attr, wrap(fn))


class ProbedApp:
    "The app serving `pkg` (engine torch-fp32 on `threads` threads, no telemetry) with its probes, behind a TestClient."

    def __init__(self, pkg, png: bytes, threads: int):
        from fastapi.testclient import TestClient
        from vit_nbdev.serve import create_app

        t = time.perf_counter()
        app = create_app(model=pkg, telemetry=False, engine="torch-fp32", threads=threads)
        outer = SimpleNamespace(app=app)
        install(outer, "app")
        self.client = TestClient(outer.app)
        self.client.__enter__()  # the lifespan: the service starts its batcher and decode pool, warms the model up
        self.startup_s = round(time.perf_counter() - t, 2)
        for probe in PROBES:  # the service's decode pool, batcher and model exist once the lifespan has run
            if probe != "app":
                install(SimpleNamespace(app=app), probe)
        self.files = {"file": ("cifar.png", png, "image/png")}

    def request(self) -> dict:
        "One `POST /predict`: `{segment: seconds}` for each segment whose marks were made."
        MARKS.clear()
        mark("c0")
        r = self.client.post("/predict", files=self.files)
        mark("c1")
        if r.status_code != 200:
            raise RuntimeError(f"POST /predict: {r.status_code} {r.text[:300]}")
        m = dict(MARKS)
        return {s: m[b] - m[a] for s, (a, b) in SEGMENTS.items() if a in m and b in m}

    def requests(self, seconds: float, min_reps: int, warmup: int = 2) -> dict:
        "Requests one after another for `seconds` (at least `min_reps`): a summary per segment, and the overhead."
        for _ in range(warmup):
            self.request()
        segs, cpu, stop = [], [], time.perf_counter() + seconds
        while len(segs) < min_reps or (time.perf_counter() < stop and len(segs) < 500):
            c = time.process_time()
            segs.append(self.request())
            cpu.append(time.process_time() - c)
        if missing := [s for s in SEGMENTS if any(s not in g for g in segs)]:
            raise RuntimeError(
                f"no time for {missing}: a probe recorded nothing; check PROBES against the serving code"
            )
        out = {s: summarise([g[s] for g in segs]) for s in SEGMENTS}
        out["request"] = summarise([g["request"] for g in segs], cpu)
        out["overhead"] = summarise([g["request"] - sum(g[s] for s in INSIDE) for g in segs])  # per request
        return out

    def close(self) -> None:
        self.client.__exit__(None, None, None)


# -- the stages alone and the forward's ops --------------------------------------------------------


def stage_times(pkg, png: bytes, a) -> dict:
    "Decode, preprocess (to tensor, normalise at the native size), resize (to the model's), forward: each on its own."
    pre, model = pkg.preprocess, pkg.model
    native = dataclasses.replace(pre, image_size=pre.native_size)
    im = decode_image(png, draft_size=2 * pre.native_size)
    px = preprocess(image_tensor(im)[None], native)
    x = to_model_size(px, pre)
    fast = dict(seconds=min(a.seconds, 0.6), min_reps=20)
    t = time.perf_counter()
    forward(model, x)  # the warm-up, and how slow the forward is
    first_ms = 1000 * (time.perf_counter() - t)
    return dict(
        decode=measure(lambda: decode_image(png, draft_size=2 * pre.native_size), **fast),
        preprocess=measure(lambda: preprocess(image_tensor(im)[None], native), **fast),
        resize=measure(lambda: to_model_size(px, pre), **fast),
        forward=measure(lambda: forward(model, x), a.seconds, min_reps=reps_for(first_ms, a), warmup=0),
    )


OUTSIDE = "outside ops (Python, HF modules, dispatch, profiler)"
FAMILIES = {  # op family: aten op names (without `aten::`)
    "matmul": "addmm mm bmm matmul linear baddbmm mkldnn_linear _addmm_activation",
    "attention (SDPA)": "scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu "
    "_scaled_dot_product_attention_math _scaled_dot_product_flash_attention",
    "layer_norm": "layer_norm native_layer_norm",
    "gelu": "gelu",
    "softmax": "softmax _softmax",
    "patch embedding (conv)": "conv2d convolution _convolution mkldnn_convolution _slow_conv2d_forward",
    "resize (upsample)": "upsample_bilinear2d _upsample_bilinear2d_aa interpolate upsample_nearest2d",
    "elementwise": "add add_ mul mul_ div div_ sub rsub where",
    "views, copies, small ops": "view reshape _reshape_alias transpose permute expand t select slice unsqueeze "
    "squeeze _unsafe_view as_strided flatten split chunk detach alias contiguous copy_ clone cat empty empty_like "
    "empty_strided to _to_copy stack resolve_conj resolve_neg zeros fill_ narrow unbind lift_fresh repeat item "
    "_local_scalar_dense sum topk max argmax",
}
FAMILY = {op: fam for fam, ops in FAMILIES.items() for op in ops.split()}


def op_profile(pkg, pixels: torch.Tensor, reps: int, warm: bool = True, top: int = 12) -> dict:
    "Self CPU time per forward (resize + forward + softmax, as `Served.forward`) by op family, and the top ops."
    from torch.profiler import ProfilerActivity, profile

    x, pre = pixels[None], pkg.preprocess
    if warm:
        forward(pkg.model, to_model_size(x, pre))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(reps):
            forward(pkg.model, to_model_size(x, pre))
        wall_ms = 1000 * (time.perf_counter() - t) / reps
    ops = sorted(((e.key, e.self_cpu_time_total / 1000 / reps) for e in prof.key_averages()), key=lambda o: -o[1])
    ops = [(op, t) for op, t in ops if t > 0]
    fams: dict[str, float] = {}
    for op, t in ops:
        fam = FAMILY.get(op.split("::", 1)[-1], "attention (SDPA)" if "attention" in op else "other ops")
        fams[fam] = fams.get(fam, 0.0) + t
    fams[OUTSIDE] = max(0.0, wall_ms - sum(t for _, t in ops))
    r = lambda v: round(v, 4)
    return dict(
        reps=reps,
        wall_ms=r(wall_ms),
        families={k: dict(ms=r(v), share=r(v / wall_ms)) for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        top=[dict(op=op, self_ms=r(t), share=r(t / wall_ms)) for op, t in ops[:top]],
    )


def profile_config(pkg, png: bytes, threads: int, a) -> dict:
    "At `threads` intra-op threads: the stages alone, then the request through the app, then the forward's ops."
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    stages = stage_times(pkg, png, a)
    fwd_ms = stages["forward"]["median_ms"]
    app = ProbedApp(pkg, png, threads)
    try:
        request = app.requests(a.seconds, min_reps=reps_for(fwd_ms, a), warmup=1 if fwd_ms > SLOW_MS else 2)
    finally:
        app.close()
    pixels = prepare_image(png, pkg.preprocess).pixels
    ops = op_profile(pkg, pixels, reps=1 if fwd_ms > SLOW_MS else 3 if fwd_ms > 40 else 10, warm=fwd_ms <= SLOW_MS)
    return dict(
        threads=threads,
        app_startup_s=app.startup_s,
        request=request,
        stages=stages,
        ops=ops,
        seconds=round(time.perf_counter() - t0, 1),
    )


# -- forward variants -----------------------------------------------------------------------------


class Features(torch.nn.Module):
    "`forward_features` as a module, for `torch.jit.trace`."

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return forward_features(self.model, pixels)


def variants(
    pkg,
    png: bytes,
    a,
    slow: bool = False,  # a forward over `SLOW_MS`: 4 rounds, whatever the time budget
    jit: bool = True,  # try TorchScript too (it can only remove what runs outside ops)
) -> dict:
    "The forward at 1 thread: eager fp32, TorchScript trace + freeze, the engine torch-int8, interleaved."
    torch.set_num_threads(1)
    x = to_model_size(prepare_image(png, pkg.preprocess).pixels[None], pkg.preprocess)

    def traced():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.freeze(torch.jit.trace(Features(pkg.model).eval(), x, strict=False))

    builders = {"TorchScript trace+freeze": traced} if jit else {}
    builders["engine torch-int8"] = lambda: build_engine("torch-int8", pkg, 1)
    arms, notes = {"eager fp32": partial(forward_features, pkg.model, x)}, {}
    with torch.inference_mode():
        ref = forward_features(pkg.model, x)[1]
        for name, build in builders.items():
            try:
                t = time.perf_counter()
                f = build()
                f(x)
                build_s, max_dlogits = round(time.perf_counter() - t, 2), float((f(x)[1] - ref).abs().max())
                notes[name] = dict(build_s=build_s, max_dlogits=max_dlogits)
                arms[name] = partial(f, x)
            except Exception as e:  # recorded, not fatal: a variant this torch cannot build is a finding
                notes[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
        got, r, stop = {k: [] for k in arms}, 0, time.perf_counter() + (0 if slow else 2 * a.seconds)
        while r < (4 if slow else 2 * a.min_reps) or (time.perf_counter() < stop and r < 300):
            for k, f in arms.items():
                t = time.perf_counter()
                f()
                got[k].append(time.perf_counter() - t)
            r += 1
    return dict(arms={k: summarise(v) for k, v in got.items()}, notes=notes)


# -- output ---------------------------------------------------------------------------------------


def fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def table(title: str, rows: dict[str, list], cols: list[str]) -> str:
    "A markdown table: one row per key of `rows`, one column per `cols`."
    lines = ["", f"{title}", "", "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    return "\n".join(lines + [f"| {k} | " + " | ".join(map(fmt, v)) + " |" for k, v in rows.items()])


def tables(R: dict) -> str:
    "The medians of `R` as markdown tables: request segments, stages alone, op families, forward variants."
    runs = {f"{m} @{t}t": c for m, v in R["models"].items() for t, c in v["threads"].items()}
    cols = list(runs)
    med = lambda d, k: d[k]["median_ms"] if k in d else None
    rows = {s: [med(c["request"], s) for c in runs.values()] for s in [*SEGMENTS, "overhead"]}
    rows["request: CPU time (all threads)"] = [c["request"]["request"]["cpu_median_ms"] for c in runs.values()]
    out = [table("Request segments, median ms", rows, cols)]
    rows = {s: [med(c["stages"], s) for c in runs.values()] for s in ("decode", "preprocess", "resize", "forward")}
    out.append(table("Stages alone, median ms", rows, cols))
    fams = dict.fromkeys(f for c in runs.values() for f in c["ops"]["families"])
    share = lambda c, f: 100 * c["ops"]["families"][f]["share"] if f in c["ops"]["families"] else None
    rows = {f: [share(c, f) for c in runs.values()] for f in fams}
    out.append(table("Forward ops, % of the profiled forward", rows, cols))
    var = {m: v["variants"]["arms"] for m, v in R["models"].items() if "variants" in v}
    if var:
        arms = dict.fromkeys(k for v in var.values() for k in v)
        rows = {k: [med(v, k) for v in var.values()] for k in arms}
        out.append(table("Forward variants at 1 thread, median ms", rows, list(var)))
    return "\n".join(out)


def context() -> dict:
    "What else shapes these timings, beside the library's `host_info`: torch, its threads, OpenMP's wait policy."
    return dict(
        torch=torch.__version__,
        default_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )


def profile_model(name: str, path: str, pkg, png: bytes, threads: list[int], a) -> dict:
    "`profile_config` at each thread count, then the forward variants (tried with tracing if the forward has glue)."
    params_m = round(sum(p.numel() for p in pkg.model.parameters()) / 1e6, 2)
    m = dict(package=dict(path=path, image_size=pkg.preprocess.image_size, params_m=params_m), threads={})
    for th in threads:
        m["threads"][str(th)] = c = profile_config(pkg, png, th, a)
        print(f"{name} @{th}t: request {fmt(c['request']['request']['median_ms'])} ms ({c['seconds']} s)", flush=True)
    if not a.no_variants:
        first = next(iter(m["threads"].values()))
        slow = first["stages"]["forward"]["median_ms"] > SLOW_MS
        m["variants"] = variants(pkg, png, a, slow, jit=first["ops"]["families"][OUTSIDE]["share"] > 0.05)
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", help=f"a preset, random weights (repeatable; default: {PRESETS})")
    ap.add_argument("--package", action="append", help="a model package directory (repeatable)")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=1.5, help="time budget of each measurement (default %(default)s)")
    ap.add_argument("--min-reps", type=int, default=5, help="repeats at least (default %(default)s)")
    ap.add_argument("--image", type=int, default=0, help="CIFAR-10 test image index (default %(default)s)")
    ap.add_argument("--no-variants", action="store_true", help="skip the forward variants")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where profile.json goes (default bench/results)")
    a = ap.parse_args(argv)
    t0, threads, png = time.perf_counter(), [int(t) for t in a.threads.split(",")], cifar_png(a.image)
    host = dict(**host_info(), **context(), loadavg_start=[round(x, 2) for x in os.getloadavg()])
    print(f"host: {host}", flush=True)
    R = dict(
        command=" ".join(["python bench/profile_request.py", *(sys.argv[1:] if argv is None else argv)]),
        host=host,
        settings=dict(threads=threads, seconds=a.seconds, min_reps=a.min_reps, image=a.image, png_bytes=len(png)),
        probes=PROBES,
        segments=SEGMENTS,
        models={},
    )
    with tempfile.TemporaryDirectory(prefix="vit-profile-") as tmp:
        for name, folder in packages(a, Path(tmp)).items():
            path = f"<tmp>/{name}" if Path(tmp) in folder.parents else str(folder)  # no temporary path in the record
            R["models"][name] = profile_model(name, path, load_package(folder), png, threads, a)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    R["total_s"] = round(time.perf_counter() - t0, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile.json").write_text(json.dumps(R, indent=1, ensure_ascii=False) + "\n")
    print(tables(R))
    print(f"\nwrote {a.out / 'profile.json'} ({R['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
