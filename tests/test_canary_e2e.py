"""A canary decided by live evidence, end to end: two real `vit-serve` instances on one store (a local folder and
the GCS emulator), simulated users who label what they get, and `vit-models canary watch` running on its own.

A worse candidate, given half of the traffic, is rolled back; a better one, shadowing all of it, is promoted; the
fleet follows both decisions by its poll, and every request is answered throughout. The test prints how many labels
each decision took: the real run beside the simulation of `bench/bench_canary.py`."""

import threading, time
from concurrent.futures import ThreadPoolExecutor

import httpx, pytest, torch

from devtools import wait_for
from test_serve import TOKEN, png, predict
from vit_nbdev.cli import models_main
from vit_nbdev.config import shipped_checkpoint
from vit_nbdev.data import load_cifar10
from vit_nbdev.model import load_package, save_package
from vit_nbdev.store import open_store

POLICY = """\
min_requests: 50
min_labels: 60
max_labels: 3000
margin: 0.02
alpha: 0.05
n_opt: 300
"""
BATCH = 4  # images per request
MAX_LABELS = 3000  # the simulated users stop here, decided or not


def noisy_package(dst, noise: float, seed: int = 0):
    "The shipped checkpoint with Gaussian noise (`noise` × each tensor's std) added to its weights: a worse model."
    pkg = load_package(shipped_checkpoint("vit-cifar-small-cifar10"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pkg.model.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    return save_package(pkg.model, pkg.preprocess, dst, card={"note": f"shipped checkpoint + noise {noise}"})


@pytest.fixture(scope="module")
def graded(tmp_path_factory, tiny_packages) -> dict:
    """Three real models of known order on the sample's test split: `production` (the shipped checkpoint, noised:
    about 62%), `worse` (random weights: about 10%) and `better` (the shipped checkpoint: about 76%)."""
    root = tmp_path_factory.mktemp("graded")
    better = load_package(shipped_checkpoint("vit-cifar-small-cifar10"))
    return dict(
        production=noisy_package(root / "production", 0.7),
        worse=tiny_packages["a"],
        better=save_package(better.model, better.preprocess, root / "better", card={"note": "shipped checkpoint"}),
    )


@pytest.fixture(scope="module")
def sample():
    d = load_cifar10(progress=False)
    return [png(x) for x in d.test.images], [d.label_names[int(y)] for y in d.test.labels]


def users(fleet, sample, stop: threading.Event, seen: list) -> None:
    """Simulated users: predict on one instance, then label every answer with the true class on the other.
    Each response goes to `seen` as (route, status); they stop at `stop` or after `MAX_LABELS` labels."""
    blobs, truth = sample
    labelled, i = 0, 0
    with httpx.Client(timeout=60) as h:
        while not stop.is_set() and labelled < MAX_LABELS:
            a, b = fleet[i % 2], fleet[(i + 1) % 2]
            idx = [(i * BATCH + k) % len(blobs) for k in range(BATCH)]
            r = predict(a.url, *(blobs[j] for j in idx), client=h)
            seen.append(("predict", r.status_code))
            if r.status_code == 200:
                answers = zip(r.json(), idx, strict=True)
                body = [{"prediction_id": x["prediction_id"], "label": truth[j]} for x, j in answers]
                f = h.post(b.url + "/feedback", json=body)
                seen.append(("feedback", f.status_code))
                labelled += len(body) if f.status_code == 200 else 0
            i += 1


def decided(uri: str, policy_file, fleet, sample, timeout: float = 300) -> tuple[int, int, float]:
    "Run `vit-models canary watch` and the users together until it decides: (exit status, labels given, seconds)."
    seen, stop, t0 = [], threading.Event(), time.monotonic()
    argv = ["canary", "watch", "--store", uri, "--policy", str(policy_file), "--interval", "1"]
    with ThreadPoolExecutor(2) as ex:
        load = ex.submit(users, fleet, sample, stop, seen)
        watch = ex.submit(models_main, argv)
        try:
            code = watch.result(timeout)
        finally:
            stop.set()
            load.result()
    bad = [x for x in seen if x[1] != 200]
    assert not bad, f"requests not answered: {bad[:5]} of {len(seen)}"
    return code, sum(1 for route, _ in seen if route == "feedback") * BATCH, time.monotonic() - t0


def canary_state(p) -> str | None:
    try:
        return (httpx.get(p.url + "/readyz", timeout=10).json().get("canary") or {}).get("state")
    except httpx.TransportError:
        return None


def test_the_fleet_rolls_back_a_worse_canary_and_promotes_a_better_one(
    store_uri, serve_process, graded, sample, tmp_path
):
    st = open_store(store_uri)
    for v, pkg in graded.items():
        st.register(pkg, f"v-{v}", aliases=[])
    st.set_alias("production", "v-production")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = dict(
        VIT_MODEL="production",
        VIT_MODEL_POLL_S=0.5,
        VIT_ADMIN_TOKEN=TOKEN,
        VIT_TELEMETRY_FLUSH_S=0.5,
        VIT_KEEP_IMAGES=0,
        VIT_MAX_WAIT_MS=3,
    )
    fleet = [serve_process(store_uri, **env) for _ in range(2)]
    assert [p.wait_ready()["model_version"] for p in fleet] == ["v-production"] * 2

    # A worse candidate takes half of the requests: the watch rolls it back, the fleet drops it.
    assert models_main(["canary", "v-worse", "--percent", "50", "--store", store_uri]) == 0
    wait_for(lambda: all(canary_state(p) == "serving" for p in fleet), 120, "both instances serving the canary")
    code, worse_labels, worse_s = decided(store_uri, policy, fleet, sample)
    doc = st.alias_doc("canary")
    assert code == 1 and doc["traffic"]["state"] == "rolled_back", doc["log"][-1]
    assert st.resolve("production") == "v-production"
    assert doc["log"][-1]["how"] == "canary-rolled-back" and doc["log"][-1]["evidence"]["comparison"]["verdict"]
    wait_for(lambda: all(canary_state(p) != "serving" for p in fleet), 60, "the fleet dropping the canary")

    # A better candidate shadows every request: the watch promotes it, the fleet follows production.
    assert models_main(["canary", "v-better", "--percent", "100", "--shadow", "--store", store_uri]) == 0
    wait_for(lambda: all(canary_state(p) == "serving" for p in fleet), 120, "both instances shadowing")
    code, better_labels, better_s = decided(store_uri, policy, fleet, sample)
    assert code == 0 and st.resolve("production") == "v-better", st.alias_doc("canary")["log"][-1]
    move = st.alias_doc("production")["log"][-1]
    assert move["how"] == "canary-promote" and move["previous"] == "v-production"
    ready = lambda: all(httpx.get(p.url + "/readyz", timeout=10).json()["model_version"] == "v-better" for p in fleet)
    wait_for(ready, 60, "the fleet serving the promoted version")
    assert all(p.metric("vit_arm_requests_total", arm="shadow") > 0 for p in fleet)
    assert httpx.get(fleet[0].url + "/admin/update-reference-data", timeout=10).status_code in (401, 405)
    assert httpx.post(fleet[0].url + "/admin/update-model", json={}, timeout=10).status_code == 401
    backend = "GCS emulator" if store_uri.startswith("gs://") else "local store"
    print(
        f"\n{backend}, 2 instances: worse canary (50% split) rolled back after {worse_labels} labels "
        f"({worse_s:.0f} s); better canary (shadow) promoted after {better_labels} labels ({better_s:.0f} s); "
        "every request answered"
    )
