"""Robustness study of the drift detector (full run): corruptions × severities on the CIFAR-10 test split.

Measures, for a model (default: the checkpoint shipped in the package, `vit-cifar-small-cifar10`):
  (a) accuracy per corruption × severity (6 CIFAR-10-C corruptions, severities 1-5),
  (b) the alarm rate of candidate detectors over disjoint windows of 200 test images per point,
  (c) the false-alarm rate on windows of clean test images (the reference is 500 validation images, so disjoint from
      every window), over several reference draws, and with references of *fitted* (training-split) images for
      comparison.

Selection without peeking: the disjoint windows of every point (corrupted and clean) are split into *validation* windows
(even indices) and *test* windows (odd indices). `alpha` and the number of components are chosen on validation windows
only (the rule is printed and written to the results); every candidate's and the chosen detector's alarm and false-alarm
rates are then reported on the test windows, which took no part in the choice.

Candidates: this module's detector (PCA on pooled embeddings, per-component KS + prediction chi-square + confidence
KS, Bonferroni) at several `alpha` and numbers of components (the ones the choice is among); for comparison, with the
axes fitted on the reference instead, with only some of its tests; Evidently's EmbeddingsDrift methods (model, mmd,
ratio, distance) and its default per-column preset on the raw embedding columns (KS per column, dataset drift when
>= 50% of the columns drift), on test windows.

The per-window p-values of our tests are computed once (20 components: the top-k axes are nested, so k = 5, 10, 20 and
every alpha are read off the same numbers) and saved, so every variant of our detector is scored from them.

    python bench/robustness.py --data path/to/cifar10 --cache /tmp/robust-cache [--n-test 4000]
(`--data`: a local CIFAR-10 parquet folder (HF layout) or a hub id. `--n-test N`: corrupted points use the first N test
images only, N / 200 windows each; the clean windows always use the whole test split.) A model registered in a store
instead: `--store /tmp/mon-store --model latest`.
Writes bench/results/robustness.{md,csv,png}, robustness_detectors.csv, robustness_pvalues.parquet and
robustness_evidently.csv.
Embeddings are cached (--cache), so a re-run only re-scores.
"""

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")  # polite on shared cores
import argparse, platform, sys, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vit_nbdev.config import ALPHA, COMPONENTS, shipped_checkpoint
from vit_nbdev.monitor import as_package, compute_reference, drift_tests, embedding_matrix, ks_pvalue
from vit_nbdev.robustness import plot_study, robustness_study, split_windows, study_table, windows
from vit_nbdev.data import load_cifar10
from vit_nbdev.store import open_store


def md_table(df: pd.DataFrame, index: bool = True) -> str:
    "A GitHub markdown table (without the optional `tabulate` dependency of `DataFrame.to_markdown`)."
    if index:
        df = df.reset_index()
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    cols = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


def alarms(
    pv: pd.DataFrame,
    components: int = COMPONENTS,
    alpha: float = ALPHA,
    groups=("embedding", "prediction", "confidence"),
) -> pd.Series:
    "Our decision per window from its p-values: Bonferroni over the tests kept (as `monitor.decide`)."
    cols = (
        ([f"pc{i + 1}" for i in range(components)] if "embedding" in groups else [])
        + (["label"] if "prediction" in groups else [])
        + (["score"] if "confidence" in groups else [])
    )
    return pv[cols].min(axis=1) * len(cols) < alpha


def _evidently_embeddings(method):
    "Evidently's EmbeddingsDrift decision with `method` on the raw embeddings (its metric, without the t-SNE plot)."

    def det(ref, win):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(method(pd.DataFrame(embedding_matrix(win)), pd.DataFrame(embedding_matrix(ref)))[1])

    return det


def _evidently_default_preset(ref, win, threshold=0.05, share=0.5):
    "Evidently's DataDriftPreset defaults on raw embedding columns (KS per column; drift if >= 50% of them drift)."
    R, C = embedding_matrix(ref), embedding_matrix(win)
    return float(np.mean([ks_pvalue(R[:, j], C[:, j]) <= threshold for j in range(R.shape[1])])) >= share


