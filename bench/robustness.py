"""Robustness study of the drift detector (full run): corruptions × severities on the CIFAR-10 test split.

Measures, for a trained model package:
  (a) accuracy per corruption × severity (6 CIFAR-10-C corruptions, severities 1-5),
  (b) the alarm rate of candidate detectors over the 50 disjoint windows of 200 test images,
  (c) the false-alarm rate on windows of clean test images (the reference is 500 validation images, so disjoint),
      over several reference draws, and with references of *fitted* (training-split) images for comparison.

Candidates: this module's detector (PCA on pooled embeddings, per-component KS + prediction chi-square + confidence
KS, Bonferroni) at several `alpha` and numbers of components, with the axes fitted on the reference instead, with
only some of its tests; Evidently's EmbeddingsDrift methods (model, mmd, ratio, distance); Evidently's default
per-column preset on the raw embedding columns (KS per column, dataset drift when >= 50% of the columns drift).

The per-window p-values of our tests are computed once (20 components: the top-k axes are nested, so k = 5, 10, 20 and
every alpha are read off the same numbers) and saved, so every variant of our detector is scored from them.

Train the model first (10-20 minutes on 2 CPU cores, more when they are busy):
    vit-train --direct -p dataset /work/shared/data/cifar10 -p model vit-cifar-tiny -p epochs 3 -p tracker none \
        -p store /tmp/mon-store -p checkpoint_dir /tmp/mon-ck -p run_id mon
then:
    python bench/robustness.py --store /tmp/mon-store --model latest --data /work/shared/data/cifar10
Writes bench/results/robustness.{md,csv,png}, robustness_pvalues.parquet, robustness_evidently.csv.
Embeddings are cached (--cache), so a re-run only re-scores.
"""
import os
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")   # polite on shared cores
import argparse, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vit_nbdev.config import ALPHA, COMPONENTS
from vit_nbdev.monitor import as_package, compute_reference, drift_tests, embedding_matrix, ks_pvalue
from vit_nbdev.robustness import plot_study, robustness_study, study_table, windows
from vit_nbdev.data import load_cifar10
from vit_nbdev.store import open_store

OURS = f"ours (PCA-{COMPONENTS} pooled + prediction + confidence, alpha {ALPHA})"


def md_table(df: pd.DataFrame, index: bool = True) -> str:
    "A GitHub markdown table (without the optional `tabulate` dependency of `DataFrame.to_markdown`)."
    if index: df = df.reset_index()
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    cols = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


def alarms(pv: pd.DataFrame, components: int = COMPONENTS, alpha: float = ALPHA, groups=("embedding", "prediction", "confidence")) -> pd.Series:
    "Our decision per window from its p-values: Bonferroni over the tests kept (as `monitor.decide`)."
    cols = ([f"pc{i + 1}" for i in range(components)] if "embedding" in groups else []) + \
           (["label"] if "prediction" in groups else []) + (["score"] if "confidence" in groups else [])
    return pv[cols].min(axis=1) * len(cols) < alpha


def _evidently_embeddings(method):
    "Evidently's EmbeddingsDrift decision with `method` on the raw embeddings (what its metric computes, without the t-SNE plot)."
    def det(ref, win):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(method(pd.DataFrame(embedding_matrix(win)), pd.DataFrame(embedding_matrix(ref)))[1])
    return det


def _evidently_default_preset(ref, win, threshold=0.05, share=0.5):
    "Evidently's DataDriftPreset defaults on raw embedding columns (reference <= 1000 rows: KS per column; drift if >= 50% drift)."
    R, C = embedding_matrix(ref), embedding_matrix(win)
    return float(np.mean([ks_pvalue(R[:, j], C[:, j]) <= threshold for j in range(R.shape[1])])) >= share


