"""Telemetry at a million predictions a day: each reader's time and peak memory, before and after issue 22, in one run.

For each size (records in the store), one after the other, in a local store under a temporary folder:

1. **Generate** a store as a busy fleet leaves it: `--days` days ending today (UTC; the last day is still open),
   `--instances` writers, 512 records a shard, one model version; each record has a 256-float embedding from a seeded
   RNG and a kept 32×32 PNG of random noise (drawn from a pool of distinct PNGs), so neither compresses; real
   prediction ids (`PredictionIds.new`). 1% of the predictions are labelled (at most `--labels`): feedback shards
   naming them. The shards are written with pyarrow under the layout from before the issue
   (`<kind>/<version>/<day>/<instance>-<seq>.parquet`), so that the old code reads them.
2. **Before**: the package as it was at `--ref` (`git archive` into a temporary folder, imported as
   `vit_nbdev_before`) reads the old layout.
3. **After**: `migrate_telemetry` moves the shards to the hive-partitioned layout; the working tree's readers run on
   it as the open day leaves it (shards), then again after `compact_telemetry` of the closed days (compacted).
4. **DuckDB** runs the same three reads straight on the new layout's parquet files (a glob over the shards; the
   live files after compaction), to compare the engines.

The readers:

- `last1000`: `read_telemetry(store, version, last_n=1000)`, the drift window;
- `labelled`: `labelled_predictions` then `snapshot_feedback(rows=...)`, what `vit-monitor retrain` reads;
- `day`: one day of the busiest closed day; before: `read_telemetry(since=day, until=day + 1)` (every record), after:
  the same with `sample=10_000`.

Each reader, `migrate_telemetry` and `compact_telemetry` run in a process of their own (this script with
`--measure`): the time of the call, and the process's peak RSS (`ru_maxrss`, imports included). A watchdog kills a
process whose RSS passes `--rss-limit-gb` and reports when. The page cache is warm (the store was just written), for
every reader alike.

    python bench/bench_telemetry.py                                  # 1e5, 1e6, 3e6 records: about an hour
    python bench/bench_telemetry.py --sizes 1e5,1e6 --root /data     # 3e6 records take about 13 GB of disk
    python bench/bench_telemetry.py --quick                          # 2e4 records: a smoke test, about a minute

Prints the host (CPU model and flags, load), one table per reader and the targets, met or not. Writes
bench/results/telemetry.md and telemetry.json (overwritten) unless `--quick` or `--no-out`; `--out DIR` elsewhere.
"""

import argparse, io, json, os, platform, shutil, signal, subprocess, sys, tempfile, time, warnings
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
REF = "35d4f90"  # the last commit before issue 22
BEFORE = "vit_nbdev_before"  # the name the package at REF is imported under
READERS = ("last1000", "labelled", "day")
VARIANTS = {  # column → (code, layout)
    "before": ("before", "old"),
    "after (shards)": ("after", "shards"),
    "after (compacted)": ("after", "compacted"),
    "DuckDB (shards)": ("duckdb", "shards"),
    "DuckDB (compacted)": ("duckdb", "compacted"),
}
TARGETS = {  # reader → (seconds, GB, where it applies)
    "last1000": (1.0, 0.5, "at every size"),
    "labelled": (30.0, 1.5, "10,000 labels among 3×10⁶ records"),
    "day": (30.0, 2.0, "a closed day of 10⁶ records, sampled"),
}
TITLES = {
    "last1000": "The drift window: `read_telemetry(version, last_n=1000)`",
    "labelled": "What `vit-monitor retrain` reads: `labelled_predictions` + `snapshot_feedback(rows=...)`",
    "day": "One closed day: unsampled before, `sample=10_000` after",
}
EMBEDDING_DIM, IMAGE_SIZE, TOP_K = 256, 32, 5
GB = 1e9


# -- the synthetic store ----------------------------------------------------------------------------


def png_pool(n: int, seed: int) -> pa.Array:
    "`n` distinct PNGs of random 32×32 RGB noise, as the service keeps them (`encode_kept_image`'s PNG settings)."
    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return pa.array(out, pa.binary())


def day_bounds(day: date, now: datetime) -> tuple[int, int]:
    "The microseconds since the epoch where records of `day` start and end: today's end at `now`."
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = min(start + timedelta(days=1), max(now, start + timedelta(minutes=1)))
    return int(start.timestamp() * 1e6), int(end.timestamp() * 1e6)


