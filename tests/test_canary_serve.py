"""Canary and shadow traffic in real `vit-serve` processes on one store: the fleet follows a canary started and
ended in the registry (by the poll, no restart), splits requests (by a draw or a sticky header), shadows them,
serves production alone when the canary does not load or does not fit the memory budget, and falls back to
production when the canary's forward pass fails."""

import asyncio

import httpx, pytest

from conftest import ServeProcess
from devtools import wait_for
from test_serve import ADMIN, TOKEN, png, predict
from vit_nbdev.canary import end_canary, start_canary
from vit_nbdev.config import ServeConfig
from vit_nbdev.data import load_cifar10
from vit_nbdev.model import load_package
from vit_nbdev.service import CanarySlot, Service, Upload
from vit_nbdev.store import open_store
from vit_nbdev.telemetry import read_telemetry

KEY = "a feedback key the fleet shares"
FLEET = dict(
    VIT_MODEL="production",
    VIT_MODEL_POLL_S="0.3",
    VIT_ADMIN_TOKEN=TOKEN,
    VIT_FEEDBACK_KEY=KEY,
    VIT_TELEMETRY_FLUSH_S="0.3",
    VIT_MAX_WAIT_MS="3",
)


@pytest.fixture(scope="module")
def blobs():
    return [png(x) for x in load_cifar10(progress=False).test.images[:8]]


@pytest.fixture(scope="module")
def store(tiny_packages, tmp_path_factory) -> str:
    "A local store: `production` at `va`, and `vb` and `vbroken` (not loadable) as candidates."
    uri = str(tmp_path_factory.mktemp("canary-store") / "store")
    st = open_store(uri)
    for v, pkg in [("va", "a"), ("vb", "b"), ("vbroken", "broken")]:
        st.register(tiny_packages[pkg], v, aliases=[])
    st.set_alias("production", "va")
    return uri


@pytest.fixture(scope="module")
def fleet(store, tmp_path_factory):
    "Two instances serving `production`: `big` (no memory budget) and `small` (too small a budget for two models)."
    logs = tmp_path_factory.mktemp("canary-logs")
    procs = [ServeProcess(store, logs, FLEET), ServeProcess(store, logs, dict(FLEET, VIT_MEMORY_BUDGET_MB="0.5"))]
    for p in procs:
        assert p.wait_ready()["canary"]["state"] == "none"
    yield procs
    for p in procs:
        p.stop()


def canary_of(p) -> dict:
    return httpx.get(p.url + "/readyz", timeout=10).json()["canary"]


def follows(p, **want) -> dict:
    "Wait until the canary at `p`'s `/readyz` has the fields `want` (the poll follows the registry)."

    def there():
        c = canary_of(p)
        return c if all(c.get(k) == v for k, v in want.items()) else None

    return wait_for(there, 60, f"canary {want}")


def telemetry(store: str, n: int = 1, **cols):
    "The telemetry records whose columns equal `cols`, once there are at least `n` (the instances flush often)."

    def read():
        t = read_telemetry(store)
        for k, v in cols.items():
            t = t[t[k] == v]
        return (t,) if len(t) >= n else None

    return wait_for(read, 30, f"{n} telemetry records with {cols}")[0]


def test_split_sticky_and_memory_refusal(fleet, store, blobs):
    """A canary on half the traffic with a sticky header: both arms answer, a key keeps its arm, ids and telemetry
    carry the arm, feedback on a canary answer is accepted; the small instance refuses it and serves production."""
    big, small = fleet
    start_canary(store, "vb", 50, sticky_header="X-User", by="test")
    follows(big, version="vb", state="serving", mode="split", percent=50.0)
    refused = follows(small, version="vb", state="refused")
    assert "VIT_MEMORY_BUDGET_MB=0.5" in refused["reason"], refused
    answers = {}
    for i in range(24):
        r = predict(big.url, blobs[i % 8], headers={"X-User": f"user-{i}"})
        assert r.status_code == 200, r.text
        answers[f"user-{i}"] = r.json()[0]
    arms = {(a["arm"], a["model_version"]) for a in answers.values()}
    assert arms == {("production", "va"), ("canary", "vb")}, arms
    again = predict(big.url, blobs[0], headers={"X-User": "user-3"}).json()[0]
    assert again["arm"] == answers["user-3"]["arm"]  # sticky
    assert all(a["prediction_id"].split(".")[0].endswith("~canary") for a in answers.values() if a["arm"] == "canary")
    canary_id = next(a["prediction_id"] for a in answers.values() if a["arm"] == "canary")
    r = httpx.post(small.url + "/feedback", json={"prediction_id": canary_id, "label": "cat"}, timeout=30)
    assert r.status_code == 200, r.text  # labels of the canary's answers, on any instance of the fleet
    assert {predict(small.url, blobs[1], headers={"X-User": k}).json()[0]["arm"] for k in answers} == {"production"}
    assert big.metric("vit_arm_requests_total", arm="canary", result="ok") >= 1
    assert big.metric("vit_canary_loaded") == 1 and small.metric("vit_canary_loaded") == 0
    assert small.metric("vit_canary_loads_total", result="refused") >= 1
    assert big.metric("vit_arm_request_duration_seconds_count", arm="production") >= 1
    rec = telemetry(store, arm="canary")
    assert set(rec.model_version) == {"vb"} and rec.latency_ms.notna().all() and rec.error.isna().all()