def evidently_detectors() -> dict:
    from vit_nbdev.monitor import load_evidently
    load_evidently()
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import distance, mmd, model, ratio
    return {"Evidently EmbeddingsDrift model (its default)": _evidently_embeddings(model(bootstrap=True)),
            "Evidently EmbeddingsDrift mmd (bootstrap)": _evidently_embeddings(mmd(bootstrap=True)),
            "Evidently EmbeddingsDrift ratio (default)": _evidently_embeddings(ratio()),
            "Evidently EmbeddingsDrift distance (bootstrap)": _evidently_embeddings(distance(bootstrap=True)),
            "Evidently DataDriftPreset defaults, raw columns": _evidently_default_preset}


def score(acc: pd.DataFrame, alarm: pd.Series, min_cost: float = 0.05) -> dict:
    "False-alarm rate, and the lowest alarm rate at severity >= 3 over corruptions that cost >= `min_cost` accuracy there."
    rate = alarm.groupby(level=["corruption", "severity"]).mean()
    clean_acc = acc.loc[("none", 0)]
    hard = [k for k in rate.index if k[1] >= 3 and clean_acc - acc.loc[k] >= min_cost]
    worst = min(hard, key=lambda k: rate[k]) if hard else None
    return dict(false_alarm=float(rate[("none", 0)]), min_alarm_sev3=float(rate[worst]) if worst else float("nan"),
                worst=f"{worst[0]} {worst[1]}" if worst else "", rate=rate)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="/tmp/mon-store")
    ap.add_argument("--model", default="latest")
    ap.add_argument("--data", default="/work/shared/data/cifar10")
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"))
    ap.add_argument("--cache", default="/tmp/mon-study-cache")
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--ref-seeds", type=int, default=5, help="reference draws for the false-alarm rate")
    ap.add_argument("--compare-windows", type=int, default=10, help="windows per corrupted point for Evidently's (slower) candidates")
    ap.add_argument("--n-test", type=int, default=None, help="use only the first N test images (a smoke run)")
    ap.add_argument("--no-evidently", action="store_true", help="skip Evidently's detectors")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    st = open_store(a.store)
    version = st.resolve(a.model)
    pkg = as_package(st.fetch_model(version))
    params = pkg.card.get("params", {})
    data = load_cifar10(a.data, val_fraction=params.get("val_fraction", 0.2), seed=params.get("seed", 0), progress=False)
    x, y = data.test.images[:a.n_test], data.test.labels[:a.n_test]
    cache = Path(a.cache)/version/str(len(y))
    print(f"model {version} (test acc in its card: {pkg.card.get('metrics', {}).get('test_acc')}); {len(y)} test images; cache {cache}", flush=True)

    # (a) accuracy per corruption × severity; embeddings cached
    acc_df = robustness_study(pkg, x, y, None, window=a.window, detectors={}, cache_dir=cache, progress=True)
    acc = acc_df.set_index(["corruption", "severity"]).accuracy
    cases = list(acc.index)
    recs = {k: pd.read_parquet(cache/f"{k[0]}-{k[1]}.parquet") for k in cases}
    ws = windows(len(y), a.window)
    print(f"embeddings done: {time.time() - t_start:.0f} s", flush=True)

    # p-values of our tests per window: reference seed 0 on every point (pooled 20 components, and axes of the reference);
    # clean windows also against references of other seeds, and of fitted (training-split) images
    refs = {("validation", s): compute_reference(pkg, a.data, n=500, seed=s, split="validation") for s in range(a.ref_seeds)}
    refs.update({("train", s): compute_reference(pkg, a.data, n=500, seed=s, split="train") for s in range(a.ref_seeds)})
    assert refs[("validation", 0)].attrs["reference"]["held_out"], "the reference should be held-out validation images"
    jobs = [(k, ("validation", 0), fit) for k in cases for fit in ("pooled", "reference")]
    jobs += [(("none", 0), r, "pooled") for r in refs if r != ("validation", 0)]
    rows = []
    for (case, ref_id, fit) in jobs:
        ref = refs[ref_id]
        for i, w in enumerate(ws):
            p = drift_tests(ref, recs[case].iloc[w].reset_index(drop=True), components=20 if fit == "pooled" else COMPONENTS, fit=fit)["p_values"]
            rows.append(dict(corruption=case[0], severity=case[1], reference=ref_id[0], ref_seed=ref_id[1], fit=fit, window=i, **p))
        if case[1] in (0, 5) and fit == "pooled": print(f"p-values {case} {ref_id}: {time.time() - t_start:.0f} s", flush=True)
    pv = pd.DataFrame(rows)
    pv.to_parquet(out/"robustness_pvalues.parquet")

    main_pv = pv[(pv.reference == "validation") & (pv.ref_seed == 0) & (pv.fit == "pooled")].set_index(["corruption", "severity", "window"])
    ref_pv = pv[(pv.reference == "validation") & (pv.ref_seed == 0) & (pv.fit == "reference")].set_index(["corruption", "severity", "window"])
    full = acc_df.copy()
    full[OURS] = [score(acc, alarms(main_pv))["rate"][k] for k in cases]
    full["windows"] = len(ws)
    full.to_csv(out/"robustness.csv", index=False)

    # candidates: our detector's variants (from the p-values), false alarms over reference draws
    clean_pv = pv[(pv.corruption == "none") & (pv.fit == "pooled")]
    def fa_over_refs(kind, **kw):
        r = clean_pv[clean_pv.reference == kind].groupby("ref_seed", group_keys=False).apply(lambda d: alarms(d, **kw).mean())
        return float(r.mean()), float(r.max())
    variants = {f"PCA-{k} pooled + pred + conf, alpha {al}": dict(components=k, alpha=al) for k in (5, 10, 20) for al in (0.05, 0.02, 0.01)}
    variants.update({f"PCA-10 pooled, embedding tests only, alpha {al}": dict(alpha=al, groups=("embedding",)) for al in (0.05, 0.02)})
    variants.update({f"prediction + confidence tests only, alpha {al}": dict(alpha=al, groups=("prediction", "confidence")) for al in (0.05, 0.02)})
    summ = []
    for name, kw in variants.items():
        s = score(acc, alarms(main_pv, **kw))
        held, fitted = fa_over_refs("validation", **kw), fa_over_refs("train", **kw)
        summ.append(dict(detector=name, false_alarm_seed0=s["false_alarm"], false_alarm_mean=held[0], false_alarm_max=held[1],
                         false_alarm_fitted_ref_mean=fitted[0], min_alarm_sev3=s["min_alarm_sev3"], worst_point=s["worst"],
                         meets_targets=held[0] <= 0.05 and held[1] <= 0.05 and s["min_alarm_sev3"] >= 0.9))
    for al in (0.05, 0.02):
        s = score(acc, alarms(ref_pv, alpha=al))
        summ.append(dict(detector=f"PCA-10 axes of the reference + pred + conf, alpha {al}", false_alarm_seed0=s["false_alarm"],
                         false_alarm_mean=float("nan"), false_alarm_max=float("nan"), false_alarm_fitted_ref_mean=float("nan"),
                         min_alarm_sev3=s["min_alarm_sev3"], worst_point=s["worst"], meets_targets=False))

    comp = None
    if not a.no_evidently:
        ev = evidently_detectors()
        cref = refs[("validation", 0)]
        crow = []
        for case in cases:
            n = len(ws) if case == ("none", 0) else a.compare_windows
            row = dict(corruption=case[0], severity=case[1], accuracy=float(acc[case]), windows=n)
            for name, det in ev.items():
                t0 = time.perf_counter()
                row[name] = float(np.mean([det(cref, recs[case].iloc[w].reset_index(drop=True)) for w in ws[:n]]))
                row[f"{name} s/window"] = (time.perf_counter() - t0) / n
            crow.append(row)
            print("evidently", case, {k: round(v, 2) for k, v in row.items() if k in ev}, flush=True)
        comp = pd.DataFrame(crow)
        comp.to_csv(out/"robustness_evidently.csv", index=False)
        for name in ev:
            s = score(acc, comp.set_index(["corruption", "severity"])[name])
            summ.append(dict(detector=name, false_alarm_seed0=s["false_alarm"], false_alarm_mean=float("nan"), false_alarm_max=float("nan"),
                             false_alarm_fitted_ref_mean=float("nan"), min_alarm_sev3=s["min_alarm_sev3"], worst_point=s["worst"],
                             meets_targets=s["false_alarm"] <= 0.05 and s["min_alarm_sev3"] >= 0.9,
                             s_per_window=float(comp[f"{name} s/window"].mean())))
    summ = pd.DataFrame(summ)
    summ.to_csv(out/"robustness_detectors.csv", index=False)

    fig = plot_study(full, OURS, f"{version[:16]}…: tiny ViT (test acc {acc[('none', 0)]:.2f}), CIFAR-10 test, {len(ws)} windows of {a.window}")
    fig.savefig(out/"robustness.png", dpi=120)

    clean_acc = acc[("none", 0)]
    md = ["# Robustness study of the drift detector\n",
          f"Model `{version}` ({pkg.model.config.hidden_size}-d embeddings; {params.get('model')}, {params.get('epochs')} epochs on "
          f"{params.get('dataset')}; clean test accuracy {clean_acc:.3f}). CIFAR-10 test split ({len(y)} images), {len(ws)} disjoint windows "
          f"of {a.window} per point. Reference: 500 random validation images (seed 0), held out from training. Corruptions and "
          f"severities of CIFAR-10-C. `python bench/robustness.py --store {a.store} --model {a.model} --data {a.data}` "
          f"({time.time() - t_start:.0f} s with cached embeddings; embeddings of 31 × 10,000 images take about 10 minutes more).\n",
          f"## Accuracy / alarm rate of the chosen detector: {OURS}\n",
          "Each cell: model accuracy / share of windows with an alarm. Severity 0 is clean data: its alarm rate is the false-alarm rate.\n",
          md_table(study_table(full, OURS)), "",
          "Points at severity >= 3 that cost the model >= 5 points of accuracy (accuracy drop / alarm rate): "
          + ("; ".join(f"{k[0]} {k[1]}: -{clean_acc - acc[k]:.3f} / {full.set_index(['corruption', 'severity'])[OURS][k]:.2f}"
                       for k in cases if k[1] >= 3 and clean_acc - acc[k] >= 0.05) or "none") + "\n",
          "## Candidates\n",
          f"false_alarm_seed0: clean windows against the seed-0 reference; _mean / _max: over {a.ref_seeds} reference draws; "
          "_fitted_ref_mean: references of training-split images the model was fitted on. min_alarm_sev3: the lowest alarm rate "
          "at severity >= 3 among points that cost the model >= 5 points of accuracy (target >= 0.9), worst_point: where. "
          f"Evidently's candidates: {a.compare_windows} windows per corrupted point (they are slower), 50 clean windows, seed-0 reference; "
          "s_per_window: their time per window (ours: about 0.05 s).\n",
          md_table(summ.round(3), index=False), "",
          f"## Our detector (PCA-{COMPONENTS} pooled + prediction + confidence) per point at three alpha, seed-0 reference\n",
          md_table(pd.DataFrame({f"alpha {al}": alarms(main_pv, alpha=al).groupby(level=["corruption", "severity"], sort=False).mean()
                                 for al in (0.05, 0.02, 0.01)}).assign(accuracy=acc).round(3)), ""]
    if comp is not None:
        md += ["## Evidently's candidates, alarm rate per point\n",
               md_table(comp[["corruption", "severity", "accuracy", *ev]].round(3), index=False), ""]
    (out/"robustness.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