def list_array(values: np.ndarray, width: int, type_: pa.DataType) -> pa.Array:
    "Rows of `width` consecutive `values` as a list array of `type_`."
    offsets = pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, type_.value_type)).cast(type_)


def telemetry_table(
    t_us: np.ndarray,  # the records' times (µs since the epoch, sorted)
    instance: str,  # the writer
    version: str,  # the model version
    ids,  # a `PredictionIds`
    images: pa.Array,  # the PNG pool
    rng: np.random.Generator,
) -> tuple[pa.Table, np.ndarray]:
    "One shard's records of `TELEMETRY_SCHEMA`, and the index of each record's predicted class."
    from vit_nbdev.config import ENGINES
    from vit_nbdev.data import CIFAR10_LABELS
    from vit_nbdev.telemetry import TELEMETRY_SCHEMA

    m, labels = len(t_us), np.array(CIFAR10_LABELS)
    predicted = rng.integers(0, len(labels), m)
    score = rng.uniform(0.2, 1, m).astype(np.float32)
    top = (predicted[:, None] + np.arange(TOP_K)) % len(labels)  # the top class first, then others
    top_scores = (score[:, None] * np.geomspace(1, 0.05, TOP_K)).astype(np.float32)
    top_type = TELEMETRY_SCHEMA.field("top_k").type
    top_k = pa.ListArray.from_arrays(
        pa.array(np.arange(0, m * TOP_K + 1, TOP_K, dtype=np.int32)),
        pa.StructArray.from_arrays([pa.array(labels[top].ravel()), pa.array(top_scores.ravel())], ["label", "score"]),
    ).cast(top_type)
    embedding = rng.standard_normal(m * EMBEDDING_DIM, dtype=np.float32)
    times = [datetime.fromtimestamp(t / 1e6, UTC) for t in t_us.tolist()]
    pids = [ids.new(version, int(p), True, t) for p, t in zip(predicted, times, strict=True)]
    hexes = rng.bytes(16 * m).hex()  # uuid4().hex-like request ids
    cols = dict(
        time=pa.array(t_us, pa.timestamp("us", tz="UTC")),
        request_id=pa.array([hexes[i : i + 32] for i in range(0, 32 * m, 32)]),  # one request per image
        item=pa.array(np.zeros(m, np.int32)),
        instance=pa.array([instance] * m),
        model_version=pa.array([version] * m),
        label=pa.array(labels[predicted]),
        score=pa.array(score),
        top_k=top_k,
        embedding=list_array(embedding, EMBEDDING_DIM, TELEMETRY_SCHEMA.field("embedding").type),
        width=pa.array(np.full(m, IMAGE_SIZE, np.int32)),
        height=pa.array(np.full(m, IMAGE_SIZE, np.int32)),
        engine=pa.array([next(iter(ENGINES))] * m),
        prediction_id=pa.array(pids),
        image=images.take(pa.array(rng.integers(0, len(images), m))),
    )
    return pa.Table.from_arrays([cols[f.name] for f in TELEMETRY_SCHEMA], schema=TELEMETRY_SCHEMA), predicted


def old_key(kind: str, version: str, day: str, instance: str, seq: int) -> str:
    "A shard's key in the layout before issue 22 (the old `telemetry_key`)."
    return f"{kind}/{version}/{day}/{instance}-{seq:06d}.parquet"


def feedback_table(fb: dict, version: str, rng: np.random.Generator) -> pa.Table:
    "`FEEDBACK_SCHEMA` records for the labelled predictions in `fb` (ids, times, predicted classes, feedback times)."
    from vit_nbdev.data import CIFAR10_LABELS
    from vit_nbdev.telemetry import FEEDBACK_SCHEMA

    labels, n = np.array(CIFAR10_LABELS), len(fb["pid"])
    truth = np.where(rng.uniform(size=n) < 0.9, fb["predicted"], rng.integers(0, len(labels), n))
    ts = pa.timestamp("us", tz="UTC")
    cols = dict(
        time=pa.array(fb["time"], ts),
        prediction_id=pa.array(fb["pid"]),
        predicted_at=pa.array(fb["predicted_at"], ts),
        model_version=pa.array([version] * n),
        predicted=pa.array(labels[fb["predicted"]]),
        label=pa.array(labels[truth]),
        correct=pa.array(truth == fb["predicted"]),
        image_kept=pa.array(np.ones(n, bool)),
        instance=pa.array(fb["instance"]),
        source=pa.array(["api"] * n),
    )
    return pa.Table.from_arrays([cols[f.name] for f in FEEDBACK_SCHEMA], schema=FEEDBACK_SCHEMA)


