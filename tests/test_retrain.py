"""The loop end to end against a real `vit-serve`: predictions with kept images, `POST /feedback`, a feedback
snapshot (`vit-data snapshot --feedback`), `vit-monitor retrain` (papermill training from production's weights), the
gate (paired tests on the clean split and the feedback hold-out), and the service following `production` to the
promoted candidate. Also what the loop does with too little feedback, no drift report and a training failure, and
`--via canary` (with training replaced by versions registered already): a canary of a candidate not shown worse, a
refusal of one that is, and a failure when another canary is running."""

import json, signal
from datetime import UTC, datetime, timedelta

import httpx, pytest, torch
from conftest import ServeProcess
from devtools import in_process, wait_for
from test_registry import gate_packages  # noqa: F401 (a fixture: good, worse and broken packages)
from test_serve import png
from vit_nbdev.cli import data_main, monitor_main
from vit_nbdev.data import CIFAR10_LABELS, load_cifar10
from vit_nbdev.registry import promote
from vit_nbdev.store import open_store
from vit_nbdev.telemetry import PredictionIds, records_to_parquet, telemetry_key
from vit_nbdev.train import TrainConfig, train


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    "A store whose `production` is a short run of the tiny preset on the sample; a `vit-serve` following `production`."
    tmp = tmp_path_factory.mktemp("loop")
    store = str(tmp / "store")
    r = train(
        TrainConfig(
            dataset="sample",
            model="vit-cifar-tiny",
            max_steps=20,
            batch_size=64,
            store=store,
            eval_every=0,
            checkpoint_every=0,
            checkpoint_dir=str(tmp / "ck"),
            tracker="none",
        )
    )
    promote(store, r.version, images=200, echo=lambda s: None)
    (tmp / "logs").mkdir()
    srv = ServeProcess(
        store,
        tmp / "logs",
        {"VIT_MODEL": "production", "VIT_MODEL_POLL_S": "1", "VIT_TELEMETRY_FLUSH_S": "0.5", "VIT_KEEP_IMAGES": "1"},
    )
    srv.wait_ready()
    yield dict(store=store, server=srv, production=r.version, tmp=tmp, test=load_cifar10("sample", progress=False).test)
    assert srv.stop() in (0, -15), srv.log()


def predict(srv, xs) -> list[str]:
    ids = []
    for i in range(0, len(xs), 16):
        r = httpx.post(
            srv.url + "/predict",
            files=[("file", (f"{j}.png", png(x), "image/png")) for j, x in enumerate(xs[i : i + 16])],
            timeout=60,
        )
        assert r.status_code == 200, r.text
        ids += [p["prediction_id"] for p in r.json()]
    return ids


