"""A fleet on one store: real `vit-serve` processes that follow the alias they serve (a local store and the GCS
emulator), keep their model through a store outage, a pinned version that is not polled, and a drift report that
covers every prediction of the instance that builds it, and says from how many instances its records came."""

import threading, time
from concurrent.futures import ThreadPoolExecutor

import httpx, pytest

from conftest import ServeProcess
from devtools import wait_for
from test_serve import ADMIN, TOKEN, hammer, png, predict
from vit_nbdev.data import load_cifar10
from vit_nbdev.store import open_store

POLL_S = 1.0


@pytest.fixture(scope="module")
def images():
    return load_cifar10(progress=False).test.images[:64]


@pytest.fixture(scope="module")
def pinned(tiny_packages, tmp_path_factory):
    """`(store, instance)`: `va` (latest) and `vb` registered, and an instance pinned to `va` (a version: never polled,
    even every 0.2 s) that writes its telemetry hourly; the report test uses it first, then the pinned-version test.
    Started, not waited for: it gets ready while the test starts its others."""
    tmp = tmp_path_factory.mktemp("pinned")
    store = str(tmp / "store")
    st = open_store(store)
    st.register(tiny_packages["a"], "va")
    st.register(tiny_packages["b"], "vb", aliases=[])
    env = dict(VIT_MODEL="va", VIT_MODEL_POLL_S=0.2, VIT_ADMIN_TOKEN=TOKEN, VIT_TELEMETRY_FLUSH_S=3600)
    p = ServeProcess(store, tmp, env)
    yield store, p
    p.stop()


def version_of(p) -> str | None:
    try:
        return httpx.get(p.url + "/readyz", timeout=10).json().get("model_version")
    except httpx.TransportError:
        return None


def converged(procs, version: str, t0: float, timeout: float = 60) -> float:
    "Seconds from `t0` until every process in `procs` serves `version` (polled every 20 ms)."
    deadline = t0 + timeout
    while any(version_of(p) != version for p in procs):
        assert time.monotonic() < deadline, (
            f"not every instance serves {version} after {timeout} s: {[version_of(p) for p in procs]}"
        )
        time.sleep(0.02)
    return time.monotonic() - t0


def test_two_instances_follow_the_alias(store_uri, serve_process, tiny_packages, images):
    """Under load: an admin update on one instance moves `production`, the other follows; a registry move reaches
    both; a broken version reaches neither; no request fails."""
    st = open_store(store_uri)
    for v, pkg in [("va", "a"), ("vb", "b"), ("vbroken", "broken")]:
        st.register(tiny_packages[pkg], v, aliases=[])
    st.set_alias("production", "va")
    env = dict(
        VIT_MODEL="production", VIT_MODEL_POLL_S=POLL_S, VIT_ADMIN_TOKEN=TOKEN, VIT_TELEMETRY=0, VIT_MAX_WAIT_MS=3
    )
    fleet = [serve_process(store_uri, **env) for _ in range(2)]
    a, b = fleet
    assert [p.wait_ready()["model_version"] for p in fleet] == ["va", "va"]
    stop, blobs = threading.Event(), [png(x) for x in images[:16]]
    with ThreadPoolExecutor(2) as ex:
        loads = [ex.submit(hammer, p.url, blobs, 2, stop) for p in fleet]
        wait_for(lambda: all(p.metric("vit_predictions_total") >= 10 for p in fleet), 120, "the load")  # the load is on
        t0 = time.monotonic()
        r = httpx.post(a.url + "/admin/update-model", json={"version": "vb"}, headers=ADMIN, timeout=120)
        t_a = time.monotonic() - t0
        assert r.status_code == 200 and (r.json()["version"], r.json()["alias"]) == ("vb", "production"), r.text
        assert st.resolve("production") == "vb" and version_of(a) == "vb"  # the registry moved, A swapped at once
        t_admin = converged(fleet, "vb", t0)
        st.rollback("production")  # a move in the registry alone
        t_registry = converged(fleet, "va", time.monotonic())
        st.set_alias("production", "vbroken")  # a version that does not load
        wait_for(
            lambda: all(p.metric("vit_model_updates_total", source="poll", result="load_error") >= 1 for p in fleet),
            timeout=60,
        )
        assert [version_of(p) for p in fleet] == ["va", "va"]  # ... keeps the fleet on va
        st.set_alias("production", "vb")
        t_again = converged(fleet, "vb", time.monotonic())
        stop.set()
        per_client = [c for f in loads for c in f.result()]
    flat = [x for c in per_client for x in c]
    assert flat and all(s == 200 for s, _, _ in flat), [x for x in flat if x[0] != 200][:5]
    for c in per_client:  # a client sees va, vb, va, vb: never flapping
        seq = [v for _, vs, _ in c for v in vs]
        assert sum(x != y for x, y in zip(seq, seq[1:], strict=False)) <= 3, seq
    for p in fleet:
        assert p.metric("vit_model_polls_total", result="store_error") == 0
    assert (
        b.metric("vit_model_updates_total", source="poll", result="swapped") >= 3
        and a.metric("vit_model_updates_total", source="admin", result="swapped") == 1
    )
    backend = "GCS emulator" if store_uri.startswith("gs://") else "local store"
    print(
        f"\n{backend}, 2 instances, VIT_MODEL_POLL_S={POLL_S:g}: admin update answered in {t_a:.2f} s, "
        f"fleet on vb {t_admin:.2f} s after it; "
        f"registry rollback -> fleet on va in {t_registry:.2f} s; registry move -> fleet on vb in {t_again:.2f} s; "
        f"{len(flat)} requests under load, all 200"
    )