def generate(
    root: Path,  # the store's folder (a `LocalStore`)
    n: int,  # records
    days: int,  # days ending today (UTC)
    instances: int,  # writers
    labels: int,  # the most labelled predictions
    images: pa.Array,  # the PNG pool
    seed: int = 0,
    shard: int = 512,  # records a shard
    label_share: float = 0.01,  # the share of predictions labelled
) -> dict:
    "Write a store of `n` telemetry records and their feedback in the old layout; what it holds."
    from vit_nbdev.store import new_version
    from vit_nbdev.telemetry import PredictionIds

    rng, now = np.random.default_rng(seed), datetime.now(UTC)
    first = now.date() - timedelta(days=days - 1)
    version = new_version(datetime(first.year, first.month, first.day, tzinfo=UTC))
    ids = PredictionIds(rng.bytes(32))
    writers = [f"{first:%Y%m%d}T000000-{rng.bytes(4).hex()}" for _ in range(instances)]  # `new_instance_id`'s shape
    per_day = [n // days + (d < n % days) for d in range(days)]
    n_labels = min(labels, round(n * label_share))
    labelled = np.zeros(n, bool)
    labelled[rng.choice(n, n_labels, replace=False)] = True
    fb = dict(pid=[], predicted_at=[], predicted=[])
    seq, files, start = [0] * instances, 0, 0
    for d, count in enumerate(per_day):
        day = first + timedelta(days=d)
        t_us = np.sort(rng.integers(*day_bounds(day, now), count))
        writer = rng.integers(0, instances, count)
        marks = labelled[start : start + count]
        for w in range(instances):
            mine = np.flatnonzero(writer == w)
            for c in range(0, len(mine), shard):
                rows = mine[c : c + shard]
                seq[w] += 1
                table, predicted = telemetry_table(t_us[rows], writers[w], version, ids, images, rng)
                path = root / old_key("telemetry", version, f"{day:%Y-%m-%d}", writers[w], seq[w])
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path, compression="zstd")
                files += 1
                hit = np.flatnonzero(marks[rows])
                fb["pid"] += table.column("prediction_id").take(pa.array(hit)).to_pylist()
                fb["predicted_at"] += t_us[rows][hit].tolist()
                fb["predicted"] += predicted[hit].tolist()
        start += count
    # labels arrive minutes to hours after the prediction, never after now, at any writer
    now_us = int(now.timestamp() * 1e6)
    fb = {k: np.array(v) for k, v in fb.items()}
    fb["time"] = np.minimum(fb["predicted_at"] + rng.exponential(3600e6, n_labels).astype(np.int64), now_us)
    fb["instance"] = np.array(writers)[rng.integers(0, instances, n_labels)]
    order = np.argsort(fb["time"], kind="stable")
    fb = {k: v[order] for k, v in fb.items()}
    fb_day = np.array([f"{datetime.fromtimestamp(t / 1e6, UTC):%Y-%m-%d}" for t in fb["time"].tolist()])
    fb_files, fseq = 0, [0] * instances
    for day in sorted(set(fb_day.tolist())):
        for w in range(instances):
            mine = np.flatnonzero((fb_day == day) & (fb["instance"] == writers[w]))
            for c in range(0, len(mine), shard):
                rows = mine[c : c + shard]
                fseq[w] += 1
                path = root / old_key("feedback", version, day, writers[w], fseq[w])
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(feedback_table({k: v[rows] for k, v in fb.items()}, version, rng), path)
                fb_files += 1
    days_ = {f"{first + timedelta(days=d):%Y-%m-%d}": c for d, c in enumerate(per_day)}
    closed = {d: c for d, c in days_.items() if d < f"{now:%Y-%m-%d}"}
    busiest = max(closed, key=lambda d: (closed[d], d)) if closed else max(days_)
    return dict(
        records=n,
        version=version,
        days=days_,
        busiest_closed_day=busiest,
        labels=n_labels,
        telemetry_files=files,
        feedback_files=fb_files,
        bytes=sum(p.stat().st_size for p in root.rglob("*.parquet")),
    )


# -- the measured calls (in a process of their own) ------------------------------------------------


def _modules(code: str, p: dict):
    "The `telemetry` and a lazy `retrain` module of `code` (`before`: the package at REF; else the working tree's)."
    import importlib

    pkg = BEFORE if code == "before" else "vit_nbdev"
    sys.path.insert(0, p["before_path"] if code == "before" else p["after_path"])
    return importlib.import_module(f"{pkg}.telemetry"), lambda: importlib.import_module(f"{pkg}.retrain")