def evidently_detectors() -> dict:
    from vit_nbdev.monitor import load_evidently

    load_evidently()
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import distance, mmd, model, ratio

    return {
        "Evidently EmbeddingsDrift model (its default)": _evidently_embeddings(model(bootstrap=True)),
        "Evidently EmbeddingsDrift mmd (bootstrap)": _evidently_embeddings(mmd(bootstrap=True)),
        "Evidently EmbeddingsDrift ratio (default)": _evidently_embeddings(ratio()),
        "Evidently EmbeddingsDrift distance (bootstrap)": _evidently_embeddings(distance(bootstrap=True)),
        "Evidently DataDriftPreset defaults, raw columns": _evidently_default_preset,
    }


CANDIDATES = [
    (k, al) for k in (5, 10, 20) for al in (0.05, 0.02, 0.01)
]  # (components, alpha): the choice is among these
MIN_COST = 0.05  # a point is harmful when it costs >= 5 points of accuracy
RULE = (
    "the choice is among the 9 candidates components in {5, 10, 20} × alpha in {0.05, 0.02, 0.01} (all three test "
    "groups, seed-0 reference) and uses validation windows only: keep the candidates whose false-alarm rate on the "
    "clean validation windows is <= their own alpha; among them, take the highest mean alarm rate on validation "
    "windows over the harmful points (corruption × severity whose accuracy on its validation windows is >= 5 points "
    "below that of the same clean images); ties: lower validation false-alarm rate, then smaller alpha, then fewer "
    "components"
)


def cand_name(components: int, alpha: float) -> str:
    "The name of one of our candidates."
    return f"PCA-{components} pooled + pred + conf, alpha {alpha}"


def cpu_model() -> str:
    "The CPU's model name (from /proc/cpuinfo) and the number of cores this process may use."
    name = platform.processor()
    try:
        name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or 'unknown CPU'} ({len(os.sched_getaffinity(0))} cores available, shared; torch threads 1)"


