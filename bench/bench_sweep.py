"""A sweep on the bundled sample with one and with two local workers, in one run, and the default config beside it.

`configs/sweep-sample.yaml` (the tiny preset from scratch, three epochs on 1,000 of the sample's training images;
TPE, median pruning), `--trials` trials (12) on a fresh store and SQLite study for each number of workers. For each:
wall time and trials per hour, the share of trials pruned, the best validation accuracy, and the best trial's test
accuracy (measured once by its run; the sweep never looks at it). Beside them, the default config: one papermill
run of the training notebook with the file's fixed parameters and `TrainConfig`'s defaults for the searched ones
(lr 3e-4, weight decay 0.05, batch 128, warmup 5 steps).

    python bench/bench_sweep.py                 # 12 trials x (1, 2) workers + the default run: about 15-20 minutes
    python bench/bench_sweep.py --trials 4      # a smoke test

Prints the host (CPU model and flags) and the table, with the ratio of the two wall times. Writes
bench/results/sweep.md (overwritten) unless `--no-out`.
"""

import argparse, json, os, platform, sys, tempfile, time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_cli import cpu  # noqa: E402

from vit_nbdev.config import TrainConfig, new_run_id  # noqa: E402
from vit_nbdev.store import open_store  # noqa: E402
from vit_nbdev.sweep import default_storage, load_spec, run_sweep  # noqa: E402


def sweep(spec, workers: int, root: Path) -> dict:
    "Run the sweep with `workers` local workers on a fresh store: its figures."
    store = str(root / f"store-{workers}")
    t = time.perf_counter()
    summary = run_sweep(spec, default_storage(store), store, workers, workdir=root / f"work-{workers}", poll=1.0)
    wall = time.perf_counter() - t
    counts = summary["counts"]
    import optuna

    study = optuna.load_study(study_name=spec.study, storage=default_storage(store))
    states = [t.state.name for t in study.trials]
    best = summary["best"] or {}
    return dict(
        workers=workers,
        trials=len(states),
        wall_s=wall,
        trials_per_hour=len(states) / wall * 3600,
        pruned=states.count("PRUNED") / len(states),
        failed=states.count("FAIL"),
        best_val_acc=best.get("val_acc"),
        best_test_acc=best.get("test_acc"),
        best_params=best.get("params"),
        done=counts["done"],
    )


def default_run(spec, root: Path) -> dict:
    "The training notebook with the sweep's fixed parameters and the defaults for the searched ones."
    from vit_nbdev.train import run_notebook

    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in spec.space}
    store = str(root / "store-default")
    run_id = new_run_id()
    params = {**spec.fixed, **defaults, "store": store, "run_id": run_id, "checkpoint_dir": str(root / "ck")}
    t = time.perf_counter()
    run_notebook(params, output=root / "default.ipynb")
    wall = time.perf_counter() - t
    metrics = json.loads(open_store(store).get_bytes(f"runs/{run_id}/metrics.json"))["metrics"]
    return dict(params=defaults, wall_s=wall, val_acc=metrics["val_acc"], test_acc=metrics["test_acc"])


def table(rows: list[dict], base: dict, trials: int, host: str) -> str:
    "The results as markdown."
    one = next(r for r in rows if r["workers"] == 1)
    lines = [
        "# Sweep: one and two local workers",
        "",
        f"`python bench/bench_sweep.py --trials {trials}`",
        f"on {host}.".replace("; ", ";\n"),  # the CPU, its flags, the load, python: a line each
        "Each trial is a papermill run of the training notebook (`configs/sweep-sample.yaml`: vit-cifar-tiny from",
        "scratch, 3 epochs on 1,000 sample images; TPE, median pruning), on a fresh store and SQLite study.",
        "",
        "| workers | trials | wall | trials/hour | pruned | failed | best val acc | its test acc | wall vs 1 worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['trials']} | {r['wall_s']:.0f} s | {r['trials_per_hour']:.0f} | {r['pruned']:.0%} "
            f"| {r['failed']} | {r['best_val_acc']:.4f} | {r['best_test_acc']:.4f} "
            f"| {r['wall_s'] / one['wall_s']:.2f}x |"
        )
    lines += [
        "",
        f"Default config ({', '.join(f'{k} {v}' for k, v in base['params'].items())}):",
        f"val acc {base['val_acc']:.4f}, test acc {base['test_acc']:.4f} ({base['wall_s']:.0f} s, one run).",
        "",
        "Best parameters:",
        "",
        *[f"- {r['workers']} worker(s): {r['best_params']}" for r in rows],
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--no-out", action="store_true", help="print only; do not write bench/results/sweep.md")
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    host = f"{cpu()}; {os.cpu_count()} CPUs (load {load} at the start); python {platform.python_version()}"
    print(host, flush=True)
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)  # the runs' local files (W&B offline, records) stay in the temporary folder
        rows = []
        for workers in (1, 2):
            spec = load_spec(ROOT / "configs/sweep-sample.yaml", study=f"bench-{workers}w", trials=a.trials)
            rows.append(sweep(spec, workers, Path(d)))
            print(rows[-1], flush=True)
        base = default_run(spec, Path(d))
        print(base, flush=True)
    md = table(rows, base, a.trials, host)
    print(md)
    if not a.no_out:
        (ROOT / "bench/results/sweep.md").write_text(md)


if __name__ == "__main__":
    main()
