"""Telemetry at scale, end to end: the partitioned layout, bounded reads, compaction under readers and kills, migration.

Shards are written as the service writes them (`TelemetryWriter`-format parquet under `telemetry_key`), in a folder
and on the GCS emulator; compactions run in their own processes (`python -m` on the installed package) so that they
can be killed, while readers in this process read the same partition.
"""

import json, signal, subprocess, sys, threading, time, warnings
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from devtools import wait_for
from vit_nbdev.retrain import labelled_predictions
from vit_nbdev import telemetry
from vit_nbdev.store import open_store
from vit_nbdev.telemetry import (
    COMPACTION,
    TELEMETRY_SCHEMA,
    PredictionIds,
    compact_telemetry,
    live_files,
    migrate_telemetry,
    read_telemetry,
    records_to_parquet,
    telemetry_key,
    telemetry_dataset,
)

DAY = "2026-11-24"  # a closed day
NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)  # what "today" is for the compactions here
IDS = PredictionIds(b"0123456789abcdef-scale-tests", ttl_s=1e10)  # records of past days: never expired


def records(n: int, start: datetime, instance: str, seed: int = 0, step_s: float = 1.0) -> list[dict]:
    "`n` telemetry records from `start`, `step_s` apart, with real prediction ids, embeddings and image bytes."
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = start + timedelta(seconds=i * step_s)
        out.append(
            dict(
                time=t,
                request_id=f"{instance}-{seed}-{i}",
                item=0,
                instance=instance,
                model_version="v1",
                label="cat",
                score=float(rng.random()),
                embedding=rng.normal(size=8).astype(np.float32).tolist(),
                prediction_id=IDS.new("v1", 3, kept=True, t=t),
                image=rng.bytes(64),
            )
        )
    return out


def write_day(st, day: str = DAY, shards: int = 24, per_shard: int = 200, instances: int = 3) -> list[str]:
    "Shards of one day from several instances, interleaved in time as a fleet writes them; the request ids."
    ids = []
    t0 = datetime.fromisoformat(day).replace(tzinfo=UTC)
    for s in range(shards):
        inst = f"inst{s % instances}"
        recs = records(per_shard, t0 + timedelta(seconds=s * per_shard * 3 + s % instances), inst, seed=s, step_s=3)
        st.put_bytes(telemetry_key("v1", day, inst, s), records_to_parquet(recs), overwrite=False)
        ids += [r["request_id"] for r in recs]
    return ids


def compaction(store_uri: str, day: str = DAY, rows_per_group: int = 500) -> subprocess.Popen:
    "A compaction of `day` in its own process (so that it can be killed); it prints its results as JSON."
    code = (
        "import json, sys; from datetime import datetime, UTC; from vit_nbdev.telemetry import compact_telemetry; "
        f"r = compact_telemetry(sys.argv[1], day={day!r}, kind='telemetry', "
        "now=datetime(2026, 11, 26, 12, tzinfo=UTC), "
        f"rows_per_group={rows_per_group}, rows_per_file=2000); print(json.dumps(r))"
    )
    return subprocess.Popen([sys.executable, "-c", code, store_uri], stdout=subprocess.PIPE, text=True)


def request_ids(st, **kw) -> list[str]:
    return read_telemetry(st, "v1", columns=["request_id"], **kw).request_id.tolist()


class Reader(threading.Thread):
    "Reads the whole day again and again until stopped; keeps what each read returned."

    def __init__(self, st):
        super().__init__(daemon=True)
        self.st, self.stop, self.reads, self.errors = st, threading.Event(), [], []

    def run(self):
        while not self.stop.is_set():
            try:
                self.reads.append(request_ids(self.st, since=DAY, until="2026-11-25"))
            except Exception as e:  # noqa: BLE001 (any failure of a read is the finding)
                self.errors.append(repr(e))


def test_layout_and_bounded_reads(tmp_path):
    st = open_store(tmp_path / "store")
    ids = write_day(st)
    assert all(k.startswith(f"telemetry/version=v1/day={DAY}/") for k in st.list("telemetry/"))
    got = read_telemetry(st, "v1", last_n=250, columns=["request_id", "embedding"])
    everything = read_telemetry(st, "v1")
    assert got.request_id.tolist() == everything.request_id.tail(250).tolist()
    assert list(got.columns) == ["request_id", "embedding"] and got.attrs["telemetry"]["rows"] == 250
    # a time window, and a window with the last n inside it
    since, until = everything.time.iloc[1000], everything.time.iloc[2000]
    window = request_ids(st, since=since, until=until)
    assert window == everything.request_id.iloc[1000:2000].tolist()
    assert request_ids(st, since=since, until=until, last_n=10) == window[-10:]
    assert sorted(ids) == sorted(everything.request_id)