def _duck_source(files) -> str:
    "DuckDB's `read_parquet` of `files` (a glob or a list of paths) with the hive partitions as strings."
    lit = "'" + files + "'" if isinstance(files, str) else "[" + ", ".join(f"'{f}'" for f in files) + "]"
    return f"read_parquet({lit}, hive_partitioning = true, hive_types = {{'version': VARCHAR, 'day': VARCHAR}})"


def _duck_files(store: str, layout: str, kind: str, version: str) -> str | list[str]:
    "The new layout's files of `kind`: a glob over the shards, or the live files after compaction."
    if layout == "shards":
        return f"{store}/{kind}/*/*/*.parquet"
    from vit_nbdev.telemetry import telemetry_dataset

    ds, _ = telemetry_dataset(store, kind=kind, version=version)
    return [f if os.path.isabs(f) else os.path.join(store, f) for f in ds.files]


def _columns() -> str:
    "What a drift window reads (`WINDOW_COLUMNS`), as SQL."
    from vit_nbdev.config import WINDOW_COLUMNS

    return ", ".join(f'"{c}"' for c in WINDOW_COLUMNS)


def duck_last1000(store, layout, version, **_):
    "The last 1,000 records of `version`, through DuckDB."
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    src = _duck_source(_duck_files(store, layout, "telemetry", version))
    q = f"SELECT {_columns()} FROM {src} WHERE version = ? ORDER BY time DESC LIMIT 1000"
    df = con.sql(q, params=[version]).to_arrow_table().to_pandas()
    return df.sort_values("time", kind="stable", ignore_index=True), {}


def duck_labelled(store, layout, version, **_):
    "`labelled_predictions`'s rows through DuckDB: the last label of each id, semi-joined with the telemetry it names."
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    fb = _duck_source(_duck_files(store, layout, "feedback", version))
    tel = _duck_source(_duck_files(store, layout, "telemetry", version))
    q = f"""
    WITH fb AS (
        SELECT prediction_id, time, predicted_at, model_version, predicted, label, correct FROM {fb}
        QUALIFY row_number() OVER (PARTITION BY prediction_id ORDER BY time DESC) = 1
    ), t AS (
        SELECT prediction_id, image FROM {tel}
        WHERE version IN (SELECT model_version FROM fb)
          AND day >= (SELECT strftime(min(predicted_at), '%Y-%m-%d') FROM fb)
          AND time >= (SELECT min(predicted_at) FROM fb)
          AND prediction_id IN (SELECT prediction_id FROM fb)
    )
    SELECT fb.*, t.image FROM fb LEFT JOIN t USING (prediction_id) ORDER BY fb.time
    """
    return con.sql(q).to_arrow_table().to_pandas(), {}


def duck_day(store, layout, version, day, sample, seed, **_):
    "A uniform sample of `sample` records of one day, through DuckDB."
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    src = _duck_source(_duck_files(store, layout, "telemetry", version))
    since = datetime.fromisoformat(day).replace(tzinfo=UTC)
    where = "version = ? AND day = ? AND time >= ? AND time < ?"
    args = [version, day, since, since + timedelta(days=1)]
    rows = con.sql(f"SELECT count(*) FROM {src} WHERE {where}", params=args).fetchall()[0][0]
    q = f"SELECT * FROM (SELECT {_columns()} FROM {src} WHERE {where}) USING SAMPLE reservoir({sample} ROWS)"
    df = con.sql(f"{q} REPEATABLE ({seed})", params=args).to_arrow_table().to_pandas()
    return df.sort_values("time", kind="stable", ignore_index=True), dict(rows=rows)


