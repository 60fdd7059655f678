"""Monitoring: reference embeddings, telemetry windows (sampled when large, read by the store's reader or with SQL),
the drift detector and report, reports in the store (local and GCS), the CLI (with `compact` and `migrate`), and
`DriftMonitoring` bound to the real service."""

import io, json, sys, time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prometheus_client import CollectorRegistry

from devtools import in_process
from vit_nbdev.data import load_cifar10
from vit_nbdev.model import build_model, save_package
from vit_nbdev.cli import monitor_main as main
from vit_nbdev.telemetry import TelemetryWriter, read_telemetry, records_to_parquet, telemetry_key
from vit_nbdev.monitor import (
    WINDOW_COLUMNS,
    DriftMonitoring,
    MonitoredService,
    as_package,
    drift_report,
    drift_tests,
    embed_images,
    embedding_matrix,
    ensure_reference,
    latest_report,
    list_reports,
    load_reference,
    query_window,
    reference_key,
    run_monitoring,
)
from vit_nbdev.robustness import CORRUPTIONS, corrupt
from vit_nbdev.store import open_store

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    "A freshly initialised (seeded) tiny ViT as a model package: a fixed function of the image is all drift needs."
    torch.manual_seed(0)
    m, pre = build_model("vit-cifar-tiny")
    card = {
        "params": {"val_fraction": 0.2, "seed": 0},
        "dataset": {"source": "sample", "fingerprint": load_cifar10("sample", progress=False).fingerprint},
    }
    return save_package(m.eval(), pre, tmp_path_factory.mktemp("pkg"), card=card)


@pytest.fixture(scope="module")
def pkg(package_dir):
    return as_package(package_dir)


@pytest.fixture(scope="module")
def data():
    return load_cifar10("sample", progress=False)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, package_dir):
    st = open_store(tmp_path_factory.mktemp("store"))
    st.register(package_dir, version="v1")
    return st


@pytest.fixture(scope="module")
def reference(local_store):
    return ensure_reference(local_store, "v1")


def telemetry(pkg, images, version, start="2026-11-26T10:00:00Z"):
    recs = embed_images(pkg, images, version=version)
    return recs.assign(
        time=pd.date_range(start, periods=len(recs), freq="1s"), request_id=[f"r{i}" for i in range(len(recs))]
    )


def write_shards(st, df, version, instance="i", per_shard=100):
    "Shards as the service writes them, at `telemetry_key`: telemetry/version=<v>/day=<YYYY-MM-DD>/<instance>-<seq>."
    seq = 0
    for day, g in df.groupby(df.time.dt.strftime("%Y-%m-%d")):
        for i in range(0, len(g), per_shard):
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(g.iloc[i : i + per_shard], preserve_index=False), buf)
            st.put_bytes(telemetry_key(version, day, instance, seq), buf.getvalue(), overwrite=False)
            seq += 1


def vit_monitor(*args):
    "`vit-monitor` in this process: its exit status, the JSON lines it printed, what it said on stderr."
    # in process: each console script would import torch and Evidently again (test_fleet_sql.py runs the installed one)
    code, out, err = in_process(main, *args)
    return code, [json.loads(line) for line in out.splitlines()], err


def test_reference_is_stored_with_the_version_and_reused(local_store, reference, pkg):
    assert local_store.exists(reference_key("v1")) and reference_key("v1") == "models/v1/reference.parquet"
    assert len(reference) == 500 and set(reference.model_version) == {"v1"}
    assert (
        reference.attrs["reference"]["split"] == "validation" and reference.attrs["reference"]["n"] == 500
    )  # the sample's held-out part
    assert reference.attrs["reference"]["held_out"]
    again = ensure_reference(local_store, "latest")  # an alias resolves; the stored one comes back
    np.testing.assert_array_equal(embedding_matrix(again), embedding_matrix(reference).astype(np.float32))
    assert local_store.versions() == ["v1"]  # the extra file does not disturb the registry
    assert set(local_store.list("models/v1/")) >= {"models/v1/_COMPLETE", "models/v1/reference.parquet"}


