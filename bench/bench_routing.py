"""The overhead of canary routing: one `vit-serve` process, the same load, three set-ups in turn.

- **production alone**: no canary;
- **10% canary**: `start_canary(VERSION, 10)`: a tenth of the requests is answered by a second model (same
  architecture, other random weights) loaded beside production;
- **10% shadow**: `start_canary(VERSION, 10, shadow=True)`: production answers everything, and a copy of a tenth of
  the requests goes to the canary in the background.

The server is started once (`VIT_MODEL=production`, followed every 0.5 s, engine pinned to torch-fp32, telemetry on)
and follows the canary alias by its poll, as a fleet would: between set-ups the script moves the plan in the registry
and waits until `/readyz` shows it. Each set-up gets `--rounds` runs of `--seconds` (in the order production, canary,
shadow, then again), each with `--clients` closed-loop clients posting one 32×32 PNG per request; the table gives
requests/s (mean over rounds), p50 and p99 latency (of all the round's requests pooled) and the server's CPU time per
request, and the ratios to production alone.

    python bench/bench_routing.py                                     # vit-cifar-tiny, 2 rounds of 10 s, 8 clients
    python bench/bench_routing.py --model vit-cifar-small --seconds 20

Prints the CPU model line and the table; writes bench/results/routing.md (overwritten).
"""

import argparse, asyncio, os, sys, tempfile, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import BIN, _cpu_s, _free_port, _load, _server_env, _start, _stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("production alone", "10% canary", "10% shadow")


def _registry(folder: Path, model: str) -> str:
    "A local store with two random-weight packages of `model`: `va` (production) and `vb` (the canary)."
    import torch
    from vit_nbdev.model import build_model, save_package
    from vit_nbdev.store import open_store

    st = open_store(folder / "store")
    for seed, v in enumerate(("va", "vb")):
        torch.manual_seed(seed)
        m, pre = build_model(model)
        st.register(save_package(m, pre, folder / v), v, aliases=[])
    st.set_alias("production", "va")
    return st.uri


def _arrange(store: str, url: str, setup: str) -> None:
    "Move the canary plan for `setup` in the registry and wait until the server follows it."
    import httpx
    from vit_nbdev.canary import end_canary, read_plan, start_canary

    plan = read_plan(store)
    if setup == "production alone":
        if plan and plan.active:
            end_canary(store, "stopped", {"why": "bench"}, by="bench_routing")
        want = dict(state="none")
    else:
        start_canary(store, "vb", 10, shadow=setup.endswith("shadow"), by="bench_routing")
        want = dict(state="serving", mode="shadow" if setup.endswith("shadow") else "split")
    t0 = time.monotonic()
    while any(httpx.get(url + "/readyz", timeout=10).json()["canary"].get(k) != v for k, v in want.items()):
        if time.monotonic() - t0 > 120:
            raise RuntimeError(f"the server did not follow the plan for {setup!r} in 120 s")
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit-cifar-tiny", help="the preset of both packages")
    ap.add_argument("--seconds", type=float, default=10.0, help="of load per set-up and round")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each set-up, interleaved")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.md")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image
    from vit_nbdev.data import load_cifar10
    from vit_nbdev.engine import host_info

    host = host_info()
    print(f"CPU: {host['cpu']}\nCPU budget {host['cpus']} (os.cpu_count {os.cpu_count()})", flush=True)
    import io

    blobs = []
    for x in load_cifar10(progress=False).test.images[:64]:
        b = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(b, "PNG")
        blobs.append(b.getvalue())
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        tmp = Path(tmp)
        os.environ["VIT_CACHE"] = str(tmp / "cache")
        store, port = _registry(tmp, a.model), _free_port()
        env = _server_env(
            dict(
                VIT_STORE=store,
                VIT_MODEL="production",
                VIT_MODEL_POLL_S="0.5",
                VIT_ENGINE="torch-fp32",
                VIT_CACHE=str(tmp / "cache"),
                PORT=str(port),
            )
        )
        proc, cold, _ = _start([str(BIN / "vit-serve"), "--host", "127.0.0.1"], env, tmp / "serve.log", port, ROOT)
        url, runs = f"http://127.0.0.1:{port}", {s: [] for s in SETUPS}
        try:
            for r in range(a.rounds):
                for setup in SETUPS:
                    _arrange(store, url, setup)
                    c0 = _cpu_s(proc.pid)
                    res = asyncio.run(_load(url, blobs, a.clients, a.seconds))
                    res["cpu_ms"] = (_cpu_s(proc.pid) - c0) * 1e3 / max(1, res["requests"])
                    runs[setup].append(res)
                    print(f"round {r + 1} {setup}: {res['images_per_s']:.1f} req/s, {res['errors']} errors", flush=True)
        finally:
            _stop(proc)
    rows = []
    for setup in SETUPS:
        rs = runs[setup]
        rows.append(
            dict(
                setup=setup,
                requests=sum(x["requests"] for x in rs),
                errors=sum(x["errors"] for x in rs),
                req_s=float(np.mean([x["images_per_s"] for x in rs])),
                p50_ms=float(np.median([x["p50_ms"] for x in rs])),
                p99_ms=float(np.median([x["p99_ms"] for x in rs])),
                cpu_ms=float(np.mean([x["cpu_ms"] for x in rs])),
            )
        )
    base = rows[0]
    head = (
        "| set-up | requests | errors | req/s | p50 ms | p99 ms | server CPU ms/req | req/s vs alone | p99 vs alone |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        lines.append(
            f"| {x['setup']} | {x['requests']} | {x['errors']} | {x['req_s']:.1f} | {x['p50_ms']:.1f} | "
            f"{x['p99_ms']:.1f} | {x['cpu_ms']:.1f} | {x['req_s'] / base['req_s']:.2f} | "
            f"{x['p99_ms'] / base['p99_ms']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    a.out.write_text(
        "# Routing overhead: production alone, a 10% canary, a 10% shadow\n\n"
        f"`python bench/bench_routing.py --model {a.model} --seconds {a.seconds:g} --rounds {a.rounds} "
        f"--clients {a.clients}`: one `vit-serve` (torch-fp32, telemetry on), {a.clients} closed-loop clients, one "
        f"32×32 PNG per request, {a.rounds} interleaved rounds of {a.seconds:g} s per set-up. "
        "p50/p99: the median over rounds; req/s and CPU: the mean.\n\n"
        f"CPU: {host['cpu']}; CPU budget {host['cpus']} (shared with other work: compare the ratios, and the "
        f"server's CPU time per request, more than the absolute figures). Cold start {cold:.1f} s.\n\n{table}\n"
    )
    print(f"wrote {a.out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