def measure(what: str, code: str, p: dict) -> dict:
    "Run one measured call of the child process; its time and what it returned, in numbers."
    t0 = time.perf_counter()
    if what == "host":
        return dict(result=_host())
    if what == "generate":
        sys.path.insert(0, p["after_path"])
        images = png_pool(p["pool"], p["seed"])
        pool_s = time.perf_counter() - t0
        args = (Path(p["store"]), p["n"], p["days"], p["instances"], p["labels"], images)
        return dict(result=generate(*args, seed=p["seed"]), s=time.perf_counter() - t0, pool_s=pool_s)
    store, version = p["store"], p["version"]
    tel, retrain = _modules(code, p)
    from vit_nbdev.config import WINDOW_COLUMNS

    if what == "labelled":
        retrain = retrain()  # imports torch
    imported = time.perf_counter() - t0
    out, t = {}, time.perf_counter()
    if what in ("migrate", "compact"):
        res = tel.migrate_telemetry(store) if what == "migrate" else tel.compact_telemetry(store)
        out["result"] = res if what == "migrate" else _compaction_summary(res)
    elif code == "duckdb":
        df, info = {"last1000": duck_last1000, "labelled": duck_labelled, "day": duck_day}[what](**p)
        out.update(info)
    elif what == "last1000" and code == "before":
        df = tel.read_telemetry(store, version, last_n=1000)  # the old reader had no choice of columns
    elif what == "last1000":
        df = tel.read_telemetry(store, version, last_n=1000, columns=list(WINDOW_COLUMNS))
    elif what == "day":
        since = datetime.fromisoformat(p["day"]).replace(tzinfo=UTC)
        window = dict(since=since, until=since + timedelta(days=1))
        if code == "before":
            df = tel.read_telemetry(store, version, **window)
        else:
            df = tel.read_telemetry(
                store, version, **window, sample=p["sample"], seed=p["seed"], columns=list(WINDOW_COLUMNS)
            )
    if what == "labelled":
        if code != "duckdb":
            df = retrain.labelled_predictions(store)
        out["read_s"] = time.perf_counter() - t
        t1 = time.perf_counter()
        snap = retrain.snapshot_feedback(store, rows=df)
        out["snapshot_s"] = time.perf_counter() - t1
        out.update(usable=snap["usable"], labelled=snap["labelled"], fingerprint=snap["fingerprint"])
        out["with_image"] = int(df["image"].notna().sum())
    out["s"] = time.perf_counter() - t
    if what not in ("migrate", "compact"):
        out["returned"] = len(df)
        info = dict(df.attrs.get("telemetry") or {})
        info["skipped"] = len(info.get("skipped") or [])
        out.update({k: v for k, v in info.items() if k not in out})
    out["import_s"] = imported
    return out


def _host() -> dict:
    "The CPU (`host_info`, as the other benchmarks print it) and the versions that matter here."
    import duckdb, pandas as pd
    from vit_nbdev.engine import host_info

    host = dict(host_info(), python=platform.python_version(), pyarrow=pa.__version__, pandas=pd.__version__)
    return dict(host, duckdb=duckdb.__version__)


def _compaction_summary(parts: list[dict]) -> dict:
    "How many partitions `compact_telemetry` left in each status, with their shards, files and rows."
    out: dict = {}
    for r in parts:
        s = out.setdefault(r.get("status", "?"), dict(partitions=0, shards=0, files=0, rows=0))
        s["partitions"] += 1
        for k in ("shards", "files", "rows"):
            s[k] += int(r.get(k) or 0)
    return out


# -- the parent: processes, watchdog, tables ---------------------------------------------------------


def _rss(pid: int, field: str = "VmRSS:") -> int:
    "The resident memory of process `pid` in bytes (0 once it is gone); `VmHWM:` for its peak."
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(what: str, code: str, params: dict, rss_limit: float, timeout: float, work: Path) -> dict:
    "Run `--measure what` in a process of its own: its result, peak RSS; killed past `rss_limit` bytes or `timeout` s."
    script = work / Path(__file__).name  # the copy `main` made: edits during a long run don't mix in
    cmd = [
        sys.executable,
        str(script if script.exists() else Path(__file__).resolve()),
        "--measure",
        what,
        "--code",
        code,
        "--params",
        json.dumps(params),
    ]
    out_path, err_path = work / "child.out", work / "child.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=work)
        killed = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - t0
            if _rss(p.pid) > rss_limit or elapsed > timeout:
                killed = dict(after_s=elapsed, why="rss" if elapsed <= timeout else "timeout")
                os.kill(p.pid, signal.SIGKILL)
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
    res = dict(peak_gb=ru.ru_maxrss * 1024 / GB, wall_s=time.perf_counter() - t0, rc=p.returncode)
    if killed:
        return dict(res, killed=killed)
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return dict(res, error=err_path.read_text()[-3000:])
    return dict(res, **json.loads(lines[-1][len("RESULT ") :]))


def cell(r: dict | None, limit_gb: float) -> str:
    "A table cell: `time s, peak GB`, or how the run ended."
    if not r:
        return "–"
    if "killed" in r:
        k = r["killed"]
        return f"killed at {limit_gb:g} GB after {k['after_s']:.0f} s" if k["why"] == "rss" else "timed out"
    if "error" in r:
        return f"failed (rc {r['rc']})"
    return f"{_secs(r['s'])} s, {r['peak_gb']:.2f} GB"