def test_sampling_is_uniform_and_fixed_by_the_seed(tmp_path):
    st = open_store(tmp_path / "store")
    write_day(st)
    a = read_telemetry(st, "v1", since=DAY, sample=1000, columns=["request_id", "time"])
    b = read_telemetry(st, "v1", since=DAY, sample=1000, columns=["request_id", "time"])
    c = read_telemetry(st, "v1", since=DAY, sample=1000, seed=1, columns=["request_id", "time"])
    info = a.attrs["telemetry"]
    assert info["sampled"] and info["rows"] == 4800 and 850 <= info["sample"] <= 1150 and len(a) == info["sample"]
    assert a.request_id.tolist() == b.request_id.tolist() and a.request_id.tolist() != c.request_id.tolist()
    # uniform over the day: each quarter of the window holds about a quarter of the sample
    quarters = pd.cut(a.time, 4).value_counts().to_numpy()
    assert quarters.min() > 0.18 * len(a), quarters
    small = read_telemetry(st, "v1", sample=10_000, columns=["request_id"])
    assert len(small) == 4800 and not small.attrs["telemetry"]["sampled"]


def test_a_corrupt_shard_is_skipped_and_counted(tmp_path):
    st = open_store(tmp_path / "store")
    write_day(st, shards=6)
    good = records_to_parquet(records(10, datetime(2026, 11, 24, 23, tzinfo=UTC), "x"))
    bad_keys = [telemetry_key("v1", DAY, "cut", 1), telemetry_key("v1", DAY, "junk", 1)]
    st.put_bytes(bad_keys[0], good[: len(good) // 2])  # truncated upload
    st.put_bytes(bad_keys[1], b"not parquet at all")
    for kw, n in ((dict(), (1200, 1200)), (dict(last_n=100), (100, 100)), (dict(since=DAY, sample=100), (50, 150))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = read_telemetry(st, "v1", **kw)
        named = " ".join(str(w.message) for w in caught)
        assert sorted(df.attrs["telemetry"]["skipped"]) == sorted(bad_keys), kw
        assert all(k in named for k in bad_keys), named
        assert n[0] <= len(df) <= n[1], (kw, len(df))
    results = compact_telemetry(st, day=DAY, now=NOW)
    assert results[0]["status"] == "compacted" and sorted(results[0]["skipped"]) == sorted(bad_keys)
    assert all(st.exists(k) for k in bad_keys)  # left where they are, for a person to look at
    assert compact_telemetry(st, day=DAY, now=NOW)[0]["status"] == "already"  # and not rewritten every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(read_telemetry(st, "v1")) == 1200


def test_older_schemas_still_read(tmp_path):
    st = open_store(tmp_path / "store")
    recs = records(5, datetime(2026, 11, 24, 1, tzinfo=UTC), "old")
    before_ids = pa.schema([f for f in TELEMETRY_SCHEMA if f.name not in ("prediction_id", "image", "engine")])
    st.put_bytes(telemetry_key("v1", DAY, "old", 1), _parquet(recs, before_ids))
    doubles = pa.schema([pa.field(f.name, pa.float64()) if f.name == "score" else f for f in TELEMETRY_SCHEMA])
    st.put_bytes(telemetry_key("v1", DAY, "old", 2), _parquet(recs, doubles))  # a type that changed since
    df = read_telemetry(st, "v1")
    assert len(df) == 10 and df.prediction_id.isna().sum() == 5 and df.attrs["telemetry"]["skipped"] == []
    assert df.score.dtype == np.float32
    assert compact_telemetry(st, now=NOW)[0]["rows"] == 10
    assert len(read_telemetry(st, "v1")) == 10


def _parquet(recs, schema) -> bytes:
    import io

    buf = io.BytesIO()
    rows = [{k: v for k, v in r.items() if k in schema.names} for r in recs]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def test_compaction_keeps_readers_whole(tmp_path):
    "Readers read the day again and again while a compaction runs: every read sees every record exactly once."
    st = open_store(tmp_path / "store")
    ids = sorted(write_day(st, shards=30))
    reader = Reader(st)
    reader.start()
    wait_for(lambda: len(reader.reads) >= 2, what="the first reads")
    proc = compaction(str(st.root))
    out, _ = proc.communicate(timeout=300)
    n = len(reader.reads)
    wait_for(lambda: len(reader.reads) >= n + 2, what="reads after the compaction")
    reader.stop.set()
    reader.join(60)
    assert proc.returncode == 0 and json.loads(out)[0]["status"] == "compacted"
    assert reader.errors == []
    assert all(sorted(r) == ids for r in reader.reads), [len(r) for r in reader.reads]
    names = [k.rpartition("/")[2] for k in st.list(f"telemetry/version=v1/day={DAY}/")]
    assert names[0] == COMPACTION and all(n.startswith("part-") for n in names[1:]) and len(names) == 4
    meta = pq.read_metadata(st.root / st.list(f"telemetry/version=v1/day={DAY}/part-")[0])
    assert meta.num_row_groups == 4 and meta.row_group(0).num_rows == 500  # 2,000-record files of 500-record groups
    times = read_telemetry(st, "v1").time
    assert times.is_monotonic_increasing


@pytest.fixture(scope="module")
def usual_compaction_s(tmp_path_factory) -> float:
    "How long a whole compaction of the day the killed ones get takes here, process start included (timed once)."
    st = open_store(tmp_path_factory.mktemp("timed") / "store")
    write_day(st, shards=30)
    t0 = time.monotonic()
    proc = compaction(str(st.root))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and json.loads(out)[0]["status"] == "compacted"
    return time.monotonic() - t0


@pytest.mark.parametrize("at", [0.15, 0.35, 0.55, 0.75, "commit"])
def test_a_killed_compaction_loses_nothing(tmp_path, monkeypatch, usual_compaction_s, at):
    "Kill a compaction (at a share of its usual time, or as soon as it commits): the data stays complete."
    st = open_store(tmp_path / "store")
    ids = sorted(write_day(st, shards=30))
    marker = st.root / "telemetry" / "version=v1" / f"day={DAY}" / COMPACTION
    proc = compaction(str(st.root))
    if at == "commit":
        wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=300, every=0.002, what="the marker")
    else:
        time.sleep(at * usual_compaction_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert sorted(request_ids(st)) == ids  # readable and complete, whatever was left
    results = compact_telemetry(st, day=DAY, now=NOW, rows_per_group=500)
    assert results[0]["status"] in ("compacted", "already")
    assert sorted(request_ids(st)) == ids
    left = [k.rpartition("/")[2] for k in st.list(f"telemetry/version=v1/day={DAY}/")]
    assert COMPACTION in left and not any(n.startswith("inst") for n in left), left  # the shards are gone
    monkeypatch.setattr(telemetry, "ORPHAN_GRACE_S", 0.0)  # the killed run's files are old enough to be orphans
    assert compact_telemetry(st, day=DAY, now=NOW)[0]["status"] == "already"
    doc = json.loads(st.get_bytes(f"telemetry/version=v1/day={DAY}/{COMPACTION}"))
    assert st.list(f"telemetry/version=v1/day={DAY}/part-") == sorted(doc["files"])
    assert sorted(request_ids(st)) == ids


def test_two_compactions_at_once(tmp_path):
    st = open_store(tmp_path / "store")
    ids = sorted(write_day(st, shards=30))
    procs = [compaction(str(st.root)) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0])[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r["status"] for r in results) in (["compacted", "lost"], ["already", "compacted"]), results
    assert sorted(request_ids(st)) == ids
    doc = json.loads(st.get_bytes(f"telemetry/version=v1/day={DAY}/{COMPACTION}"))
    parts = st.list(f"telemetry/version=v1/day={DAY}/part-")
    assert doc["generation"] == 1 and sorted(doc["files"]) == parts  # the loser left no file behind


def test_late_shards_are_read_then_folded_in(tmp_path):
    st = open_store(tmp_path / "store")
    ids = write_day(st, shards=6)
    compact_telemetry(st, now=NOW)
    late = records(7, datetime(2026, 11, 24, 23, 59, tzinfo=UTC), "late")
    st.put_bytes(telemetry_key("v1", DAY, "late", 1), records_to_parquet(late))
    assert len(request_ids(st)) == len(ids) + 7
    again = compact_telemetry(st, now=NOW)
    assert again[0]["status"] == "compacted" and again[0]["shards"] == 1
    assert sorted(request_ids(st)) == sorted(ids + [r["request_id"] for r in late])
    assert json.loads(st.get_bytes(f"telemetry/version=v1/day={DAY}/{COMPACTION}"))["generation"] == 2


def test_today_is_never_compacted_and_bad_days_are_refused(tmp_path):
    st = open_store(tmp_path / "store")
    write_day(st, day="2026-11-26", shards=2)
    assert compact_telemetry(st, now=NOW) == []
    for day, message in [("2026-11-26", "not closed yet"), ("26/11/2026", "bad day"), ("2026-02-30", "bad day")]:
        with pytest.raises(ValueError, match=message):
            compact_telemetry(st, day=day, now=NOW)
    with pytest.raises(ValueError, match="kind must be one of"):
        compact_telemetry(st, kind="logs", now=NOW)


def test_migration_from_the_old_layout(tmp_path):
    st = open_store(tmp_path / "store")
    ids = []
    for s in range(4):
        recs = records(50, datetime(2026, 11, 23 + s % 2, 3, tzinfo=UTC), f"i{s}", seed=s)
        st.put_bytes(f"telemetry/v1/{recs[0]['time']:%Y-%m-%d}/i{s}-{s:06d}.parquet", records_to_parquet(recs))
        ids += [r["request_id"] for r in recs]
    fb = [dict(time=datetime(2026, 11, 24, 5, tzinfo=UTC), prediction_id="p", model_version="v1", label="cat")]
    st.put_bytes("feedback/v1/2026-11-24/i0-000001.parquet", records_to_parquet(fb, "feedback"))
    assert sorted(request_ids(st)) == sorted(ids)  # the old layout reads as it is
    assert migrate_telemetry(st, dry_run=True) == {"moved": 0, "already": 0, "left": 5}
    # a migration interrupted after copying one shard and before deleting it: that shard counts once
    old = st.list("telemetry/v1/")[0]
    st.put_bytes("telemetry/version=v1/day=" + old.split("/")[2] + "/" + old.rpartition("/")[2], st.get_bytes(old))
    assert sorted(request_ids(st)) == sorted(ids)
    assert migrate_telemetry(st) == {"moved": 4, "already": 1, "left": 0}
    assert migrate_telemetry(st) == {"moved": 0, "already": 0, "left": 0}
    assert all("/version=v1/day=" in k for k in st.list("telemetry/") + st.list("feedback/"))
    assert sorted(request_ids(st)) == sorted(ids) and len(read_telemetry(st, kind="feedback")) == 1


def test_labelled_predictions_read_only_the_named_records(tmp_path):
    st = open_store(tmp_path / "store")
    write_day(st, shards=12)
    tel = read_telemetry(st, "v1")
    labelled = tel.iloc[::97]  # about 1%
    fb = [
        dict(
            time=t + timedelta(minutes=5),
            prediction_id=pid,
            predicted_at=IDS.parse(pid)["time"],
            model_version="v1",
            predicted="cat",
            label="dog",
            correct=False,
            image_kept=True,
            instance="fb",
            source="api",
        )
        for t, pid in zip(labelled.time, labelled.prediction_id, strict=True)
    ]
    st.put_bytes(telemetry_key("v1", DAY, "fb", 1, "feedback"), records_to_parquet(fb, "feedback"))
    rows = labelled_predictions(st)
    assert len(rows) == len(labelled) and rows.image.notna().all()
    expect = dict(zip(labelled.prediction_id, labelled.image, strict=True))
    assert all(expect[p] == img for p, img in zip(rows.prediction_id, rows.image, strict=True))


def test_a_dataset_for_sql(tmp_path):
    st = open_store(tmp_path / "store")
    write_day(st, shards=4)
    write_day(st, day="2026-11-25", shards=2)
    dataset, info = telemetry_dataset(st, since="2026-11-25")
    assert info == {"files": 2, "skipped": []} and dataset.count_rows() == 400
    assert set(dataset.to_table(columns=["day", "version"]).to_pandas().drop_duplicates().itertuples(index=False)) == {
        ("2026-11-25", "v1")
    }


def test_on_gcs_with_a_reader_during_compaction(gcs_uri):
    st = open_store(gcs_uri)
    ids = sorted(write_day(st, shards=12, per_shard=100))
    assert request_ids(st, last_n=50) == read_telemetry(st, "v1").request_id.tail(50).tolist()
    sample = read_telemetry(st, "v1", since=DAY, sample=300, columns=["request_id"])
    assert sample.attrs["telemetry"]["sampled"] and 200 <= len(sample) <= 400
    reader = Reader(st)
    reader.start()
    wait_for(lambda: len(reader.reads) >= 1, what="the first read")
    proc = compaction(gcs_uri, rows_per_group=300)
    out, _ = proc.communicate(timeout=300)
    n = len(reader.reads)
    wait_for(lambda: len(reader.reads) >= n + 1, what="a read after the compaction")
    reader.stop.set()
    reader.join(60)
    assert proc.returncode == 0 and json.loads(out)[0]["status"] == "compacted", out
    assert reader.errors == [] and all(sorted(r) == ids for r in reader.reads)
    assert [f.name for f in live_files(st)][0].startswith("part-")
    assert sorted(request_ids(st)) == ids
