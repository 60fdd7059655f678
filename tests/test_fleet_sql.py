"""The fleet report's SQL (monitor): DuckDB over real shards (local, and on the GCS emulator) gives the numbers pandas
counts from the records, and `live_accuracy`'s where the two overlap. The BigQuery path cannot run here (no BigQuery,
and no emulator of it): what is tested is that it runs the same text with its own table names, and what it says
without its dataset or its package. The same for a drift report's window read with SQL (`query_window`): DuckDB reads
the store reader's records, its sample included, and BigQuery's text runs through a stand-in client on DuckDB."""

import json, os, shutil, subprocess, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from vit_nbdev.cli import monitor_main
from vit_nbdev.monitor import (
    FLEET_COLUMNS,
    WINDOW_COLUMNS,
    BigQueryError,
    bigquery_fleet,
    bigquery_tables,
    fleet_lines,
    fleet_report,
    fleet_sql,
    local_fleet,
    query_window,
    window_count_sql,
    window_sql,
)
from vit_nbdev.store import open_store
from vit_nbdev.telemetry import (
    PredictionIds,
    TelemetryWriter,
    feedback_records,
    live_accuracy,
    read_telemetry,
    telemetry_dataset,
)

BIN = Path(sys.executable).parent
LABELS = ["cat", "dog", "frog"]
T0 = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)  # 400 predictions a minute apart: 240 on the 25th, 160 on the 26th


def write_fleet(root: Path) -> None:
    "Two instances, two versions, two days: telemetry and feedback as the service's writers write them."
    st = open_store(root)
    ids = PredictionIds(b"fleet-sql-test-key-0123456789", ttl_s=3650 * 86400)  # the ids of 2026 stay valid
    rng = np.random.default_rng(0)
    kw = dict(flush_records=40, flush_s=3600)  # several shards per partition
    tel = {i: TelemetryWriter(st, instance=i, **kw) for i in ("a", "b")}
    fb = {i: TelemetryWriter(st, instance=i, kind="feedback", **kw) for i in ("a", "b")}
    for n in range(400):
        at, inst = T0 + timedelta(minutes=n), "ab"[n % 2]
        version, predicted = ("v1", "v2")[int(rng.random() < 0.3)], int(rng.integers(3))
        pid = ids.new(version, predicted, kept=False, t=at)
        record = dict(
            time=at,
            request_id=f"{inst}-{n // 6}",  # requests of 3 items from each instance
            item=n // 2 % 3,
            instance=inst,
            model_version=version,
            label=LABELS[predicted],
            score=float(rng.random()),
            embedding=rng.normal(size=4).astype(np.float32).tolist(),
            prediction_id=pid,
        )
        tel[inst].add(record)
        if rng.random() < 0.4:  # labelled, from a few minutes to a day and a half later; some twice
            when = at + timedelta(minutes=int(rng.integers(1, 2000)))
            for k in range(1 + int(rng.random() < 0.15)):
                item = [dict(prediction_id=pid, label=LABELS[int(rng.integers(3))])]
                recs = feedback_records(item, ids, lambda v: LABELS, instance=inst, now=when + timedelta(hours=k))
                fb["ab"[int(rng.integers(2))]].add(recs[0])
    assert sum(w.close() for w in [*tel.values(), *fb.values()]) == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    write_fleet(root)
    return open_store(root)


def counted_with_pandas(st, since=None, until=None) -> pd.DataFrame:
    "The fleet table from the records themselves: rows per version and day, each prediction's last label."
    tel = read_telemetry(st)
    tel = tel.assign(day=tel.time.dt.strftime("%Y-%m-%d"))
    fb = read_telemetry(st, kind="feedback").sort_values("time", kind="stable")
    fb = fb.drop_duplicates("prediction_id", keep="last")
    fb = fb.assign(day=pd.to_datetime(fb.predicted_at, utc=True).dt.strftime("%Y-%m-%d"))
    keep = lambda df: df[(df.day >= (since or "")) & (df.day < (until or "~"))]
    tel, fb = keep(tel), keep(fb)
    req = tel.groupby(["model_version", "day"]).agg(predictions=("time", "size"), requests=("request_id", "nunique"))
    acc = fb.groupby(["model_version", "day"]).agg(labelled=("time", "size"), correct=("correct", "sum"))
    out = req.join(acc, how="outer").fillna(0).reset_index().rename(columns={"model_version": "version"})
    out = out.assign(accuracy=out.correct / out.labelled.replace(0, np.nan))
    out = out.assign(labelled_share=out.labelled / out.predictions.replace(0, np.nan))
    return out[list(FLEET_COLUMNS)].astype(FLEET_COLUMNS).sort_values(["version", "day"], ignore_index=True)