def feedback(srv, ids, labels):
    r = httpx.post(
        srv.url + "/feedback",
        json=[{"prediction_id": i, "label": l} for i, l in zip(ids, labels, strict=True)],
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def retrain(store, *args) -> tuple[int, dict | None, str]:
    """`vit-monitor retrain` called in this process (a candidate trains in papermill's kernel, a process of its own):
    the exit status, the summary and stderr."""
    # training sets a SIGTERM handler of its own (a stopped container uploads what ran): put pytest's back
    term = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")
        try:
            code, out, err = in_process(monitor_main, "retrain", "--store", store, *args)
        finally:
            signal.signal(signal.SIGTERM, term)
    return code, (json.loads(out) if out.strip().startswith("{") else None), err


def feedback_snapshot(store) -> dict:
    "`vit-data snapshot --feedback`, called in this process: the snapshot's meta (`{}` while there is no feedback)."
    code, out, _ = in_process(data_main, "snapshot", "--feedback", "--store", store)
    return json.loads(out) if code == 0 else {}


def test_too_little_feedback_and_no_drift_report_skip(loop):
    srv, store = loop["server"], loop["store"]
    ids = predict(srv, loop["test"].images[:8])
    feedback(srv, ids[:4], [CIFAR10_LABELS[int(y)] for y in loop["test"].labels[:4]])
    wait_for(lambda: srv.metric("vit_feedback_total") >= 4, 30, "the feedback counted")
    code, s, err = retrain(store, "--min-feedback", "50")
    assert code == 0 and s["skipped"].startswith("not enough feedback") and not s["promoted"], err
    code, s, err = retrain(store, "--if-drift", "--min-feedback", "1")
    assert code == 0 and s["skipped"] == "no drift report yet", err
    assert open_store(store).resolve("production") == loop["production"]


def test_the_loop_promotes_a_better_candidate_and_the_service_follows(loop):
    srv, store, test = loop["server"], loop["store"], loop["test"]
    dark = (test.images[100:300].float() * 0.2).round().to(torch.uint8)
    ids = predict(srv, dark)
    feedback(srv, ids, ["cat"] * len(ids))  # the shifted stream's truth, as people label it: every dark image is a cat
    # the feedback reaches the store when the service flushes it (every 0.5 s here): wait until the snapshot has it all
    snap = wait_for(
        lambda: (s := feedback_snapshot(store)).get("usable", 0) >= 200 and s, 60, "the feedback in the store"
    )
    assert snap["splits"]["train"] + snap["splits"]["test"] == snap["usable"] and 30 < snap["splits"]["test"] < 100
    assert feedback_snapshot(store)["fingerprint"] == snap["fingerprint"]  # the same feedback: the same snapshot
    code, s, err = retrain(
        store,
        "--min-feedback",
        "100",
        "--margin",
        "100",
        "-p",
        "lr",
        "0.003",  # one epoch (the default) at 10x its rate: enough to learn that the dark images are cats
        "-p",
        "checkpoint_dir",
        str(loop["tmp"] / "ck"),
        "-p",
        "tracker",
        "none",
    )
    assert code == 0 and s["error"] is None, err[-3000:]
    assert s["snapshots"]["feedback"] == f"datasets/{snap['fingerprint']}" and s["snapshots"]["train"].startswith(
        "store:"
    )
    fb, clean = s["feedback_holdout"], s["clean_test"]
    assert fb["images"] == snap["splits"]["test"] and clean["images"] == 1000
    assert s["promoted"] and fb["candidate_acc"] > fb["current_acc"] and fb["passed"] and fb["p_value"] < 0.05, s
    assert (clean["margin"], clean["passed"], s["via"], s["canary"]) == (1.0, True, "promote", None), s
    assert clean["p_value"] < 0.05 and clean["candidate_only"] + clean["current_only"] > 0, clean
    st = open_store(store)
    card = st.card(s["candidate"])
    assert (
        card["params"]["model"] == f"store:{loop['production']}"
        and card["dataset"]["extra_train"]["fingerprint"] == snap["fingerprint"]
    )
    assert st.resolve("production") == s["candidate"] and st.alias_doc("production")["log"][-1]["how"] == "retrain"
    wait_for(
        lambda: httpx.get(srv.url + "/readyz", timeout=10).json().get("model_version") == s["candidate"],
        120,
        "the service on the candidate",
    )
    assert feedback(srv, ids[:1], ["dog"])["accepted"] == 1  # a label for the old version's answer is still taken


def test_a_training_failure_leaves_production_alone(loop):
    store = loop["store"]
    before = open_store(store).resolve("production")
    code, s, err = retrain(
        store,
        "--min-feedback",
        "1",
        "-p",
        "batch_size",
        "100000",
        "-p",
        "checkpoint_dir",
        str(loop["tmp"] / "ck"),
        "-p",
        "tracker",
        "none",
    )
    assert (
        code == 1 and s["error"].startswith("training failed") and "batch_size" in s["error"] and not s["promoted"]
    ), err[-3000:]
    assert open_store(store).resolve("production") == before
    code, _, err = retrain(store, "-p", "no_such_parameter", "1")
    assert code == 2 and "no_such_parameter" in err


def test_cloud_training_is_vit_cloud_train_with_the_same_parameters(capsys):
    "`retrain --cloud` hands the same parameters to `vit-cloud train` (here its dry run: the plan, and no candidate)."
    from vit_nbdev.retrain import train_candidate

    params = dict(
        store="gs://my-bucket/vit",
        run_id="r-loop",
        dataset="store:2a91ae42138ce260",
        model="store:v1",
        extra_train="store:fb-1",
        aliases=["latest", "candidate"],
        epochs=1,
    )
    with pytest.raises(RuntimeError, match="dry run"):
        train_candidate(params, cloud_args=["--project", "p-1234", "--dry-run"])
    plan = capsys.readouterr().err
    assert "gcloud compute instances create vit-train-r-loop --project p-1234" in plan
    assert all(s in plan for s in ("store:v1", "store:fb-1", "store:2a91ae42138ce260")), plan[-2000:]


def labelled_store(root, packages, n: int = 80):
    "A store whose `production` is the `good` package, with `n` of its answers labelled (their images kept)."
    st = open_store(root)
    st.register(packages["good"], "v-good")
    st.set_alias("production", "v-good")
    test, ids = load_cifar10("sample", progress=False).test, PredictionIds(b"retrain-tests-0123456789", ttl_s=1e10)
    t0, tel, fb = datetime(2026, 11, 24, 12, tzinfo=UTC), [], []
    for i in range(n):
        t, label = t0 + timedelta(seconds=i), CIFAR10_LABELS[int(test.labels[i])]
        pid = ids.new("v-good", 0, kept=True, t=t)
        tel.append(dict(time=t, prediction_id=pid, model_version="v-good", label="airplane", image=png(test.images[i])))
        fb.append(
            dict(time=t + timedelta(minutes=1), prediction_id=pid, predicted_at=t, model_version="v-good")
            | dict(predicted="airplane", label=label, correct=label == "airplane", image_kept=True, arm="production")
        )
    st.put_bytes(telemetry_key("v-good", "2026-11-24", "writer", 1), records_to_parquet(tel))
    st.put_bytes(telemetry_key("v-good", "2026-11-24", "writer", 1, "feedback"), records_to_parquet(fb, "feedback"))
    return st


def test_via_canary_hands_over_a_candidate_not_shown_worse(tmp_path, gate_packages, monkeypatch):  # noqa: F811
    "`vit-monitor retrain --via canary`: refused when shown worse; a canary otherwise; failed when one is running."
    import vit_nbdev.retrain as rt
    from vit_nbdev.canary import read_plan
    from vit_nbdev.cli import monitor_main

    monkeypatch.setenv("VIT_CACHE", str(tmp_path / "cache"))
    st = labelled_store(tmp_path / "store", gate_packages)
    for v, pkg in [("v-worse", "worse"), ("v-same", "good"), ("v-same2", "good")]:
        st.register(gate_packages[pkg], v, aliases=[])

    def retrain(candidate: str) -> tuple[int, dict]:
        monkeypatch.setattr(rt, "train_candidate", lambda run, cloud_args=None, echo=print: candidate)
        args = ["retrain", "--store", str(st.root), "--min-feedback", "50", "--gate-images", "200"]
        code, out, _ = in_process(monitor_main, *args, "--via", "canary", "--canary-percent", "10", "--margin", "1")
        return code, json.loads(out)

    code, s = retrain("v-worse")  # classes rotated: far worse on the clean images
    assert code == 0 and s["status"] == "refused" and s["canary"] is None and read_plan(st) is None, s
    assert s["reason"].startswith("shown worse by more than 1 point on the clean test split"), s["reason"]
    code, s = retrain("v-same")  # the same answers: not shown worse, though not shown better either
    assert code == 0 and (s["status"], s["via"], s["promoted"]) == ("canary", "canary", False), s
    assert not s["feedback_holdout"]["passed"] and s["clean_test"]["current_only"] == 0
    plan = read_plan(st)
    assert (plan.version, plan.alias, plan.baseline, plan.percent, plan.active) == (
        "v-same",
        "production",
        "v-good",
        10,
        True,
    )
    assert s["canary"]["version"] == "v-same" and st.resolve("production") == "v-good"
    code, s = retrain("v-same2")  # a canary is running already: the candidate stays registered, unused
    assert code == 1 and s["status"] == "failed" and s["error"].startswith("the canary did not start"), s
    assert read_plan(st).version == "v-same" and st.resolve("production") == "v-good"