def test_a_store_outage_keeps_the_model(gcs_emulator, gcs_uri, serve_process, tiny_packages, images):
    "The emulator frozen: polls fail (counted), predictions go on with the current model; resumed, it follows again."
    st = open_store(gcs_uri)
    for v, pkg in [("va", "a"), ("vb", "b")]:
        st.register(tiny_packages[pkg], v, aliases=[])
    st.set_alias("production", "va")
    p = serve_process(gcs_uri, VIT_MODEL="production", VIT_MODEL_POLL_S=0.5, VIT_TELEMETRY=0)
    p.wait_ready()
    with gcs_emulator.paused():
        wait_for(lambda: p.metric("vit_model_polls_total", result="store_error") >= 1, timeout=90)
        r = predict(p.url, png(images[0]))
        assert r.status_code == 200 and r.json()[0]["model_version"] == "va" and version_of(p) == "va"
    st.set_alias("production", "vb")
    print(f"\nafter the outage: following again in {converged([p], 'vb', time.monotonic()):.2f} s")


def test_a_fresh_fleet_waits_for_the_first_promotion(tmp_path, serve_process, tiny_packages, monkeypatch):
    "Deployed before `production` exists: not ready, saying why; the first `promote` creates it and it is loaded."
    from vit_nbdev.registry import promote

    monkeypatch.setenv("VIT_CACHE", str(tmp_path / "cache"))
    store = str(tmp_path / "store")
    open_store(store).register(tiny_packages["a"], "va")  # training moved latest only
    p = serve_process(store, VIT_MODEL="production", VIT_MODEL_POLL_S=POLL_S, VIT_TELEMETRY=0)

    def waiting_for_production():
        try:
            return "no alias or complete version 'production'" in (
                httpx.get(p.url + "/readyz").json().get("detail") or ""
            )
        except httpx.TransportError:
            return False  # not listening yet

    wait_for(waiting_for_production, timeout=120)
    t0 = time.monotonic()
    promote(store, "latest", images=100, by="test", echo=lambda s: None)
    print(f"\nthe first promotion: the instance serves it {converged([p], 'va', t0):.2f} s after it began")


def test_a_report_covers_every_prediction(pinned, serve_process, images):
    """The seed's flow: 300 predictions, then update-reference-data and update-monitoring at once: the report
    reads all 300; then 100 more on a second instance."""
    store, a = pinned  # serves va, and would write its telemetry in an hour
    b = serve_process(store, VIT_ADMIN_TOKEN=TOKEN, VIT_TELEMETRY_FLUSH_S=0.5)  # follows latest: va
    a.wait_ready()
    b.wait_ready()
    blobs = [png(x) for x in images]

    def predict_n(p, n):
        for i in range(0, n, 10):
            assert predict(p.url, *(blobs[j % 64] for j in range(i, i + 10))).status_code == 200

    predict_n(a, 300)
    assert httpx.post(a.url + "/admin/update-reference-data", headers=ADMIN, timeout=300).status_code == 200
    r = httpx.post(a.url + "/admin/update-monitoring", params={"wait": 120}, headers=ADMIN, timeout=180)
    assert r.status_code == 200 and r.json()["status"] == "done", r.text
    body = r.json()
    assert body["flushed"] == {"written": 300, "buffered": 0}, body
    rep = body["report"]
    assert (rep["status"], rep["n_current"], rep["window"]["instances"]) == ("ok", 300, 1), rep
    page = httpx.get(a.url + "/monitoring").text
    assert (
        "window of 300 records from 1 instance" in page and "every 3600 s (VIT_TELEMETRY_FLUSH_S)" in page
    )  # short: it says why
    predict_n(b, 100)
    wait_for(
        lambda: b.metric("vit_telemetry_records_written_total") >= 100, timeout=60
    )  # B writes every 0.5 s by itself
    rep = httpx.post(a.url + "/admin/update-monitoring", params={"wait": 120}, headers=ADMIN, timeout=180).json()[
        "report"
    ]
    assert rep["n_current"] == 400 and sorted(rep["window"]["by_instance"].values()) == [100, 300], rep["window"]
    assert "window of 400 records from 2 instances" in httpx.get(a.url + "/monitoring").text
    bad = httpx.post(a.url + "/admin/update-monitoring", params={"wait": "soon"}, headers=ADMIN)
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], str) and "wait" in bad.json()["detail"], bad.text


def test_a_pinned_version_is_not_polled(pinned):
    store, p = pinned
    st = open_store(store)
    p.wait_ready()
    wait_for(lambda: "va is a version: pinned, not polling" in p.log(), timeout=60)  # the follower has stopped
    st.set_alias("latest", "vb")
    assert p.metric("vit_model_polls_total") == 0 and version_of(p) == "va"
    r = httpx.post(
        p.url + "/admin/update-model", json={"version": "vb"}, headers=ADMIN, timeout=120
    )  # this instance only
    assert (
        r.status_code == 200
        and r.json()["alias"] is None
        and version_of(p) == "vb"
        and st.aliases() == {"latest": "vb"}
    )
