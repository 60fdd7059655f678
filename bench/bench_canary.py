"""How sure the promote gate and a canary are, by simulation: the gate's error rates, and the labels a canary needs.

1. **The promote gate** (`evidence.mcnemar_gate`: McNemar's exact test for non-inferiority, margin 1 point, alpha
   0.05) on `--images` images (1,000): how often it promotes a candidate truly worse by the margin or more, and how
   often it refuses a truly better one, for two models that disagree on 5-20% of the images; beside the first gate (a
   raw difference against a 0.5-point tolerance) on the same draws.
2. **A canary's decision** (`evidence.compare_arms`: the asymptotic confidence sequence; the policy's defaults:
   margin 2 points, alpha 0.05, no decision before 200 labels), looked at after every label: promote when the
   sequence lies above -margin, roll back when below. For each true accuracy gap (-6 ... +2 points around a 75%
   production) and each design (a 50/50 traffic split; a shadow canary, whose labels are paired, disagreeing with
   production on `--discordance` of the images): the labels needed before the decision (median, 90th percentile),
   the share of wrong decisions (a promotion when the canary is worse by the margin or more, a roll back when it
   is not worse by more than the margin), and the share still undecided after `--max-labels` labels.

The canary runs are whole label streams: `evidence.cs_path` (shadow) or the same running sums for the split's
per-label contributions (`evidence.split_contributions`, checked against `compare_arms` on a few prefixes), so
every look costs nothing extra.

    python bench/bench_canary.py            # 4,000 gate draws a cell, 1,000 canary runs a gap: a few minutes
    python bench/bench_canary.py --quick    # a smoke test, well under a minute, no files written

Prints the host (CPU model) and the tables. Writes bench/results/canary.md and canary.json (overwritten) unless
`--quick` or `--no-out`; `--out DIR` elsewhere.
"""

import argparse, json, os, platform, sys, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vit_nbdev.evidence import compare_arms, cs_bounds, cs_path, mcnemar_p_value, simulate_paired  # noqa: E402

PRODUCTION = 0.75  # production's true accuracy
GATE_GAPS = (-0.03, -0.02, -0.01, 0.0, 0.01, 0.02, 0.03)  # the candidate's true gap, fractions of one
GATE_DISCORDANCE = (0.05, 0.10, 0.15, 0.20)  # shares of images exactly one of the two models gets right
CANARY_GAPS = (-0.06, -0.04, -0.02, 0.0, 0.02)
DESIGNS = ("split 50/50", "shadow (paired)")
CHUNK = 50  # canary runs simulated at once (memory: CHUNK x max_labels floats per array)


# -- 1. the promote gate ---------------------------------------------------------------------------


def gate_rates(images: int, margin: float, alpha: float, runs: int, seed: int) -> list[dict]:
    "For each gap and discordance: the share of draws each gate promotes."
    rng, rows = np.random.default_rng(seed), []
    for disc in GATE_DISCORDANCE:
        for gap in GATE_GAPS:
            cand, cur = simulate_paired(images, PRODUCTION, gap, disc, runs, rng)
            b, c = (cand & ~cur).sum(1), (~cand & cur).sum(1)
            p = mcnemar_p_value(b, c, images, margin)
            raw = (b - c) / images >= -0.005  # the first gate: at most 0.5 points lost
            rows.append(dict(gap=gap, discordance=disc, mcnemar=float((p < alpha).mean()), raw=float(raw.mean())))
    return rows


# -- 2. a canary's decision ------------------------------------------------------------------------