def test_shadow(fleet, store, blobs):
    "In shadow, production answers everything; the canary's answers are recorded with production's ids."
    big, _ = fleet
    start_canary(store, "vb", 100, shadow=True, by="test")
    follows(big, mode="shadow", state="serving", percent=100.0)
    answers = [a for b in blobs[:4] for a in predict(big.url, b, headers={"X-Request-ID": "shadowed"}).json()]
    assert {(a["arm"], a["model_version"]) for a in answers} == {("production", "va")}
    ids = {a["prediction_id"] for a in answers}
    shadow = telemetry(store, 4, arm="shadow", request_id="shadowed")
    assert set(shadow.prediction_id) == ids and set(shadow.model_version) == {"vb"}
    assert big.metric("vit_arm_requests_total", arm="shadow", result="ok") >= 1


def test_a_canary_that_fails_to_load_and_the_end(fleet, store, blobs):
    """A canary that does not load: the instance says so in /readyz and /metrics and production answers; ended in the
    registry, every instance drops it without a restart. The admin surface stays behind the token."""
    big, small = fleet
    end_canary(store, "stopped", {"why": "test"}, by="test")
    follows(big, state="none")
    start_canary(store, "vbroken", 50, by="test")
    failed = follows(big, version="vbroken", state="failed")
    assert "vbroken did not load" in failed["reason"], failed
    assert big.metric("vit_canary_loads_total", result="failed") >= 1
    assert 'state="failed"' in httpx.get(big.url + "/metrics").text
    for i in range(6):
        r = predict(big.url, blobs[i])
        assert r.status_code == 200 and r.json()[0]["arm"] == "production", r.text
    assert httpx.get(big.url + "/readyz").status_code == 200
    end_canary(store, "rolled_back", {"why": "test"}, by="test")
    for p in fleet:
        assert follows(p, state="none", version=None)["reason"].startswith("the canary of vbroken ended")
    for path in ("/admin/update-model", "/admin/update-monitoring"):
        assert httpx.post(big.url + path, json={"version": "vb"}).status_code == 401
    assert httpx.post(big.url + "/admin/update-model", headers=ADMIN).status_code == 200
    assert "Canary" in httpx.get(big.url + "/monitoring").text  # the plan has ended: its last numbers stay


def test_a_failing_canary_forward_falls_back(tiny_packages, tmp_path, blobs):
    "A canary whose forward pass fails: an error record (arm canary), and production answers the request."

    def fail(pixels):
        raise RuntimeError("out of memory")

    async def run():
        cfg = ServeConfig(store=str(tmp_path), engine="torch-fp32", threads=1, telemetry_flush_s=3600)
        svc = Service(cfg, model=load_package(tiny_packages["a"]))
        svc.start()
        broken = svc.make_served(load_package(tiny_packages["b"]), "vb")
        broken.forward = fail
        svc.canary = CanarySlot("canary", "vb", "split", 100.0, state="serving", served=broken)
        answers = await svc.predict([Upload(blobs[0]), Upload(blobs[1])], "req-1")
        svc.stop()
        return svc, answers

    svc, answers = asyncio.run(run())
    assert [(a["arm"], a["model_version"]) for a in answers] == [("production", svc.served.version)] * 2
    t = read_telemetry(str(tmp_path))
    errors = t[t.error.notna()]
    assert list(errors.arm) == ["canary"] * 2 and set(errors.error) == {"RuntimeError: out of memory"}
    assert (t[t.error.isna()].arm == "production").sum() == 2
    m = svc.metrics.arm_requests
    assert m.labels("canary", "error")._value.get() == 1 and m.labels("production", "fallback")._value.get() == 1
