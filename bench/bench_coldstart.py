"""Cold start of `vit-serve`: seconds from process start to the first 200 from `/readyz`, before and after the engine
chapter.

Same run, same machine, same model packages, same store: the service at a git ref from before engines (default
`bc6c1bc`, checked out into a temporary worktree and imported first on `PYTHONPATH`) against the working tree's, in
these modes:

- **before**: the old service (fp32 PyTorch, a fixed thread rule);
- **pinned**: `VIT_ENGINE=torch-fp32` (no choosing: what the choice itself costs is the difference to *auto*);
- **auto, exported**: `VIT_ENGINE=auto` on a version whose engines `vit-models export` made and checked (what
  production runs);
- **auto, not exported**: `VIT_ENGINE=auto` without the export: a small model is checked at start (within
  `VIT_ENGINE_BUDGET_S`), a large one is served in fp32.

Each mode starts from an empty `VIT_CACHE` (a fresh Cloud Run instance), `--runs` times; the median is reported.

    python bench/bench_coldstart.py [--models vit-cifar-small,vit-b16] [--runs 3] [--ref bc6c1bc]

Writes bench/results/coldstart.md and coldstart.json.
"""

import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(store: str, env: dict, pythonpath: str | None, timeout: float = 900) -> tuple[float, dict]:
    "Seconds from spawning `vit-serve` to the first 200 of /readyz, and that answer."
    port, cache = free_port(), tempfile.mkdtemp(prefix="vit-cache-")
    e = {k: v for k, v in os.environ.items() if not k.startswith("VIT_")}
    e.update(env, VIT_STORE=store, VIT_CACHE=cache, VIT_TELEMETRY="0", VIT_MODEL_POLL_S="0")
    if pythonpath:
        e["PYTHONPATH"] = pythonpath
    cmd = [
        sys.executable,
        "-c",
        "from vit_nbdev.cli import serve_main; serve_main()",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, env=e, cwd=cache, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )  # not the checkout: `-c` imports from the cwd
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"vit-serve exited: {p.stderr.read()[-2000:]}")
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if r.status_code == 200:
                    return time.perf_counter() - t0, r.json()
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("not ready")
            time.sleep(0.05)
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        shutil.rmtree(cache, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit-cifar-small,vit-b16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ref", default="bc6c1bc", help="git ref of the service before engines")
    ap.add_argument(
        "--cache",
        default=None,
        help="keep the packages and exported stores here between runs (the B/16 export takes minutes)",
    )
    a = ap.parse_args()
    import torch
    from vit_nbdev.engine import engines_prefix, export_engines, host_info
    from vit_nbdev.model import build_model, save_package
    from vit_nbdev.store import open_store

    host = host_info()
    print(
        f"CPU: {host['cpu']}; flags {', '.join(host['flags'])}; {host['cpus']} CPUs; torch {torch.__version__}",
        flush=True,
    )
    work = Path(a.cache or tempfile.mkdtemp(prefix="coldstart-"))
    old = work / f"worktree-{a.ref}"
    if not old.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), a.ref], check=True, capture_output=True
        )
    rows = []
    try:
        for preset in a.models.split(","):
            plain, exported = work / f"{preset}-plain", work / f"{preset}-exported"
            if not (plain / "models").exists():
                torch.manual_seed(0)
                model, pre = build_model(preset)
                pkg = save_package(model, pre, work / f"{preset}-pkg")
                for st in (plain, exported):
                    open_store(st).register(pkg, "v1", aliases=["latest"])
            if not open_store(exported).list(engines_prefix("v1")):
                t0 = time.perf_counter()
                export_engines(open_store(exported), "v1")
                print(f"{preset}: vit-models export took {time.perf_counter() - t0:.0f} s", flush=True)
            modes = [
                ("before", str(plain), {}, str(old)),
                ("pinned torch-fp32", str(plain), {"VIT_ENGINE": "torch-fp32"}, None),
                ("auto, exported", str(exported), {"VIT_ENGINE": "auto"}, None),
                ("auto, not exported", str(plain), {"VIT_ENGINE": "auto"}, None),
            ]
            for name, store, env, pp in modes:
                times, ready = [], {}
                for _ in range(a.runs):
                    s, ready = cold_start(store, env, pp)
                    times.append(s)
                eng = ready.get("engine") or {}
                rows.append(
                    dict(
                        model=preset,
                        mode=name,
                        median_s=round(statistics.median(times), 2),
                        runs=[round(t, 2) for t in times],
                        engine=f"{eng['name']}×{eng['threads']}" if eng else "fp32 (old)",
                        choose_s=eng.get("seconds"),
                    )
                )
                print(rows[-1], flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    lines = [
        f"# Cold start: process start → ready\n\nCPU: {host['cpu']} ({', '.join(host['flags'])}), {host['cpus']} CPUs; "
        f"median of {a.runs} starts from an empty cache.\n",
        "| model | service | cold start s (median) | runs | engine served | of which choosing s |",
        "|---|---|---:|---|---|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['mode']} | {r['median_s']} | {', '.join(map(str, r['runs']))} | {r['engine']} | "
        f"{r['choose_s'] if r['choose_s'] is not None else '–'} |"
        for r in rows
    ]
    out = ROOT / "bench" / "results"
    (out / "coldstart.md").write_text("\n".join(lines) + "\n")
    (out / "coldstart.json").write_text(json.dumps(dict(host=host, rows=rows), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