def test_the_store_is_a_fleet(store):
    keys = store.list("")
    assert {k.split("/")[0] for k in keys} == {"telemetry", "feedback"}
    parts = {tuple(k.split("/")[1:3]) for k in keys if k.startswith("telemetry/")}
    assert parts == {(f"version={v}", f"day={d}") for v in ("v1", "v2") for d in ("2026-11-25", "2026-11-26")}
    fb = read_telemetry(store, kind="feedback")
    assert fb.prediction_id.duplicated().any()  # some predictions were labelled twice
    label_day = fb.time.dt.strftime("%Y-%m-%d")
    assert (label_day > pd.to_datetime(fb.predicted_at, utc=True).dt.strftime("%Y-%m-%d")).any()  # a day later


@pytest.mark.parametrize(
    "since,until",
    [(None, None), ("2026-11-26", None), (None, "2026-11-26"), ("2026-11-25", "2026-11-26"), ("2026-11-27", None)],
)
def test_local_sql_counts_what_pandas_counts(store, since, until):
    got = local_fleet(store, since, until)
    pd.testing.assert_frame_equal(got, counted_with_pandas(store, since, until))
    assert got.attrs["fleet"]["source"] == "local" and got.attrs["fleet"]["skipped"] == []
    if since is None and until is None:
        assert len(got) == 4 and got.predictions.sum() == 400 and got.labelled.between(1, got.predictions).all()


def test_live_accuracy_agrees_per_version(store):
    per_version = local_fleet(store).groupby("version")[["labelled", "correct"]].sum()
    acc = live_accuracy(store, last_n=None).set_index("model_version")[["labelled", "correct"]]
    pd.testing.assert_frame_equal(per_version.sort_index(), acc.sort_index(), check_names=False, check_dtype=False)


