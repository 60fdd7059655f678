"""The canary's control plane on a local store, without models: the plan and its refusals, racing starts, the status
computed from telemetry and feedback records written here, each branch of `decide`, `watch_step` moving the aliases,
and `vit-models canary`'s exit codes."""

import json, subprocess, sys, threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from devtools import in_process
from vit_nbdev.canary import (
    CanaryPlan,
    CanaryRunning,
    Policy,
    canary_status,
    decide,
    end_canary,
    format_status,
    live_accuracy_curve,
    load_policy,
    read_plan,
    start_canary,
    watch_step,
)
from vit_nbdev.cli import models_main
from vit_nbdev.store import Conflict, NotFound, open_store
from vit_nbdev.telemetry import PredictionIds, feedback_records, records_to_parquet, telemetry_key

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
LABELS = [f"class{i}" for i in range(10)]
IDS = PredictionIds(b"the tests' shared key")


@pytest.fixture
def st(tmp_path):
    "A store with three complete versions (no models: the plan only needs versions), production at v1."
    s = open_store(tmp_path / "store")
    for v in ("v1", "v2", "v3"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "card.json").write_text("{}")
        s.register(tmp_path / v, v, aliases=["production"] if v == "v1" else [])
    (tmp_path / "half").mkdir()
    s.put_bytes("models/v-half/card.json", b"{}")  # files but no completion marker: an interrupted upload
    return s


def run_main(*args) -> tuple[int, str, str]:
    "`vit-models ARGS` in this process: (exit status, stdout, stderr)."
    return in_process(models_main, *args)


def traffic(st, plan: CanaryPlan, n: int, acc: dict, *, errors=0.0, latency=None, seed=0) -> None:
    """Write `n` requests' telemetry and labels as a fleet under `plan` would: accuracy `acc[arm]` per arm, a share
    `errors` of the canary's requests failed, `latency[arm]` ms (default 20 for every arm)."""
    rng, now, tel, items = np.random.default_rng(seed), datetime.now(UTC), [], []
    for i in range(n):
        t, share = now + timedelta(microseconds=i), rng.random() < plan.percent / 100
        truth = int(rng.integers(10))
        arms = ["production"] + (["shadow"] if plan.shadow and share else [])
        if share and not plan.shadow:
            arms = ["canary"]
        pid = None
        for arm in arms:
            v = plan.baseline if arm == "production" else plan.version
            pred = truth if rng.random() < acc[arm] else (truth + 1) % 10
            failed = arm == "canary" and rng.random() < errors
            pid = pid or IDS.new(v, pred, False, t, arm=arm)
            ms = (latency or {}).get(arm, 20.0)
            rec = dict(time=t, request_id=f"r{i}", item=0, instance="i", model_version=v, arm=arm, latency_ms=ms)
            tel.append(dict(rec, label=LABELS[pred], prediction_id=pid, error="boom" if failed else None))
        items.append(dict(prediction_id=pid, label=LABELS[truth]))
    for v in {r["model_version"] for r in tel}:
        key = telemetry_key(v, f"{now:%Y-%m-%d}", "i", seed)
        st.put_bytes(key, records_to_parquet([r for r in tel if r["model_version"] == v]))
    fb = feedback_records(items, IDS, lambda v: LABELS, instance="i")
    st.put_bytes(
        telemetry_key(plan.baseline, f"{now:%Y-%m-%d}", "i", seed, "feedback"), records_to_parquet(fb, "feedback")
    )


def test_a_plan_starts_changes_its_share_and_ends_with_its_evidence_in_the_log(st):
    plan = start_canary(st, "v2", 10, sticky_header="X-Client", by="ana")
    assert (plan.version, plan.baseline, plan.percent, plan.sticky_header, plan.active) == (
        "v2",
        "v1",
        10,
        "X-Client",
        True,
    )
    assert start_canary(st, "v2", 30, by="ana").started == plan.started  # the same canary: a new share only
    assert read_plan(st).percent == 30 and st.aliases() == {"canary": "v2", "production": "v1"}
    out = end_canary(st, "promoted", {"reason": "a test", "n": np.int64(3)}, by="ana")
    assert out["moved"] == ["production", "v1", "v2"] and st.aliases()["production"] == "v2"
    assert read_plan(st).state == "promoted"
    prod = st.alias_doc("production")["log"][-1]
    assert (prod["how"], prod["evidence"]) == ("canary-promote", {"reason": "a test", "n": 3})
    assert [e["how"] for e in st.alias_doc("canary")["log"]] == ["canary-start", "canary-share", "canary-promoted"]