def split_bounds(arm: np.ndarray, right: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    "The confidence sequence of a traffic split after each label: `(low, high)`, from running counts."
    t = np.arange(1, arm.shape[-1] + 1)
    nc, kc = np.cumsum(arm, -1), np.cumsum(arm & right, -1)
    npr, kp = t - nc, np.cumsum(~arm & right, -1)
    with np.errstate(divide="ignore", invalid="ignore"):  # before both arms have a label: nan, no decision
        s, m = nc / t, (kc + kp) / t
        mean = kc / nc - kp / npr
        sq = (kc * (1 - m) ** 2 + (nc - kc) * m**2) / s**2 + (kp * (1 - m) ** 2 + (npr - kp) * m**2) / (1 - s) ** 2
        return cs_bounds(t, mean, sq - t * mean**2, alpha)


def check_split_bounds(rng) -> None:
    "The running sums give what `compare_arms` gives on the same labels, at a few prefixes."
    arm, right = rng.random(3000) < 0.5, rng.random(3000) < 0.7
    low, high = split_bounds(arm, right, 0.05)
    for n in (10, 250, 3000):
        r = compare_arms(right[:n][arm[:n]], right[:n][~arm[:n]], paired=False)
        assert np.allclose((low[n - 1], high[n - 1]), (r["low"], r["high"])), (n, low[n - 1], r)


def decisions(low, high, margin: float, min_labels: int) -> tuple[np.ndarray, np.ndarray]:
    "For each run: the labels at the first decision (0: none) and what it was (+1 promote, -1 roll back, 0 none)."
    promote, rollback = low > -margin, high < -margin
    promote[:, : min_labels - 1] = rollback[:, : min_labels - 1] = False
    decided = promote | rollback
    first = np.where(decided.any(1), decided.argmax(1), -1)
    idx = np.maximum(first, 0)
    what = np.where(first < 0, 0, np.where(promote[np.arange(len(first)), idx], 1, -1))
    return first + 1, what


def finite(x) -> float | None:
    "A number for JSON: None when infinite."
    return float(x) if np.isfinite(x) else None


def canary_rates(a, rng) -> list[dict]:
    "For each design and gap: labels to a decision, wrong decisions, undecided runs."
    rows = []
    for design in DESIGNS:
        for gap in CANARY_GAPS:
            labels, what = [], []
            for start in range(0, a.canary_runs, CHUNK):
                k = min(CHUNK, a.canary_runs - start)
                if design.startswith("shadow"):
                    cand, prod = simulate_paired(a.max_labels, PRODUCTION, gap, a.discordance, k, rng)
                    _, low, high = cs_path(cand.astype(np.float32) - prod, a.alpha)
                else:
                    arm = rng.random((k, a.max_labels)) < 0.5
                    right = rng.random((k, a.max_labels)) < np.where(arm, PRODUCTION + gap, PRODUCTION)
                    low, high = split_bounds(arm, right, a.alpha)
                n, w = decisions(low, high, a.canary_margin, a.min_labels)
                labels.append(n)
                what.append(w)
            n, w = np.concatenate(labels), np.concatenate(what)
            wrong = ((w == 1) & (gap <= -a.canary_margin + 1e-12)) | ((w == -1) & (gap >= -a.canary_margin - 1e-12))
            n = np.where(w == 0, np.inf, n)  # undecided: more labels than the runs had
            rows.append(
                dict(
                    design=design,
                    gap=gap,
                    runs=len(n),
                    promoted=float((w == 1).mean()),
                    rolled_back=float((w == -1).mean()),
                    undecided=float((w == 0).mean()),
                    wrong=float(wrong.mean()),
                    median=finite(np.median(n)),  # None: more than max_labels
                    p90=finite(np.percentile(n, 90)),
                )
            )
            print(f"  {design}, gap {100 * gap:+.0f}: {rows[-1]}", flush=True)
    return rows


# -- the report ------------------------------------------------------------------------------------


def host() -> dict:
    "The CPU, as the other benchmarks print it."
    from vit_nbdev.engine import host_info

    return dict(host_info(), python=platform.python_version(), numpy=np.__version__)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def labels(x: float | None, most: int) -> str:
    return f"> {most:,}" if x is None else f"{x:,.0f}"


def report(raw: dict) -> str:
    h, a = raw["host"], raw["args"]
    md = [
        "# How sure the promote gate and a canary are: a simulation\n",
        f"CPU: {h['cpu']}; {h['cpus']} CPUs; Python {h['python']}, numpy {h['numpy']}; {raw['seconds']:.0f} s. "
        f"`python bench/bench_canary.py` (seed {a['seed']}); the method: the evidence chapter.\n",
        f"## The promote gate on {a['images']:,} images\n",
        f"The share of {a['gate_runs']:,} draws in which the gate promotes a candidate whose true accuracy is `gap` "
        f"points from production's {100 * PRODUCTION:.0f}%, for two models that disagree on 5-20% of the images. "
        f"McNemar: the exact paired test, margin {100 * a['gate_margin']:g} point, alpha {a['gate_alpha']:g}. "
        "Raw: the first gate, a difference of accuracies against a 0.5-point tolerance, on the same draws. "
        "Above the line a promotion is wrong (the candidate is worse by the margin or more), below it a refusal is "
        "(from 0 on, a candidate is not worse).\n",
    ]
    cols = [f"{100 * d:.0f}% disagree" for d in GATE_DISCORDANCE]
    md += [
        "| true gap | "
        + " | ".join(f"McNemar, {c}" for c in cols)
        + " | "
        + " | ".join(f"raw, {c}" for c in cols)
        + " |"
    ]
    md += ["|---:|" + "---:|" * (2 * len(cols))]
    by = {(r["gap"], r["discordance"]): r for r in raw["gate"]}
    for gap in GATE_GAPS:
        cells = [pct(by[gap, d]["mcnemar"]) for d in GATE_DISCORDANCE] + [
            pct(by[gap, d]["raw"]) for d in GATE_DISCORDANCE
        ]
        md.append(f"| {100 * gap:+.0f} | " + " | ".join(cells) + " |")
    md += [
        "",
        "## A canary's decision, looked at after every label\n",
        f"{a['canary_runs']:,} runs per row. The policy's defaults: margin {100 * a['canary_margin']:g} points, alpha "
        f"{a['alpha']:g}, no decision before {a['min_labels']} labels; production right {100 * PRODUCTION:.0f}% of "
        f"the time. Split: each labelled request answered by one arm, 50/50. Shadow: each label judges both arms' "
        f"answers to the same image, the two disagreeing on {100 * a['discordance']:.0f}% of the images (plus the "
        f"gap). Labels: all labels (both arms). A decision is wrong when it promotes a canary worse by the margin or "
        f"more, or rolls back one that is not worse by more than the margin (at a gap of exactly -margin, both are "
        f"wrong). A run still undecided after {a['max_labels']:,} labels counts as needing more.\n",
        "| design | true gap | promoted | rolled back | undecided | wrong | labels to decide, median | 90th pct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["canary"]:
        median, p90 = (labels(r[k], a["max_labels"]) for k in ("median", "p90"))
        md.append(
            f"| {r['design']} | {100 * r['gap']:+.0f} | {pct(r['promoted'])} | {pct(r['rolled_back'])} | "
            f"{pct(r['undecided'])} | {pct(r['wrong'])} | {median} | {p90} |"
        )
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="the promote gate's images")
    ap.add_argument("--gate-runs", type=int, default=4000, help="draws per gap and discordance")
    ap.add_argument("--gate-margin", type=float, default=0.01, help="the gate's margin, a fraction of one")
    ap.add_argument("--gate-alpha", type=float, default=0.05)
    ap.add_argument("--canary-runs", type=int, default=1000, help="canary runs per design and gap")
    ap.add_argument("--canary-margin", type=float, default=0.02, help="the policy's margin, a fraction of one")
    ap.add_argument("--alpha", type=float, default=0.05, help="the policy's error rate")
    ap.add_argument("--min-labels", type=int, default=200, help="no decision before this many labels")
    ap.add_argument("--max-labels", type=int, default=40_000, help="a run still undecided here counts as undecided")
    ap.add_argument("--discordance", type=float, default=0.15, help="shadow: the share of images the arms disagree on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few runs, 10,000 labels at most, no files written")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="write canary.md and .json here")
    ap.add_argument("--no-out", action="store_true", help="write no files")
    a = ap.parse_args(argv)
    if a.quick:
        a.gate_runs, a.canary_runs, a.max_labels, a.no_out = 500, 100, 10_000, True
    t0, rng = time.monotonic(), np.random.default_rng(a.seed)
    h = host()
    print(f"CPU: {h['cpu']}; {h['cpus']} CPUs; load average {tuple(round(v, 2) for v in os.getloadavg())}", flush=True)
    check_split_bounds(rng)
    gate = gate_rates(a.images, a.gate_margin, a.gate_alpha, a.gate_runs, a.seed)
    print("the gate: done", flush=True)
    canary = canary_rates(a, rng)
    drop = ("out", "no_out")
    raw = dict(
        host=h,
        args={k: v for k, v in vars(a).items() if k not in drop},
        seconds=time.monotonic() - t0,
        gate=gate,
        canary=canary,
    )
    md = report(raw)
    print("\n" + md)
    if not a.no_out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "canary.md").write_text(md)
        (out / "canary.json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