def _secs(s: float) -> str:
    return f"{s:.3f}" if s < 0.1 else f"{s:.2f}" if s < 10 else f"{s:.1f}" if s < 100 else f"{s:.0f}"


def ratio(before: dict | None, after: dict | None, limit_gb: float) -> str:
    "How many times faster and leaner `after` is than `before` (at least, if `before` was killed)."
    if not before or not after or "s" not in after or "error" in before:
        return "–"
    if "killed" in before:
        if before["killed"]["why"] != "rss":
            return "–"
        t, gb, at_least = before["killed"]["after_s"], limit_gb, "≥ "
    else:
        t, gb, at_least = before["s"], before["peak_gb"], ""
    return f"{at_least}{t / max(after['s'], 1e-3):.1f}× time, {at_least}{gb / after['peak_gb']:.1f}× memory"


def target_rows(results: list[dict]) -> list[str]:
    "The targets, each with the measured after-values where it applies, met or not."
    rows = []
    for reader, (s_max, gb_max, where) in TARGETS.items():
        if reader == "last1000":
            at = results
        elif reader == "labelled":
            at = [r for r in results if r["store"]["labels"] >= 10_000 and r["store"]["records"] >= 3_000_000]
        else:
            at = [r for r in results if r["store"]["days"][r["store"]["busiest_closed_day"]] >= 1_000_000]
        note = ""
        if not at:
            at, note = results[-1:], f" (not reached here: measured at {results[-1]['store']['records']:,} records)"
        for v in ("after (shards)", "after (compacted)"):
            got = [r["readers"][reader].get(v) for r in at]
            ok = all(g and "s" in g and g["s"] <= s_max and g["peak_gb"] <= gb_max for g in got)
            shown = "; ".join(f"{r['store']['records']:,}: {cell(g, 0)}" for r, g in zip(at, got, strict=True))
            rows.append(
                f"| `{reader}` {v} | ≤ {s_max:g} s, ≤ {gb_max:g} GB: {where}{note} | {shown} | "
                f"{'met' if ok else '**not met**'} |"
            )
    return rows


def _load(avg) -> str:
    return " / ".join(f"{v:.1f}" for v in avg)