def test_refusals(st):
    for bad in (0, -5, 100.01, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            start_canary(st, "v2", bad)
    with pytest.raises(ValueError, match="what 'production' serves"):
        start_canary(st, "v1", 10)
    with pytest.raises(NotFound, match="Versions: v1, v2, v3"):
        start_canary(st, "v9", 10)
    with pytest.raises(NotFound, match="incomplete"):
        start_canary(st, "v-half", 10)
    start_canary(st, "v2", 10)
    with pytest.raises(CanaryRunning, match="canary stop"):
        start_canary(st, "v3", 10)
    end_canary(st, "rolled_back", {"reason": "a test"})
    assert st.aliases()["production"] == "v1" and read_plan(st).state == "rolled_back"
    with pytest.raises(ValueError, match="no canary is running"):
        end_canary(st, "stopped", {})
    assert start_canary(st, "v3", 10).version == "v3"  # an ended canary does not block the next


def test_a_promotion_after_production_moved_is_a_conflict_and_changes_nothing(st):
    start_canary(st, "v2", 10)
    st.set_alias("production", "v3")
    with pytest.raises(Conflict):
        end_canary(st, "promoted", {})
    assert st.aliases()["production"] == "v3" and read_plan(st).active


@pytest.mark.parametrize("ended", [False, True])
@pytest.mark.parametrize("pair", [("v2", "v3"), ("v3", "v2"), ("v2", "v2x")])
def test_two_racing_starts_one_wins_the_other_gets_a_conflict(st, pair, ended, monkeypatch):
    """Both read the plan before either writes (a barrier in `set_alias`): the atomic write decides, also when the
    last canary, now ended, was one of the two versions (the alias's version alone would not tell them apart)."""
    if ended:
        start_canary(st, "v2", 10)
        end_canary(st, "stopped", {})
    go, got, real = threading.Barrier(2), {}, type(st).set_alias
    versions = [p.rstrip("x") for p in pair]

    def slow_set_alias(self, alias, *a, **kw):
        if alias == "canary":
            go.wait(timeout=10)
        return real(self, alias, *a, **kw)

    monkeypatch.setattr(type(st), "set_alias", slow_set_alias)

    def start(key, v):
        try:
            got[key] = start_canary(st, v, 10).version
        except (Conflict, CanaryRunning) as e:
            got[key] = type(e).__name__

    threads = [threading.Thread(target=start, args=(k, v)) for k, v in zip(pair, versions, strict=True)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got.values(), key=str) == sorted(["Conflict", read_plan(st).version])


def traffic_plan(st, shadow=False, percent=50):
    return start_canary(st, "v2", percent, shadow=shadow)


def test_status_counts_each_arm_from_the_records(st):
    plan = traffic_plan(st)
    traffic(st, plan, 400, {"production": 0.8, "canary": 0.5}, errors=0.1, latency={"canary": 40.0})
    s = canary_status(st, drift=False)
    prod, can = s["arms"]["production"], s["arms"]["canary"]
    assert prod["requests"] + can["requests"] == 400 and 150 < can["requests"] < 250
    assert 0.03 < can["error_rate"] < 0.2 and prod["errors"] == 0
    assert (can["p50_ms"], can["p99_ms"], prod["p99_ms"]) == (40.0, 40.0, 20.0)
    assert prod["labels"] == prod["requests"] and can["labels"] == can["requests"]
    assert prod["low"] < prod["accuracy"] < prod["high"] and abs(prod["accuracy"] - 0.8) < 0.1
    assert s["comparison"]["method"] == "asympcs-split" and s["comparison"]["difference"] < 0
    assert "canary v2 (active): a split of 50% of production (v1)" in format_status(s)
    curve = live_accuracy_curve(st, points=5)
    assert set(curve.arm) == {"production", "canary"} and (curve.groupby("arm").labels.max() > 100).all()
    json.dumps(s)  # the status is plain JSON


def test_shadow_status_pairs_the_arms_by_prediction_id(st):
    plan = traffic_plan(st, shadow=True, percent=100)
    traffic(st, plan, 300, {"production": 0.7, "shadow": 0.7})
    s = canary_status(st, drift=False)
    sh = s["arms"]["shadow"]
    assert set(s["arms"]) == {"production", "shadow"} and sh["requests"] == sh["labels"] == 300
    assert 0.35 < sh["agreement"] < 0.75  # each arm right 70% of the time, independently: agree ~0.49 + 0.09
    assert s["comparison"]["method"] == "asympcs-paired" and s["comparison"]["labels"] == 300


def status(arm=None, prod=None, comparison=None, shadow=False) -> dict:
    "A made-up status for `decide`."
    base = dict(requests=1000, error_rate=0.0, p99_ms=20.0, labels=1000)
    plan = dict(state="active", shadow=shadow, version="v2", alias="production", baseline="v1")
    c = dict(method="m", labels=1000, difference=0.0, low=-0.01, high=0.01, verdict="non_inferior")
    c.update(comparison or {})
    arms = {"production": {**base, **(prod or {})}, "shadow" if shadow else "canary": {**base, **(arm or {})}}
    return dict(plan=plan, arms=arms, comparison=c)


@pytest.mark.parametrize(
    "arm, comparison, action, reason",
    [
        ({"error_rate": 0.05}, {}, "rollback", "error rate 5.0% > 2%"),
        ({"p99_ms": 31.0}, {}, "rollback", "p99 latency 31 ms > 1.5 x"),
        ({"error_rate": 0.5, "requests": 49}, {"verdict": "undecided"}, "wait", "undecided"),  # too few to judge
        ({"labels": 199}, {}, "wait", "199 of 200 labels"),
        ({}, {}, "promote", "not worse by 2 points"),
        ({}, {"verdict": "worse", "high": -0.03}, "rollback", "worse by more than 2 points"),
        ({"labels": 4999}, {"verdict": "undecided"}, "wait", "undecided"),
        ({"labels": 5000}, {"verdict": "undecided"}, "rollback", "still undecided after 5000 labels"),
    ],
)
def test_decide_on_each_branch(arm, comparison, action, reason):
    d = decide(status(arm, comparison=comparison), Policy())
    assert d["action"] == action and reason in d["reason"]
    assert d["evidence"]["policy"] == Policy().__dict__


def test_decide_without_a_running_canary():
    assert decide(dict(plan=None, arms={}, comparison=None))["action"] == "none"


def test_watch_step_rolls_back_a_worse_canary_and_promotes_a_better_one(st):
    traffic(st, traffic_plan(st), 1200, {"production": 0.8, "canary": 0.4}, seed=1)
    d = watch_step(st, Policy(min_labels=100), by="test")
    assert d["action"] == "rollback" and d["ended"]["moved"] is None and st.aliases()["production"] == "v1"
    assert st.alias_doc("canary")["log"][-1]["evidence"]["comparison"]["verdict"] == "worse"
    traffic(st, traffic_plan(st, shadow=True, percent=100), 600, {"production": 0.5, "shadow": 0.9}, seed=2)
    assert watch_step(st, Policy(min_labels=100))["action"] == "promote" and st.aliases()["production"] == "v2"
    assert watch_step(st)["action"] == "none"


def test_policy_file(tmp_path):
    assert load_policy(ROOT / "configs" / "canary-policy.yaml") == Policy() == load_policy(None)
    (tmp_path / "p.yaml").write_text("margin: 0.01\nmin_labels: 50\n")
    assert load_policy(tmp_path / "p.yaml") == Policy(margin=0.01, min_labels=50)
    (tmp_path / "typo.yaml").write_text("min_label: 50\n")
    with pytest.raises(ValueError, match="unknown field.*min_label.*the fields are min_requests"):
        load_policy(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="alpha"):
        Policy(alpha=0.9)


def test_cli_exit_codes(st, tmp_path):
    uri = st.uri
    assert run_main("canary", "v2", "--percent", "0", "--store", uri)[0] == 2  # argparse: a usage error
    assert run_main("canary", "v2", "--store", uri)[0] == 2  # no --percent
    code, _, err = run_main("canary", "v1", "--percent", "10", "--store", uri)
    assert code == 2 and "what 'production' serves" in err
    code, _, err = run_main("canary", "v9", "--percent", "10", "--store", uri)
    assert code == 2 and "Versions: v1, v2, v3" in err
    code, out, _ = run_main("canary", "v2", "--percent", "10", "--shadow", "--store", uri)
    assert code == 0 and "canary v2: a copy of 10% of production (v1)" in out
    code, _, err = run_main("canary", "v3", "--percent", "10", "--store", uri)
    assert code == 3 and "conflict" in err and "canary stop" in err
    code, out, _ = run_main("canary", "status", "--json", "--store", uri)
    assert code == 0 and json.loads(out)["plan"]["version"] == "v2"
    (tmp_path / "p.yaml").write_text("min_labels: 1\n")
    code, out, _ = run_main("canary", "watch", "--once", "--policy", str(tmp_path / "p.yaml"), "--store", uri)
    assert code == 0 and out.startswith("wait:")
    code, out, _ = run_main("canary", "stop", "--store", uri)
    assert code == 0 and "production stays at v1" in out and read_plan(st).state == "stopped"
    assert run_main("canary", "stop", "--store", uri)[0] == 2


def test_the_installed_command(st):
    r = subprocess.run(
        [str(BIN / "vit-models"), "canary", "status", "--store", st.uri], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.startswith("no canary"), r.stderr