def test_shifted_window_is_flagged_clean_is_not(pkg, data, reference):
    clean = embed_images(pkg, data.test.images[:200], version="v1")
    assert not drift_tests(reference, clean)["drift_detected"]
    rep = drift_report(reference, clean, html=False)
    assert rep.summary["status"] == "ok" and not rep.drift_detected and rep.summary["drift_score"] < 0.98
    dark = embed_images(pkg, data.test.images[:200] // 2, version="v1")
    rep = drift_report(reference, dark, html=False)
    assert rep.drift_detected and rep.summary["drifted"]["embedding"] and rep.summary["drift_score"] > 0.98
    E = embedding_matrix(clean)
    moved = clean.assign(embedding=list(E + 0.5 * E.std(0)))  # half a standard deviation on every coordinate
    assert drift_tests(reference, moved)["drifted"]["embedding"]


def test_evidently_computes_the_same_p_values_as_the_fast_path(pkg, data, reference):
    cur = embed_images(pkg, corrupt(data.test.images[200:400], "contrast", 3), version="v1")
    rep, fast = drift_report(reference, cur), drift_tests(reference, cur)
    assert rep.summary["p_values"].keys() == fast["p_values"].keys()
    for c, p in fast["p_values"].items():
        assert rep.summary["p_values"][c] == pytest.approx(p, abs=1e-12)
    assert rep.summary["drift_detected"] == fast["drift_detected"]
    assert "<!DOCTYPE html>" in rep.html[:200] and "Drift" in rep.html
    json.dumps(rep.summary)


def test_not_enough_data_is_not_an_alarm(pkg, data, reference):
    few = embed_images(pkg, data.test.images[:40] // 2, version="v1")  # drifted, but only 40 records
    rep = drift_report(reference, few)
    assert rep.summary["status"] == "not_enough_data" and not rep.drift_detected and rep.summary["drift_score"] is None
    assert "fewer than min_records=100" in rep.summary["message"] and "Not enough data" in rep.html
    assert drift_report(reference, few, min_records=30, html=False).summary["status"] == "ok"


def test_window_of_another_model_is_refused(pkg, data, reference):
    other = embed_images(pkg, data.test.images[:200], version="v2")
    with pytest.raises(ValueError, match="cannot be compared"):
        drift_report(reference, other)


def test_read_telemetry_last_n_and_time_range(tmp_path, pkg, data):
    st = open_store(tmp_path / "s")
    df = telemetry(
        pkg, data.test.images[:300], "v1", start="2026-11-25T23:58:20Z"
    )  # 100 records on the 25th, 200 on the 26th
    write_shards(st, df[:150], "v1", "a")
    write_shards(st, df[150:], "v1", "b")
    w = read_telemetry(st, "v1")
    assert len(w) == 300 and w.time.is_monotonic_increasing and w.request_id.tolist() == df.request_id.tolist()
    assert read_telemetry(st, "v1", last_n=120).request_id.tolist() == df.request_id[-120:].tolist()
    assert len(read_telemetry(st, "v1", since="2026-11-26T00:00:00Z")) == 200
    assert len(read_telemetry(st, "v1", until="2026-11-26")) == 100
    assert len(read_telemetry(st, "v1", since="2026-11-26T00:00:10Z", until="2026-11-26T00:00:20Z")) == 10
    assert len(read_telemetry(st, "v9")) == 0 and list(read_telemetry(st, "v9").columns) >= ["time", "embedding"]


@pytest.mark.parametrize("backend", ["local", "gcs"])
def test_report_saved_and_loaded_through_the_store(backend, tmp_path, request, package_dir, pkg, data):
    uri = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("gcs_uri")
    st = open_store(uri)
    st.register(package_dir, version="v1")
    assert latest_report(st) is None and load_reference(st, "v1") is None
    write_shards(st, telemetry(pkg, data.test.images[:300] // 2, "v1"), "v1")
    res = run_monitoring(uri, "latest", last_n=250)  # makes the reference on first need
    assert st.exists("models/v1/reference.parquet")
    assert res.drift_detected and res.summary["n_current"] == 250 and res.summary["versions"]["model"] == "v1"
    assert res.keys == [f"reports/{list_reports(st)[0]}.html", f"reports/{list_reports(st)[0]}.json"]
    html, summary = latest_report(uri)
    assert html == res.html and summary == json.loads(json.dumps(res.summary, default=str))
    assert summary["report"]["json"] == res.keys[1] and summary["window"]["last_n"] == 250
    small = run_monitoring(st, "v1", last_n=50)  # newer, and not enough data
    html, summary = latest_report(st)
    assert summary["report"]["json"] == small.keys[1] and html == small.html
    assert summary["status"] == "not_enough_data" and not summary["drift_detected"] and len(list_reports(st)) == 2


def test_a_large_window_is_tested_on_a_seeded_sample_and_says_so(tmp_path, package_dir, pkg, data):
    st = open_store(tmp_path / "store")
    st.register(package_dir, version="v1")
    write_shards(st, telemetry(pkg, data.test.images[:400], "v1"), "v1")
    bad = "telemetry/version=v1/day=2026-11-26/x-000001.parquet"
    st.put_bytes(bad, b"PAR1 truncated")
    with pytest.warns(UserWarning, match="skipping unreadable telemetry shard"):
        res = run_monitoring(st, "v1", last_n=None, sample=150)
    w = res.summary["window"]
    assert (w["rows"], w["sampled"], w["seed"], w["skipped"]) == (400, True, 0, [bad])
    assert w["n"] == w["sample"] == res.summary["n_current"] and 100 < w["sample"] < 200
    assert f"(a uniform sample of {w['sample']:,} of 400 records, seed 0)" in res.html
    assert f"1 unreadable shard skipped: {bad}" in res.html
    assert latest_report(st)[1]["window"]["sampled"]  # stored with the report
    with pytest.warns(UserWarning):
        same = run_monitoring(st, "v1", last_n=None, sample=150, save=False)
        other = run_monitoring(st, "v1", last_n=None, sample=150, sample_seed=1, save=False)
        whole = run_monitoring(st, "v1", last_n=None, save=False)  # 400 records: under SAMPLE, all of them
    assert same.summary["p_values"] == res.summary["p_values"] and same.summary["window"]["sample"] == w["sample"]
    assert other.summary["p_values"] != res.summary["p_values"] and other.summary["window"]["seed"] == 1
    assert not whole.summary["window"]["sampled"] and whole.summary["window"]["n"] == 400
    assert "uniform sample" not in whole.html
    # the service's monitoring passes its sample on
    svc = SimpleNamespace(
        served=None, metrics_registry=CollectorRegistry(), telemetry_flush_s=None, get_store=lambda: st
    )
    mon = DriftMonitoring(last_n=1000, sample=150, sample_seed=1)
    mon.bind(svc)
    with pytest.warns(UserWarning):
        mon._build("v1", pkg, None)
    assert mon.last["window"]["sampled"] and mon.last["window"]["seed"] == 1, mon.last
    assert mon.last["window"]["last_n"] == 1000 and mon.last["window"]["rows"] == 400


@pytest.fixture(scope="module")
def sql_store(tmp_path_factory, package_dir, pkg, data):
    "400 records over midnight, written by the service's writer: 200 clean images, then 200 darkened ones (drift)."
    st = open_store(tmp_path_factory.mktemp("sql"))
    st.register(package_dir, version="v1")
    images = torch.cat([data.test.images[:200], data.test.images[200:400] // 2])
    recs = embed_images(pkg, images, version="v1")
    times = pd.date_range("2026-11-25T23:50:00Z", periods=len(recs), freq="3s")
    writer = TelemetryWriter(st, instance="a", flush_records=64, flush_s=3600)
    for i, (r, at) in enumerate(zip(recs.to_dict("records"), times, strict=True)):
        extra = dict(time=at.to_pydatetime(), request_id=f"r{i // 2}", item=i % 2, instance="a")
        writer.add(dict(r, embedding=r["embedding"].tolist(), **extra))
    assert writer.close() == 0
    return st


SQL_WINDOWS = [  # the last 250 (darkened: drift), ten minutes across midnight, and a seeded sample of all 400
    dict(last_n=250),
    dict(last_n=None, since="2026-11-25T23:55:00Z", until="2026-11-26T00:05:00Z"),
    dict(last_n=None, sample=150, sample_seed=3),
]


@pytest.mark.parametrize("window", SQL_WINDOWS, ids=str)
def test_duckdb_gives_the_store_readers_report(sql_store, window):
    by_store = run_monitoring(sql_store, "v1", save=False, **window).summary
    by_sql = run_monitoring(sql_store, "v1", save=False, source="duckdb", **window).summary
    assert by_store["status"] == "ok" and by_sql["window"] == {**by_store["window"], "source": "duckdb"}
    for k in ("n_current", "p_values", "scores", "drift_score", "drift_detected", "drifted", "versions", "method"):
        assert by_sql[k] == by_store[k], k
    read = dict(last_n=window["last_n"], since=window.get("since"), until=window.get("until"))
    read.update(sample=window.get("sample", 10_000), seed=window.get("sample_seed", 0))
    ids = query_window(sql_store, "v1", **read).request_id.tolist()
    assert ids == read_telemetry(sql_store, "v1", columns=list(WINDOW_COLUMNS), **read).request_id.tolist()
    assert len(ids) == by_sql["n_current"]  # the window the report tested: with a sample, the same sample
    if "sample" in window:
        w = by_sql["window"]
        assert (w["rows"], w["sampled"], w["seed"], w["n"]) == (400, True, 3, w["sample"]) and w["n"] < 400
    if window["last_n"] == 250:
        assert by_sql["drift_detected"]


def test_report_command_reads_the_window_with_sql(sql_store, monkeypatch):
    report = ("report", "--store", sql_store.uri, "--last-n", "250", "--no-save")
    (code, by_store, err), (sql_code, by_sql, sql_err) = (
        vit_monitor(*report),
        vit_monitor(*report, "--source", "duckdb"),
    )
    assert code == sql_code == 0, err + sql_err
    assert by_sql[0]["window"] == {**by_store[0]["window"], "source": "duckdb"}
    assert by_sql[0]["scores"] == by_store[0]["scores"] and by_sql[0]["drift_detected"] == by_store[0]["drift_detected"]
    assert by_store[0]["drift_detected"] and by_store[0]["window"]["n"] == 250  # the darkened half: drift
    code, lines, err = vit_monitor(*report, "--source", "bigquery")
    assert (code, lines) == (2, []) and "vit-monitor: error: the BigQuery source needs the dataset" in err, err
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery", None)  # as without the `gcp` extra
    code, lines, err = vit_monitor(*report, "--source", "bigquery", "--bigquery-dataset", "my-project.vit_telemetry")
    assert (code, lines) == (2, []) and "vit-monitor: error: the BigQuery source needs google-cloud-bigquery" in err


def shard(st, key, times, version="v1"):
    "A shard of one record per time, written at `key` (either layout)."
    recs = [
        dict(time=pd.Timestamp(t).to_pydatetime(), request_id=f"r{i}", item=0, instance="a", model_version=version)
        for i, t in enumerate(times)
    ]
    st.put_bytes(key, records_to_parquet(recs))


def test_migrate_and_compact_commands(tmp_path):
    st, uri = open_store(tmp_path / "store"), str(tmp_path / "store")
    for seq in range(3):  # a closed day in the layout before partitions
        shard(
            st,
            f"telemetry/v1/2026-11-25/a-{seq:06d}.parquet",
            [f"2026-11-25T10:0{seq}:00Z", f"2026-11-25T11:0{seq}:00Z"],
        )
    shard(st, "feedback/v1/2026-11-25/a-000001.parquet", ["2026-11-25T12:00:00Z"])
    assert vit_monitor("migrate", "--store", uri, "--dry-run")[:2] == (0, [{"moved": 0, "already": 0, "left": 4}])
    assert len(st.list("telemetry/v1/")) == 3  # a dry run moves nothing
    assert vit_monitor("migrate", "--store", uri)[:2] == (0, [{"moved": 4, "already": 0, "left": 0}])
    assert vit_monitor("migrate", "--store", uri)[:2] == (0, [{"moved": 0, "already": 0, "left": 0}])
    assert len(st.list("telemetry/version=v1/day=2026-11-25/")) == 3
    code, lines, _ = vit_monitor("compact", "--store", uri, "--day", "2026-11-25", "--kind", "telemetry")
    assert code == 0 and [(r["kind"], r["day"], r["status"], r["shards"], r["rows"]) for r in lines] == [
        ("telemetry", "2026-11-25", "compacted", 3, 6)
    ]
    code, lines, err = vit_monitor("compact", "--store", uri)  # every closed day: the feedback is left, once more
    assert code == 0 and {(r["kind"], r["status"]) for r in lines} == {
        ("telemetry", "already"),
        ("feedback", "compacted"),
    }, err
    assert len(read_telemetry(st)) == 6 and len(read_telemetry(st, kind="feedback")) == 1
    assert vit_monitor("compact", "--store", uri, "--version", "v9")[:2] == (0, [])


@pytest.mark.parametrize(
    "args,msg",
    [
        (["compact", "--day", "2026-11-31"], "argument --day: a day YYYY-MM-DD, got '2026-11-31'"),
        (["compact", "--day", "yesterday"], "argument --day: a day YYYY-MM-DD, got 'yesterday'"),
        (["compact", "--kind", "images"], "argument --kind: invalid choice: 'images'"),
        (["report", "--sample", "many"], "argument --sample: invalid int value: 'many'"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, args, msg):
    code, lines, err = vit_monitor(*args, "--store", str(tmp_path))
    assert code == 2 and lines == [] and msg in err, err


def test_compacting_an_open_day_is_refused(tmp_path):
    today = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d")
    code, lines, err = vit_monitor("compact", "--store", str(tmp_path), "--day", today)
    assert code == 2 and lines == [] and f"vit-monitor compact: error: day {today} is not closed yet" in err


def test_corruptions_are_uint8_seeded_and_graded(data):
    x = data.test.images[:16]
    for k in CORRUPTIONS:
        ys = [corrupt(x, k, s) for s in range(6)]
        assert all(y.dtype == torch.uint8 and y.shape == x.shape for y in ys)
        assert torch.equal(ys[0], x)
        d = [(y.float() - x.float()).abs().mean().item() for y in ys]
        assert d[1] < d[5], (k, d)
    assert torch.equal(corrupt(x, "gaussian_noise", 2, seed=3), corrupt(x, "gaussian_noise", 2, seed=3))
    assert not torch.equal(corrupt(x, "gaussian_noise", 2, seed=3), corrupt(x, "gaussian_noise", 2, seed=4))
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)


def test_cli(tmp_path, package_dir, pkg, data, capsys):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    st.register(package_dir, version="v1")
    write_shards(st, telemetry(pkg, data.test.images[:200] // 2, "v1"), "v1")
    assert main(["reference", "--store", uri, "--model", "latest", "-n", "300"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v1" and out["records"] == 300 and out["key"] == "models/v1/reference.parquet"
    assert (
        main(["report", "--store", uri, "--html", str(tmp_path / "r.html"), "--fail-on-drift"]) == 1
    )  # drift: exit status 1
    out = json.loads(capsys.readouterr().out)
    assert (
        out["drift_detected"]
        and out["window"]["n"] == 200
        and (tmp_path / "r.html").read_text().lstrip().startswith("<!DOCTYPE")
    )
    assert (
        main(["report", "--store", uri, "--model", "nope"]) == 2
        and "no alias or complete version" in capsys.readouterr().err
    )
    # (the console script, as installed, runs in test_fleet_sql.py: one process start per entry point is enough)
    code, lines, err = vit_monitor("report", "--store", uri, "--last-n", "50", "--no-save")
    assert code == 0 and lines[-1]["status"] == "not_enough_data", err[-2000:]
    assert len(list_reports(st)) == 1


def test_robustness_study_end_to_end(data, tmp_path):
    "The robustness chapter's quick study (its cells are `slow`) on the shipped checkpoint: accuracy, alarm rates."
    import matplotlib

    matplotlib.use("Agg")
    from vit_nbdev.config import shipped_checkpoint
    from vit_nbdev.monitor import compute_reference
    from vit_nbdev.robustness import default_detector, plot_study, robustness_study, split_windows, study_table, windows

    qpkg = as_package(shipped_checkpoint("vit-cifar-small-cifar10"))
    reference = compute_reference(qpkg, "sample", n=500, split="validation")
    assert reference.attrs["reference"]["split"] == "validation"  # never the test images the windows are cut from
    images, labels = data.test.images[:600], data.test.labels[:600]
    kw = dict(
        window=200,
        corruptions=["contrast", "jpeg"],
        severities=(5,),
        detectors={"ours": default_detector},
        cache_dir=tmp_path / "emb",
    )
    df = robustness_study(qpkg, images, labels, reference, **kw)
    assert list(zip(df.corruption, df.severity, strict=True)) == [("none", 0), ("contrast", 5), ("jpeg", 5)]
    assert (df.windows == 3).all() and df.ours.between(0, 1).all() and df.accuracy.between(0, 1).all()
    assert df.accuracy.iloc[0] > 0.4  # a trained model, not chance
    assert df.set_index("corruption").loc["contrast", "ours"] == 1.0  # severity-5 contrast is a different world
    assert len(list((tmp_path / "emb").glob("*.parquet"))) == 3  # embeddings cached for the next call
    again = robustness_study(qpkg, images, labels, reference, **kw)
    assert again.drop(columns="windows").equals(df.drop(columns="windows"))
    val, test = split_windows(windows(600, 200))  # validation: even windows, test: odd ones
    assert (val, test) == ([slice(0, 200), slice(400, 600)], [slice(200, 400)])
    on_test = robustness_study(qpkg, images, labels, reference, subset="test", **kw)
    assert (on_test.windows == 1).all() and on_test.accuracy.equals(df.accuracy)
    with pytest.raises(ValueError, match="subset"):
        robustness_study(qpkg, images, labels, reference, subset="train", **kw)
    tab = study_table(df, "ours")
    assert list(tab.columns) == ["severity 0", "severity 5"] and list(tab.index) == ["contrast", "jpeg"]
    fig = plot_study(df, "ours", "test")
    assert fig is not None


def png(x: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def test_drift_monitoring_through_the_real_service(tmp_path, package_dir, data):
    "`DriftMonitoring` bound by `create_app`: the service is a `MonitoredService`, and a report asked for right after"
    "predictions covers them all (the service writes its buffered telemetry first), on `/monitoring` and `/metrics`."
    from fastapi.testclient import TestClient
    from vit_nbdev.serve import create_app

    st = open_store(tmp_path / "store")
    st.register(package_dir, version="v1")
    mon = DriftMonitoring(last_n=1000)
    app = create_app(st, "v1", engine="torch-fp32", admin_token=TOKEN, monitoring=mon, telemetry_flush_s=3600)
    with TestClient(app) as client:
        svc = mon.service
        assert isinstance(svc, MonitoredService), [
            m
            for m in ("served", "get_store", "metrics_registry", "telemetry_flush_s", "flush_telemetry")
            if not hasattr(svc, m)
        ]
        assert svc.telemetry_flush_s == 3600 and svc.get_store().uri == st.uri
        assert svc.metrics_registry.get_sample_value("vit_drift_detected") == -1
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.served is not None and svc.served.version == "v1"
        images = data.test.images[:120] // 2  # darkened: drift
        for i in range(0, len(images), 12):
            files = [("file", (f"{j}.png", png(x), "image/png")) for j, x in enumerate(images[i : i + 12])]
            assert client.post("/predict", files=files).status_code == 200
        r = client.post("/admin/update-reference-data", headers=ADMIN)
        assert r.status_code == 200 and r.json()["records"] == 500 and r.json()["key"] == "models/v1/reference.parquet"
        r = client.post("/admin/update-monitoring", params={"wait": 120}, headers=ADMIN)
        out = r.json()
        assert r.status_code == 200 and out["status"] == "done", out
        assert out["flushed"] == {"written": 120, "buffered": 0}  # nothing had been written yet: flush_s is an hour
        assert out["report"]["window"]["n"] == 120 and out["report"]["window"]["telemetry_flush_s"] == 3600
        assert out["report"]["drift_detected"]
        assert "window of 120 records from 1 instance" in client.get("/monitoring").text
        assert svc.metrics_registry.get_sample_value("vit_drift_detected") == 1
        assert "vit_drift_detected 1.0" in client.get("/metrics").text
        assert svc.flush_telemetry() == {"written": 0, "buffered": 0}  # written already