def report(results: list[dict], host: dict, a) -> str:
    "The markdown: host, store, one table per reader, migration and compaction, the targets."
    limit = a.rss_limit_gb
    md = [
        "# Telemetry reads at scale: before and after issue 22\n",
        f"CPU: {host['cpu']} (flags {', '.join(host['flags']) or 'none'}); {host['cpus']} CPUs, shared; "
        f"load average {_load(host['load_before'])} before, {_load(host['load_after'])} after. "
        f"Python {host['python']}, "
        f"pyarrow {host['pyarrow']}, pandas {host['pandas']}, DuckDB {host['duckdb']}. "
        f"Before: the package at `{a.ref}`; after: at `{host['after']}`.\n",
        "Each cell: the call's time and the peak RSS of its process (imports included). "
        f"Processes past {limit:g} GB are killed. `before ÷ …`: before's time and memory over after's (≥: before "
        "was killed; its time and the limit are used).\n",
        "## The stores\n",
        "| records | days | writers | records a day | labels | telemetry shards | feedback shards | GB on disk "
        "| generated in |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["store"]
        md.append(
            f"| {s['records']:,} | {len(s['days'])} | {a.instances} | "
            f"{', '.join(f'{c:,}' for c in s['days'].values())} | {s['labels']:,} | {s['telemetry_files']:,} | "
            f"{s['feedback_files']:,} | {s['bytes'] / GB:.2f} | {s['generate_s']:.0f} s |"
        )
    for reader in READERS:
        cols = list(VARIANTS) + ["before ÷ shards", "before ÷ compacted"]
        md += ["", f"## {TITLES[reader]}\n", "| records | " + " | ".join(cols) + " |", "|---:|" + "---|" * len(cols)]
        for r in results:
            got = r["readers"][reader]
            cells = [cell(got.get(v), limit) for v in VARIANTS]
            cells += [ratio(got.get("before"), got.get(v), limit) for v in ("after (shards)", "after (compacted)")]
            md.append(f"| {r['store']['records']:,} | " + " | ".join(cells) + " |")
        if reader == "labelled":
            md += ["", "Phases (read + snapshot, s) and labelled predictions found with their image:\n"]
            for r in results:
                parts = []
                for v, g in r["readers"]["labelled"].items():
                    if g and "read_s" in g:
                        parts.append(
                            f"{v}: {_secs(g['read_s'])} + {_secs(g['snapshot_s'])}, {g['with_image']:,} of "
                            f"{g['labelled']:,}"
                        )
                md.append(f"- {r['store']['records']:,}: " + "; ".join(parts))
            same = {
                r["store"]["records"]: {g.get("fingerprint") for g in r["readers"]["labelled"].values()}
                for r in results
            }
            md.append(
                "- the same snapshot (fingerprint) from every variant: "
                + ", ".join(f"{n:,}: {'yes' if len(fp - {None}) == 1 else 'no'}" for n, fp in same.items())
            )
        if reader == "day":
            md += ["", "Records in the window / returned:\n"]
            for r in results:
                g = r["readers"]["day"]
                md.append(
                    f"- {r['store']['records']:,} (day {r['store']['busiest_closed_day']}, "
                    f"{r['store']['days'][r['store']['busiest_closed_day']]:,} records): "
                    + "; ".join(
                        f"{v}: {x.get('rows', x['returned']):,} / {x['returned']:,}"
                        for v, x in g.items()
                        if x and "returned" in x
                    )
                )
    md += [
        "",
        "## Migration and compaction\n",
        "| records | `migrate_telemetry` | moved | `compact_telemetry` (closed days) | partitions compacted "
        "| shards → files |",
        "|---:|---|---:|---|---:|---|",
    ]
    for r in results:
        m, c = r.get("migrate") or {}, r.get("compact") or {}
        moved = (m.get("result") or {}).get("moved", "–")
        comp = ((c.get("result") or {}).get("compacted")) or {}
        md.append(
            f"| {r['store']['records']:,} | {cell(m, limit)} | {moved:,} | {cell(c, limit)} | "
            f"{comp.get('partitions', '–')} | {comp.get('shards', 0):,} → {comp.get('files', 0):,} |"
        )
    md += ["", "## Targets\n", "| reader | target | after | |", "|---|---|---|---|"] + target_rows(results)
    return "\n".join(md) + "\n"


def extract_before(ref: str, dest: Path) -> Path:
    "The package at `ref`, as `dest/vit_nbdev_before` (its relative imports resolve inside it); `dest`."
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref, "vit_nbdev"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest), "--exclude", "vit_nbdev/checkpoints"], input=archive, check=True)
    (dest / "vit_nbdev").rename(dest / BEFORE)
    return dest


def copy_after(dest: Path) -> tuple[Path, str]:
    "The working tree's package, copied to `dest/vit_nbdev` (edits during a long run don't mix in); what it is."
    shutil.copytree(ROOT / "vit_nbdev", dest / "vit_nbdev", ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "vit_nbdev"], capture_output=True, text=True).stdout
    return dest, head + (" with uncommitted changes" if dirty.strip() else "")


