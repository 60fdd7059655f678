"""Scale benchmark of the drift report: 10,000 current records against 500 reference records (target: <= 10 s on 2
cores).

Times, for embedding sizes of the presets (128: vit-cifar-tiny, 256: vit-cifar-small, 768: vit-b16):
  - ours: `drift_report` (PCA on pooled embeddings, 12 Evidently ValueDrift tests, Evidently HTML) and its fast path
    `drift_tests`;
  - end to end as `/admin/update-monitoring` does it: 10,000 records in 20 telemetry shards in a local store ->
    `run_monitoring` (read the window, read the stored reference, report, store HTML + JSON);
  - the seed's way: Evidently's default per-column preset (`DataDriftPreset()`) on the raw embedding columns (one column
    per dimension) plus its HTML;
  - Evidently's own embedding-drift metric (`EmbeddingsDrift`, its default `model` method) plus its HTML: the
    alternative the robustness study compared with (its plot runs t-SNE on up to 2,500 + 500 points).
Evidently's import (seconds, once per process) is timed on its own and excluded from the others.

    python bench/bench_monitor.py                 # all three sizes
    python bench/bench_monitor.py --dims 256 --repeat 3
Prints a markdown table; --out writes it to a file too.
"""

import argparse, importlib, io, os, tempfile, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def records(n, d, rng, shift=0.0, version="v1", start="2026-11-26T00:00:00Z"):
    "Telemetry-like records: embeddings with a decaying spectrum (as real ones have), predicted labels, scores, times."
    from vit_nbdev.data import CIFAR10_LABELS

    E = (rng.normal(size=(n, d)) * np.geomspace(3, 0.1, d) + shift).astype(np.float32)
    return pd.DataFrame(
        {
            "time": pd.date_range(start, periods=n, freq="100ms"),
            "request_id": [f"r{i}" for i in range(n)],
            "model_version": version,
            "label": rng.choice(CIFAR10_LABELS, n),
            "score": rng.uniform(0.1, 1, n).astype(np.float32),
            "embedding": list(E),
        }
    )


def best(fn, repeat, *args, **kwargs):
    "Best time of `repeat` calls of `fn(*args, **kwargs)`, and the last result."
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        ts.append(time.perf_counter() - t)
    return min(ts), out


def raw(df):
    "The embeddings of `df` as one column per dimension, as Evidently's per-column presets want them."
    E = np.stack(df.embedding.to_numpy())
    return pd.DataFrame(E, columns=[f"e{j}" for j in range(E.shape[1])])


def preset_html(R, C, dd):
    "Evidently's default per-column drift preset on the raw columns, and its HTML."
    from evidently import Report, Dataset
    from evidently.presets import DataDriftPreset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snap = Report([DataDriftPreset()]).run(
            Dataset.from_pandas(C, data_definition=dd), Dataset.from_pandas(R, data_definition=dd)
        )
        return snap.get_html_str(as_iframe=False)


def embeddings_metric_html(R, C, dde):
    "Evidently's own embedding-drift metric, and its HTML."
    from evidently import Report, Dataset
    from evidently.metrics.embeddings import EmbeddingsDrift

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snap = Report([EmbeddingsDrift(embeddings_name="embedding")]).run(
            Dataset.from_pandas(C, data_definition=dde), Dataset.from_pandas(R, data_definition=dde)
        )
        return snap.get_html_str(as_iframe=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 768])
    ap.add_argument("--current", type=int, default=10_000)
    ap.add_argument("--reference", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs for each timing")
    ap.add_argument(
        "--threads", type=int, default=None, help="cap BLAS/torch threads (default: as the environment says)"
    )
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    t = time.perf_counter()
    from vit_nbdev.monitor import load_evidently, drift_report, drift_tests, run_monitoring, save_reference
    from vit_nbdev.store import open_store
    from vit_nbdev.telemetry import telemetry_key

    ev = load_evidently()
    from evidently import DataDefinition

    for m in ("evidently.presets", "evidently.metrics.embeddings"):
        importlib.import_module(m)  # so that the timings below exclude it
    t_import = time.perf_counter() - t
    print(
        f"import vit_nbdev.monitor + Evidently {ev.__version__}: {t_import:.1f} s "
        "(once per process; not in the timings below)",
        flush=True,
    )

    rows = []
    for d in a.dims:
        rng = np.random.default_rng(d)
        ref = records(a.reference, d, rng).drop(columns=["time", "request_id"])
        cur = records(a.current, d, rng)
        t_ours, rep = best(drift_report, a.repeat, ref, cur, window={"last_n": a.current})
        t_fast, _ = best(drift_tests, a.repeat, ref, cur)

        with tempfile.TemporaryDirectory() as tmp:  # end to end through a local store, as the service does it
            st = open_store(tmp)
            save_reference(st, "v1", ref)
            for i in range(0, a.current, 512):  # the service's shard size
                buf = io.BytesIO()
                pq.write_table(pa.Table.from_pandas(cur.iloc[i : i + 512], preserve_index=False), buf)
                st.put_bytes(telemetry_key("v1", "2026-11-26", "inst", i // 512), buf.getvalue())
            st.put_bytes("models/v1/_COMPLETE", b"{}")  # resolve('v1') needs a complete version
            t_e2e, res = best(run_monitoring, a.repeat, st, "v1", last_n=a.current)
            assert res.summary["n_current"] == a.current and len(res.keys) == 2

        R, C = raw(ref), raw(cur)
        dd = DataDefinition(numerical_columns=list(R.columns))
        t_preset, _ = best(preset_html, 1, R, C, dd)
        dde = DataDefinition(numerical_columns=list(R.columns), embeddings={"embedding": list(R.columns)})
        t_emb, _ = best(embeddings_metric_html, 1, R, C, dde)
        rows.append(
            {
                "embedding dims": d,
                "ours: drift_report + HTML (s)": round(t_ours, 2),
                "ours: drift_tests only (s)": round(t_fast, 3),
                "ours end to end: store -> report -> store (s)": round(t_e2e, 2),
                "Evidently DataDriftPreset on raw columns + HTML (s)": round(t_preset, 2),
                "Evidently EmbeddingsDrift metric + HTML (s)": round(t_emb, 2),
                "speed-up vs preset": f"{t_preset / t_ours:.0f}x",
                "HTML MB (ours)": round(len(rep.html) / 1e6, 1),
            }
        )
        print(rows[-1], flush=True)

    df = pd.DataFrame(rows)
    cols = list(df.columns)
    md = [
        f"{a.current:,} current vs {a.reference} reference records, best of {a.repeat} (Evidently's: 1 run); "
        f"{os.cpu_count()} CPU cores (shared); Evidently {ev.__version__}; import {t_import:.1f} s excluded.\n",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    print("\n".join(md))
    if a.out:
        Path(a.out).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