def point_rates(pv: pd.DataFrame, part: str, **kw) -> pd.Series:
    "Alarm rate of our detector (`alarms(**kw)`) per corruption × severity over the `part` windows (validation, test)."
    d = pv[pv.part == part]
    return alarms(d, **kw).groupby(level=["corruption", "severity"], sort=False).mean()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default="vit-cifar-small-cifar10",
        help="a checkpoint shipped in the package; with --store: a version or alias there",
    )
    ap.add_argument(
        "--store", default=None, help="a store with the model registered (default: --model is a shipped checkpoint)"
    )
    ap.add_argument("--data", required=True, help="a local CIFAR-10 parquet folder (HF layout) or a hub id")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--cache", default="/tmp/robust-cache")
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--ref-seeds", type=int, default=5, help="reference draws for the false-alarm rate")
    ap.add_argument(
        "--compare-windows",
        type=int,
        default=5,
        help="test windows per corrupted point for Evidently's (slower) candidates",
    )
    ap.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="corrupted points use only the first N test images (clean windows: all)",
    )
    ap.add_argument("--no-evidently", action="store_true", help="skip Evidently's detectors")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cpu = cpu_model()
    print(f"CPU: {cpu}", flush=True)

    folder = None if a.store else shipped_checkpoint(a.model)
    if folder is None and not a.store:
        ap.error(f"{a.model!r} is not a checkpoint shipped in the package: pass --store for a registered model")
    if folder is not None:
        pkg = as_package(folder)
        version = pkg.version or a.model
        cache_base = Path(a.cache) / a.model / version
        model_desc = f"the shipped checkpoint `{a.model}` (version `{version}`)"
    else:
        st = open_store(a.store)
        version = st.resolve(a.model)
        pkg = as_package(st.fetch_model(version))
        cache_base = Path(a.cache) / version
        model_desc = f"`{version}` from the store `{a.store}`"
    params, metrics = pkg.card.get("params", {}), pkg.card.get("metrics", {})
    data = load_cifar10(
        a.data, val_fraction=params.get("val_fraction", 0.2), seed=params.get("seed", 0), progress=False
    )
    xt, yt = data.test.images, data.test.labels
    n = len(yt) if a.n_test is None else min(a.n_test, len(yt))
    x, y = xt[:n], yt[:n]
    print(
        f"model {model_desc}: {params.get('model')}, {params.get('epochs')} epochs, "
        f"test acc in its card {metrics.get('test_acc')}; {n} test images per corrupted point, {len(yt)} clean; "
        f"cache {cache_base}",
        flush=True,
    )

    # (a) embeddings (cached) and accuracy: clean on the whole test split, corrupted points on its first n images
    robustness_study(
        pkg,
        xt,
        yt,
        None,
        window=a.window,
        detectors={},
        corruptions=[],
        cache_dir=cache_base / str(len(yt)),
        progress=True,
    )
    acc_df = robustness_study(
        pkg, x, y, None, window=a.window, detectors={}, clean=False, cache_dir=cache_base / str(n), progress=True
    )
    recs = {("none", 0): pd.read_parquet(cache_base / str(len(yt)) / "none-0.parquet")}
    recs.update(
        {
            (k, int(s)): pd.read_parquet(cache_base / str(n) / f"{k}-{s}.parquet")
            for k, s in zip(acc_df.corruption, acc_df.severity, strict=True)
        }
    )
    cases = list(recs)
    t_embed = time.time() - t_start
    print(f"embeddings done: {t_embed:.0f} s", flush=True)

    # windows: clean windows cover the whole test split, corrupted ones its first n images (the same images as the first
    # clean ones); even indices are validation windows, odd indices test windows
    ws = {k: windows(len(recs[k]), a.window) for k in cases}
    nw = len(ws[cases[1]])
    name_to_id = {lab: i for i, lab in enumerate(pkg.labels)}
    correct = {
        k: np.array([name_to_id[lab] for lab in recs[k]["label"]]) == (yt if k == ("none", 0) else y).numpy()
        for k in cases
    }

    def acc_on(k, part, first=None):
        sel = split_windows(ws[k][:first])[part == "test"]
        return float(np.concatenate([correct[k][w] for w in sel]).mean())

    acc = pd.DataFrame(
        [
            dict(
                corruption=k[0],
                severity=k[1],
                accuracy=float(correct[k][:n].mean()),
                accuracy_validation=acc_on(k, "validation", nw),
                accuracy_test=acc_on(k, "test", nw),
            )
            for k in cases
        ]
    ).set_index(["corruption", "severity"])
    clean_full = float(correct[("none", 0)].mean())
    clean_val = acc.loc[("none", 0), "accuracy_validation"]
    harmful = [k for k in cases[1:] if clean_val - acc.loc[k, "accuracy_validation"] >= MIN_COST]
    acc["harmful"] = [k in harmful for k in cases]
    print(
        f"clean accuracy {clean_full:.4f} (all {len(yt)}), {acc.loc[('none', 0), 'accuracy']:.4f} (first {n}); "
        f"harmful points (on validation windows): {harmful}",
        flush=True,
    )

    # p-values of our tests per window: reference seed 0 on every point (pooled 20 components, and axes of the
    # reference); clean windows also against references of other seeds, and of fitted (training-split) images
    refs = {
        ("validation", s): compute_reference(pkg, a.data, n=500, seed=s, split="validation") for s in range(a.ref_seeds)
    }
    refs.update(
        {("train", s): compute_reference(pkg, a.data, n=500, seed=s, split="train") for s in range(a.ref_seeds)}
    )
    held_out = refs[("validation", 0)].attrs["reference"]["held_out"]
    jobs = [(k, ("validation", 0), fit) for k in cases for fit in ("pooled", "reference")]
    jobs += [(("none", 0), r, "pooled") for r in refs if r != ("validation", 0)]
    rows = []
    for case, ref_id, fit in jobs:
        ref = refs[ref_id]
        for i, w in enumerate(ws[case]):
            p = drift_tests(
                ref,
                recs[case].iloc[w].reset_index(drop=True),
                components=20 if fit == "pooled" else COMPONENTS,
                fit=fit,
            )["p_values"]
            rows.append(
                dict(
                    corruption=case[0],
                    severity=case[1],
                    reference=ref_id[0],
                    ref_seed=ref_id[1],
                    fit=fit,
                    window=i,
                    part="validation" if i % 2 == 0 else "test",
                    **p,
                )
            )
        if case[1] in (0, 5) and fit == "pooled":
            print(f"p-values {case} {ref_id}: {time.time() - t_start:.0f} s", flush=True)
    pv = pd.DataFrame(rows)
    pv.to_parquet(out / "robustness_pvalues.parquet")
    main_pv = pv[(pv.reference == "validation") & (pv.ref_seed == 0) & (pv.fit == "pooled")].set_index(
        ["corruption", "severity", "window"]
    )
    ref_pv = pv[(pv.reference == "validation") & (pv.ref_seed == 0) & (pv.fit == "reference")].set_index(
        ["corruption", "severity", "window"]
    )
    clean_pv = pv[(pv.corruption == "none") & (pv.fit == "pooled") & (pv.part == "test")]

    # the choice, on validation windows only
    val = {c: point_rates(main_pv, "validation", components=c[0], alpha=c[1]) for c in CANDIDATES}
    fa_v = {c: float(val[c][("none", 0)]) for c in CANDIDATES}
    hm_v = {c: float(val[c][harmful].mean()) if harmful else float("nan") for c in CANDIDATES}
    eligible = [c for c in CANDIDATES if fa_v[c] <= c[1]]
    if not eligible:
        print("WARNING: no candidate meets its alpha on the clean validation windows; choosing among all", flush=True)
    chosen = max(eligible or CANDIDATES, key=lambda c: (0 if np.isnan(hm_v[c]) else hm_v[c], -fa_v[c], -c[1], -c[0]))
    CHOSEN = f"chosen: {cand_name(*chosen)}"
    print(
        f"rule: {RULE}\nchosen on validation windows: components {chosen[0]}, alpha {chosen[1]} "
        f"(config defaults: components {COMPONENTS}, alpha {ALPHA})",
        flush=True,
    )

    # every candidate on the test windows
    def fa_over_refs(kind, **kw):
        r = [float(alarms(d, **kw).mean()) for _, d in clean_pv[clean_pv.reference == kind].groupby("ref_seed")]
        return float(np.mean(r)), float(np.max(r))

    def test_score(rate):
        hr = rate[harmful] if harmful else pd.Series(dtype=float)
        worst = hr.idxmin() if len(hr) else None
        return dict(
            test_false_alarm=float(rate[("none", 0)]),
            test_mean_alarm_harmful=float(hr.mean()) if len(hr) else float("nan"),
            test_min_alarm_harmful=float(hr.min()) if len(hr) else float("nan"),
            worst_point=f"{worst[0]} {worst[1]}" if worst else "",
        )

    variants = {cand_name(*c): dict(components=c[0], alpha=c[1]) for c in CANDIDATES}
    variants.update(
        {
            f"PCA-10 pooled, embedding tests only, alpha {al}": dict(alpha=al, groups=("embedding",))
            for al in (0.05, 0.02)
        }
    )
    variants.update(
        {
            f"prediction + confidence tests only, alpha {al}": dict(alpha=al, groups=("prediction", "confidence"))
            for al in (0.05, 0.02)
        }
    )
    summ, test_rates = [], {}
    for name, kw in variants.items():
        c = (kw.get("components"), kw.get("alpha")) if name in map(lambda c: cand_name(*c), CANDIDATES) else None
        rv, rt = point_rates(main_pv, "validation", **kw), point_rates(main_pv, "test", **kw)
        test_rates[name] = rt
        held, fitted = fa_over_refs("validation", **kw), fa_over_refs("train", **kw)
        summ.append(
            dict(
                detector=name,
                candidate=c is not None,
                val_false_alarm=float(rv[("none", 0)]),
                val_mean_alarm_harmful=float(rv[harmful].mean()) if harmful else float("nan"),
                eligible=c is not None and c in eligible,
                chosen=c == chosen,
                **test_score(rt),
                test_false_alarm_mean_refs=held[0],
                test_false_alarm_max_refs=held[1],
                test_false_alarm_fitted_ref_mean=fitted[0],
            )
        )
    for al in (0.05, 0.02):
        name = f"PCA-10 axes of the reference + pred + conf, alpha {al}"
        rv, rt = point_rates(ref_pv, "validation", alpha=al), point_rates(ref_pv, "test", alpha=al)
        test_rates[name] = rt
        summ.append(
            dict(
                detector=name,
                candidate=False,
                val_false_alarm=float(rv[("none", 0)]),
                val_mean_alarm_harmful=float(rv[harmful].mean()) if harmful else float("nan"),
                eligible=False,
                chosen=False,
                **test_score(rt),
            )
        )

    comp, ev = None, {}
    if not a.no_evidently:
        ev = evidently_detectors()
        cref = refs[("validation", 0)]
        crow = []
        for case in cases:
            tw = split_windows(ws[case])[1]
            tw = tw if case == ("none", 0) else tw[: a.compare_windows]
            row = dict(
                corruption=case[0], severity=case[1], accuracy=float(acc.loc[case, "accuracy"]), test_windows=len(tw)
            )
            for name, det in ev.items():
                t0 = time.perf_counter()
                row[name] = float(np.mean([det(cref, recs[case].iloc[w].reset_index(drop=True)) for w in tw]))
                row[f"{name} s/window"] = (time.perf_counter() - t0) / len(tw)
            crow.append(row)
            print("evidently", case, {k: round(v, 2) for k, v in row.items() if k in ev}, flush=True)
        comp = pd.DataFrame(crow)
        comp.to_csv(out / "robustness_evidently.csv", index=False)
        for name in ev:
            summ.append(
                dict(
                    detector=name,
                    candidate=False,
                    eligible=False,
                    chosen=False,
                    **test_score(comp.set_index(["corruption", "severity"])[name]),
                    s_per_window=float(comp[f"{name} s/window"].mean()),
                )
            )
    summ = pd.DataFrame(summ)
    summ.to_csv(out / "robustness_detectors.csv", index=False)

    nv, nt = len(split_windows(ws[cases[1]])[0]), len(split_windows(ws[cases[1]])[1])
    nvc, ntc = len(split_windows(ws[("none", 0)])[0]), len(split_windows(ws[("none", 0)])[1])
    full = acc.copy()
    full[CHOSEN] = test_rates[cand_name(*chosen)]
    full[f"{CHOSEN} (validation windows)"] = val[chosen]
    for c in CANDIDATES:
        full[f"{cand_name(*c)} (test windows)"] = test_rates[cand_name(*c)]
    full["validation_windows"] = [nvc if k == ("none", 0) else nv for k in cases]
    full["test_windows"] = [ntc if k == ("none", 0) else nt for k in cases]
    full = full.reset_index()
    full.to_csv(out / "robustness.csv", index=False)

    plot_df = full[["corruption", "severity", "accuracy", CHOSEN]]
    fig = plot_study(
        plot_df,
        CHOSEN,
        f"{a.model} (clean test acc {clean_full:.2f}); alarm rates on test windows "
        f"({nt} of {a.window} per corrupted point, {ntc} clean)",
    )
    fig.savefig(out / "robustness.png", dpi=120)

    elapsed = time.time() - t_start
    cmd = "python bench/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tab = study_table(plot_df, CHOSEN)
    chosen_rate = full.set_index(["corruption", "severity"])[CHOSEN]
    same = chosen == (COMPONENTS, ALPHA)
    md = [
        "# Robustness study of the drift detector\n",
        f"Model: {model_desc} ({pkg.model.config.hidden_size}-d embeddings; {params.get('model')}, "
        f"{params.get('epochs')} epochs on {params.get('dataset')}; test accuracy {clean_full:.4f} on the {len(yt)} "
        f"clean test images, {metrics.get('test_acc')} in its card). Corruptions and severities of CIFAR-10-C on the "
        f"CIFAR-10 test split: every corrupted point uses the first {n} test images, i.e. {nw} disjoint windows of "
        f"{a.window}; the clean windows cover all {len(yt)} test images ({len(ws[('none', 0)])} windows; the first "
        f"{nw} are the same images as the corrupted windows). Reference: 500 random images of the validation carve "
        f"(seed 0; held out from this model's training run: {held_out}), disjoint from every window.\n",
        f"Validation / test windows: even-indexed windows are validation windows ({nv} per corrupted point, "
        f"{nvc} clean), odd-indexed ones test windows ({nt} per corrupted point, {ntc} clean). **Rule**: {RULE}. "
        f"Harmful points (on validation windows): {', '.join(f'{k[0]} {k[1]}' for k in harmful) or 'none'}.\n",
        f"**Chosen on validation windows: {chosen[0]} components, alpha {chosen[1]}** (validation: false-alarm rate "
        f"{fa_v[chosen]:.3f}, mean alarm rate over the harmful points {hm_v[chosen]:.3f}). The config defaults are "
        f"components {COMPONENTS}, alpha {ALPHA}: "
        + ("the same." if same else "**different**; the defaults were not changed.")
        + "\n",
        f"`{cmd}` on {cpu}: {elapsed:.0f} s in all, of which {t_embed:.0f} s computing or loading the embeddings "
        f"(cached under `{a.cache}`).\n",
        "## Accuracy / alarm rate of the chosen detector on the test windows\n",
        f"Each cell: model accuracy (all {n} images of the point) / share of *test* windows with an alarm. "
        f"Severity 0 is clean data ({ntc} test windows): its alarm rate is the false-alarm rate.\n",
        md_table(tab),
        "",
        "Harmful points (accuracy drop on validation windows / alarm rate on test windows): "
        + (
            "; ".join(
                f"{k[0]} {k[1]}: -{clean_val - acc.loc[k, 'accuracy_validation']:.3f} / {chosen_rate[k]:.2f}"
                for k in harmful
            )
            or "none"
        )
        + "\n",
        "## Candidates\n",
        "candidate: among the choice's candidates; val_*: on validation windows (seed-0 reference), eligible: "
        "val_false_alarm <= alpha; test_*: on test windows only; _mean_alarm_harmful / _min_alarm_harmful: mean / "
        "lowest alarm rate over the harmful points, worst_point: where it is lowest; "
        "test_false_alarm_mean_refs / _max_refs: "
        f"clean test windows over {a.ref_seeds} reference draws; _fitted_ref_mean: references of training-split images "
        f"the model was fitted on. Evidently's candidates: {a.compare_windows} test windows per corrupted point (they "
        f"are slower), {ntc} clean test windows, seed-0 reference; "
        "s_per_window: their time per window.\n",
        md_table(summ.round(3), index=False),
        "",
        "## The choice's candidates per point, alarm rate on test windows (seed-0 reference)\n",
        md_table(
            pd.DataFrame({f"PCA-{c[0]} a{c[1]}": test_rates[cand_name(*c)] for c in CANDIDATES})
            .assign(accuracy=acc.accuracy, harmful=acc.harmful)
            .round(3)
        ),
        "",
    ]
    if comp is not None:
        md += [
            "## Evidently's candidates, alarm rate per point (test windows)\n",
            md_table(comp[["corruption", "severity", "accuracy", "test_windows", *ev]].round(3), index=False),
            "",
        ]
    (out / "robustness.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