def bench_size(n: int, a, work: Path, before_path: Path, after_path: Path) -> dict:
    "Generate a store of `n` records, measure every reader on it, delete it."
    store = work / f"store-{n}"
    print(f"\n{n:,} records: generating", flush=True)
    gen = dict(
        after_path=str(after_path),
        store=str(store),
        n=n,
        days=a.days,
        instances=a.instances,
        labels=a.labels,
        pool=a.pool,
        seed=a.seed,
    )
    g = run_child("generate", "after", gen, a.rss_limit_gb * GB, a.timeout_s, work)
    if "error" in g or "killed" in g:
        raise RuntimeError(f"generating {n:,} records failed: {g}")
    info = dict(g["result"], generate_s=g["s"], generate_peak_gb=g["peak_gb"])
    print(
        f"  {info['telemetry_files']:,} shards, {info['bytes'] / GB:.2f} GB in {info['generate_s']:.0f} s "
        f"({g['pool_s']:.0f} s of it for {a.pool:,} PNGs)",
        flush=True,
    )
    params = dict(
        store=str(store),
        version=info["version"],
        day=info["busiest_closed_day"],
        sample=a.sample,
        seed=a.seed,
        before_path=str(before_path),
        after_path=str(after_path),
    )
    limit, res = a.rss_limit_gb * GB, dict(store=info, readers={r: {} for r in READERS})

    def run(what, code, layout=None):
        if what == "labelled":
            shutil.rmtree(store / "datasets", ignore_errors=True)  # the snapshot is written every time
        r = run_child(what, code, dict(params, layout=layout), limit, a.timeout_s, work)
        label = f"{what} {code}" + (f" ({layout})" if layout else "")
        print(f"  {label}: {cell(r, a.rss_limit_gb)}", flush=True)
        if "error" in r:
            print("    " + r["error"].strip().replace("\n", "\n    ")[-1500:], flush=True)
        return r

    def readers(variants):
        for v in variants:
            code, layout = VARIANTS[v]
            for what in READERS:
                res["readers"][what][v] = run(what, code, layout)

    readers(["before"])
    res["migrate"] = run("migrate", "after")
    readers(["after (shards)", "DuckDB (shards)"])
    res["compact"] = run("compact", "after")
    readers(["after (compacted)", "DuckDB (compacted)"])
    if not a.keep:
        shutil.rmtree(store, ignore_errors=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6,3e6", help="records in the store, comma-separated")
    ap.add_argument("--days", type=int, default=3, help="days of records, ending today (UTC)")
    ap.add_argument("--instances", type=int, default=10, help="writers")
    ap.add_argument("--labels", type=int, default=10_000, help="the most labelled predictions (1%% of the records)")
    ap.add_argument("--sample", type=int, default=10_000, help="the day window's sample after the issue")
    ap.add_argument("--pool", type=int, default=20_000, help="distinct PNGs the images are drawn from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", help="make the stores in a temporary folder here (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (else each is deleted after its size)")
    ap.add_argument("--rss-limit-gb", type=float, default=12, help="kill a measured process beyond this RSS")
    ap.add_argument("--timeout-s", type=float, default=3600, help="kill a measured process after this long")
    ap.add_argument("--ref", default=REF, help="the git ref of the code before")
    ap.add_argument("--quick", action="store_true", help="2e4 records, 2,000 PNGs, a 1,000 sample, no files written")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="write telemetry.md and .json here")
    ap.add_argument("--no-out", action="store_true", help="write no files")
    ap.add_argument("--report", metavar="JSON", help="only print the markdown of a run's telemetry.json")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.report:
        raw = json.loads(Path(a.report).read_text())
        print(report(raw["results"], raw["host"], argparse.Namespace(**raw["args"])), end="")
        return
    if a.measure:
        warnings.simplefilter("ignore", FutureWarning)
        out = measure(a.measure, a.code, json.loads(a.params))
        out["hwm_gb"] = _rss(os.getpid(), "VmHWM:") / GB  # a check on `ru_maxrss`: the same high-water mark
        print("RESULT " + json.dumps(out, default=str), flush=True)
        return
    if a.quick:
        a.sizes, a.pool, a.sample, a.no_out = "2e4", min(a.pool, 2_000), min(a.sample, 1_000), True
    sizes = [int(float(s)) for s in a.sizes.split(",") if s]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: still remove the stores (finally)
    work = Path(tempfile.mkdtemp(prefix="bench-telemetry-", dir=a.root))
    results = []
    try:
        # everything heavy (torch for the host's flags, the PNGs, the stores) happens in children: this process's
        # peak RSS would count in theirs (`ru_maxrss` keeps the high-water mark of the process image exec replaced)
        host = run_child("host", "after", {}, a.rss_limit_gb * GB, a.timeout_s, work)
        if "result" not in host:
            raise RuntimeError(f"reading the host failed: {host}")
        host = dict(host["result"], load_before=tuple(round(v, 2) for v in os.getloadavg()))
        print(
            f"CPU: {host['cpu']}; flags {', '.join(host['flags']) or 'none'}; {host['cpus']} CPUs; "
            f"load average {host['load_before']}; pyarrow {host['pyarrow']}, DuckDB {host['duckdb']}",
            flush=True,
        )
        shutil.copy(__file__, work / Path(__file__).name)
        before = extract_before(a.ref, work / "before")
        after, host["after"] = copy_after(work / "after")
        for n in sizes:
            results.append(bench_size(n, a, work, before, after))
            host["load_after"] = tuple(round(v, 2) for v in os.getloadavg())
            host["parent_peak_gb"] = _rss(os.getpid(), "VmHWM:") / GB  # below every child's: not in their peaks
            md = report(results, host, a)
            if not a.no_out:  # after each size: a long run's first sizes are kept if a later one fails
                out = Path(a.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "telemetry.md").write_text(md)
                drop = ("measure", "code", "params", "root", "out", "report")
                args = {k: v for k, v in vars(a).items() if k not in drop}
                raw = dict(host=host, args=args, results=results)
                (out / "telemetry.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
        print("\n" + md)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