def test_days_are_utc_whatever_the_zone_of_the_machine(store):
    "The installed `vit-monitor fleet`, in a process of its own: the zone is read once per process."
    env = {**os.environ, "TZ": "America/New_York"}  # 8 p.m. UTC is 3 p.m. there: other days, if it leaked
    cmd = [str(BIN / "vit-monitor"), "fleet", "--store", store.uri, "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == json.loads(local_fleet(store).to_json(orient="records")) and len(rows) == 4


def test_each_prediction_and_label_counts_once_beside_a_copy(store, tmp_path):
    "BigQuery reads every parquet file, a compacted day's replaced shards included: copies change no number."
    shutil.copytree(store.uri, tmp_path / "copy")
    copy = open_store(tmp_path / "copy")
    for k in copy.list(""):
        if k.endswith(".parquet"):
            folder, name = k.rsplit("/", 1)
            copy.put_bytes(f"{folder}/copy{name}", copy.get_bytes(k))  # instance `copya`: a second copy
    assert len(read_telemetry(copy)) == 800  # every record twice
    pd.testing.assert_frame_equal(local_fleet(copy), local_fleet(store))


def test_an_unreadable_shard_is_skipped_and_named(store, tmp_path):
    shutil.copytree(store.uri, tmp_path / "copy")
    copy = open_store(tmp_path / "copy")
    bad = "telemetry/version=v1/day=2026-11-26/c-000001.parquet"
    copy.put_bytes(bad, b"PAR1 not a parquet file")
    with pytest.warns(UserWarning):
        got = local_fleet(copy)
    assert got.attrs["fleet"]["skipped"] == [bad]
    pd.testing.assert_frame_equal(got, local_fleet(store))


def test_the_same_shards_on_gcs_give_the_same_table(store, gcs_uri):
    "DuckDB reads a `gs://` store through its Arrow filesystem (the GCS emulator here)."
    gcs = open_store(gcs_uri)
    for k in store.list(""):
        gcs.put_bytes(k, store.get_bytes(k))
    pd.testing.assert_frame_equal(local_fleet(gcs, since="2026-11-25"), local_fleet(store, since="2026-11-25"))


def test_an_empty_store_is_an_empty_table(tmp_path):
    got = fleet_report(tmp_path / "empty")
    assert got.empty and list(got.columns) == list(FLEET_COLUMNS)
    assert fleet_lines(got) == ["no predictions and no labels in the window"] and fleet_lines(got, True) == []


def test_bigquery_runs_the_same_text_with_its_table_names():
    tables = bigquery_tables("my-project.vit_telemetry")
    assert tables == {
        "telemetry": "`my-project.vit_telemetry.telemetry`",
        "feedback": "`my-project.vit_telemetry.feedback`",
    }
    local, bq = fleet_sql(since="2026-11-25"), fleet_sql(**tables, since="2026-11-25")
    named = local.replace("FROM telemetry", f"FROM {tables['telemetry']}")
    assert bq == named.replace("FROM feedback", f"FROM {tables['feedback']}") and bq.count("FROM `my-project.") == 2
    for bad in ("vit_telemetry", "my-project.vit-telemetry", "my-project.vit_telemetry`; DROP"):
        with pytest.raises(ValueError, match="PROJECT.DATASET"):
            bigquery_tables(bad)
    with pytest.raises(ValueError, match="since must be a day YYYY-MM-DD"):
        fleet_sql(since="2026-11-25' OR '1'='1")


def test_bigquery_says_what_it_needs(monkeypatch):
    with pytest.raises(ValueError, match="needs the dataset of the external tables"):
        fleet_report(source="bigquery")
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery", None)  # as without the `gcp` extra
    with pytest.raises(ImportError, match=r"pip install 'vit-nbdev\[gcp\]'"):
        bigquery_fleet("my-project.vit_telemetry")
    with pytest.raises(ValueError, match="source must be one of local, bigquery"):
        fleet_report(source="sqlite")


def test_the_command_prints_the_table(store, capsys):
    "`vit-monitor fleet` in this process (the installed script runs in the test of the time zone above)."

    def run(*args):
        try:
            code = monitor_main(["fleet", *args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    r = run("--store", store.uri, "--json", "--since", "2026-11-26")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == json.loads(local_fleet(store, since="2026-11-26").to_json(orient="records")) and len(rows) == 2
    r = run("--store", store.uri)
    assert r.returncode == 0 and r.stdout.split()[:8] == list(FLEET_COLUMNS) and len(r.stdout.splitlines()) == 5
    r = run("--source", "bigquery")
    assert r.returncode == 2 and "vit-monitor fleet: error: the BigQuery source needs the dataset" in r.stderr
    r = run("--until", "2026-11-31")
    assert r.returncode == 2 and "argument --until: a day YYYY-MM-DD, got '2026-11-31'" in r.stderr


WINDOWS = [  # drift windows of the fleet's v1 (about 280 records over two days): the last n, time ranges, samples
    dict(last_n=100),
    dict(last_n=50, until="2026-11-26T01:00:00Z"),
    dict(since="2026-11-25T23:30:00Z", until="2026-11-26T02:00:00.5Z"),
    dict(sample=60),
    dict(sample=60, seed=7, last_n=250),
    dict(sample=30, since="2026-11-26"),
]
DATASET = "my-project.vit_telemetry"


def store_window(st, window) -> pd.DataFrame:
    "The window as the store's reader gives it to a report."
    return read_telemetry(st, "v1", columns=list(WINDOW_COLUMNS), **window)


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_duckdb_reads_the_store_readers_window(store, window):
    want, got = store_window(store, window), query_window(store, "v1", **window)
    pd.testing.assert_frame_equal(got, want)  # the same records (the same sample), the same order and types
    assert got.attrs["telemetry"] == want.attrs["telemetry"] and set(got.model_version) == {"v1"}
    facts = got.attrs["telemetry"]
    assert facts["sampled"] == ("sample" in window) and 0 < len(got) <= facts["rows"]
    if facts["sampled"]:
        assert facts["sample"] == len(got) < facts["rows"]


def test_bigquery_runs_the_same_window_text():
    table = bigquery_tables(DATASET)["telemetry"]
    for window in WINDOWS:
        rows = 500 if "sample" in window else None  # counted: more than the sample
        duck = window_sql("v1", **window, rows=rows)
        bq = window_sql("v1", **window, rows=rows, dialect="bigquery", table=table)
        assert bq == duck.replace("FROM telemetry", f"FROM {table}").replace("epoch_us(time)", "UNIX_MICROS(time)")
        assert ("UNIX_MICROS(time)" in bq) == ("sample" in window) and "epoch_us" not in bq
    count = window_count_sql("v1", "2026-11-26", table=table)
    assert count == window_count_sql("v1", "2026-11-26").replace("FROM telemetry", f"FROM {table}")
    with pytest.raises(ValueError, match="is not a version's name"):
        window_sql("v1' OR '1'='1")
    with pytest.raises(ValueError, match="dialect must be one of duckdb, bigquery"):
        window_sql("v1", dialect="sqlite")


def as_bigquery_types(t: pa.Table) -> pa.Table:
    "`t` with the types BigQuery's external table gives parquet's: FLOAT64 and INT64 for every float and integer."
    wider = {pa.float32(): pa.float64(), pa.int32(): pa.int64(), pa.list_(pa.float32()): pa.list_(pa.float64())}
    return t.cast(pa.schema([pa.field(f.name, wider.get(f.type, f.type)) for f in t.schema]))


def stand_in_bigquery(st, queries: list, fail: Exception | None = None) -> SimpleNamespace:
    "`google.cloud.bigquery` for `DATASET` over the shards of `st`: BigQuery's text, run by DuckDB with its spelling."
    table = bigquery_tables(DATASET)["telemetry"]

    def result(sql):
        if fail:
            raise fail
        everything, _ = telemetry_dataset(st)  # every version, every day: the SQL's WHERE does the pruning
        duck = sql.replace(f"FROM {table}", "FROM telemetry").replace("UNIX_MICROS(time)", "epoch_us(time)")
        with duckdb.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            con.register("telemetry", everything)
            t = as_bigquery_types(con.sql(duck).to_arrow_table())
        return SimpleNamespace(to_arrow=lambda create_bqstorage_client=True: t)

    class Client:
        def __init__(self, project):
            assert project == "my-project"

        def query(self, sql):
            queries.append(sql)
            return SimpleNamespace(result=lambda: result(sql))

    return SimpleNamespace(Client=Client)


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_bigquery_reads_the_same_window(store, monkeypatch, window):
    queries = []
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery", stand_in_bigquery(store, queries))
    got = query_window(None, "v1", **window, source="bigquery", bigquery_dataset=DATASET)
    want = store_window(store, window)
    pd.testing.assert_frame_equal(got, want)
    assert got.attrs["telemetry"] == {k: v for k, v in want.attrs["telemetry"].items() if k not in ("files", "skipped")}
    assert len(queries) == 1 + ("sample" in window)  # a window that may be sampled is counted first
    assert all(f"FROM {bigquery_tables(DATASET)['telemetry']}" in q and "epoch_us" not in q for q in queries)


def test_the_bigquery_window_says_what_it_needs(store, monkeypatch):
    with pytest.raises(ValueError, match="needs the dataset of the external tables"):
        query_window(store, "v1", source="bigquery")
    with pytest.raises(ValueError, match="source must be one of duckdb, bigquery"):
        query_window(store, "v1", source="store")
    from google.api_core.exceptions import Forbidden

    queries = []
    stand_in = stand_in_bigquery(store, queries, fail=Forbidden("Access Denied: Table my-project:vit_telemetry"))
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery", stand_in)
    with pytest.raises(BigQueryError, match="BigQuery: 403 Access Denied"):
        query_window(None, "v1", last_n=10, source="bigquery", bigquery_dataset=DATASET)
    assert len(queries) == 1
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery", None)  # as without the `gcp` extra
    with pytest.raises(ImportError, match=r"pip install 'vit-nbdev\[gcp\]'"):
        query_window(None, "v1", source="bigquery", bigquery_dataset=DATASET)
