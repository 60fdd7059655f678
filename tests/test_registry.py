"""`vit-models` end to end, on a local store and on the GCS emulator: the registry as a table and cards, the gated
promotion (a worse candidate refused by the paired test with both accuracies, its p-value, margin and alpha, --force
on the record, a broken or incomplete version refused, production untouched), rollback, and racing promotions: one
wins, the other gets a conflict."""

import fcntl, json, shutil, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest, torch
import torch.nn.functional as F

from devtools import in_process
from vit_nbdev.cli import models_main
from vit_nbdev.registry import promote
from vit_nbdev.store import Conflict, open_store

BIN = Path(sys.executable).parent
IMAGES = "200"  # the gate on the first 200 images of the bundled test split: enough to tell these models apart


@pytest.fixture(scope="module", autouse=True)
def vit_cache(tmp_path_factory):
    "One VIT_CACHE (the decoded sample, models fetched from GCS) for this module and the processes it starts."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIT_CACHE", str(tmp_path_factory.mktemp("vit-cache")))
        yield


@pytest.fixture(scope="module")
def gate_packages(tmp_path_factory) -> dict:
    "`good`: random features, a least-squares classifier on 500 images (~30%); `worse`: classes rotated; `broken`."
    from vit_nbdev.data import load_cifar10, preprocess
    from vit_nbdev.model import build_model, forward_features, save_package

    root, data = tmp_path_factory.mktemp("gate-packages"), load_cifar10("sample", progress=False)
    torch.manual_seed(0)
    model, pre = build_model("vit-cifar-tiny")
    model.eval()
    with torch.no_grad():
        emb = forward_features(model, preprocess(data.train.images[:500], pre))[0]
        X, Y = torch.cat([emb, torch.ones(len(emb), 1)], 1), F.one_hot(data.train.labels[:500], 10).float()
        W = torch.linalg.solve(X.T @ X + 1e-2 * torch.eye(X.shape[1]), X.T @ Y)
        model.classifier.weight.copy_(W[:-1].T)
        model.classifier.bias.copy_(W[-1])
        card = lambda acc: dict(
            code_commit="abc123", params={"model": "vit-cifar-tiny"}, dataset=data.info(), metrics={"test_acc": acc}
        )
        out = {"good": save_package(model, pre, root / "good", card(0.3))}
        model.classifier.weight.copy_(model.classifier.weight.roll(1, 0))
        model.classifier.bias.copy_(model.classifier.bias.roll(1))
        out["worse"] = save_package(model, pre, root / "worse", card(0.07))
    shutil.copytree(out["good"], root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"not weights")
    return {**out, "broken": root / "broken"}


@pytest.fixture
def registry(store_uri, gate_packages):
    "A store with `v-good` (latest), `v-worse`, `v-broken` and `v-partial` (files, no completion marker)."
    st = open_store(store_uri, timeout=10)
    st.register(gate_packages["worse"], "v-worse", aliases=[])
    st.register(gate_packages["broken"], "v-broken", aliases=[])
    st.register(gate_packages["good"], "v-good")
    st.put_dir(gate_packages["good"], "models/v-partial")
    return st


def run_main(*args) -> tuple[int, str, str]:
    "`vit-models ARGS` in this process: (exit status, stdout, stderr)."
    return in_process(models_main, *args)


def run_script(*args, cwd=None, **kw) -> subprocess.CompletedProcess:
    "The installed `vit-models ARGS` (the environment's STORAGE_EMULATOR_HOST and VIT_CACHE carry over)."
    return subprocess.run([str(BIN / "vit-models"), *args], capture_output=True, text=True, timeout=300, cwd=cwd, **kw)


def test_list_and_show(registry):
    p = run_script("list", "--store", registry.uri)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["version", "registered", "val_acc", "test_acc", "aliases"], p.stdout
    assert [line.split()[0] for line in lines[1:]] == ["v-broken", "v-good", "v-worse"]  # complete versions only
    assert "30.0%" in lines[2] and lines[2].rstrip().endswith("latest")
    p = run_script("show", "latest", "--store", registry.uri)
    assert (
        p.returncode == 0
        and "version     v-good  (latest)" in p.stdout
        and "fingerprint " in p.stdout
        and "abc123" in p.stdout
    ), p.stdout
    code, out, _ = run_main("show", "v-good", "--json", "--store", registry.uri)
    card = json.loads(out)
    assert (
        code == 0
        and card["metrics"] == {"test_acc": 0.3}
        and card["files"]["model.safetensors"] > 0
        and card["aliases"] == ["latest"]
    )
    for name, what in [("v-nope", "Versions: v-broken, v-good, v-worse"), ("v-partial", "is incomplete")]:
        code, _, err = run_main("show", name, "--store", registry.uri)
        assert code == 2 and what in err, err


def test_promote_is_gated_and_recorded(registry):
    uri, prod = registry.uri, lambda: registry.resolve("production")
    code, out, err = run_main(
        "promote", "latest", "--store", uri, "--images", IMAGES, "--by", "ada"
    )  # the first: creates production
    assert code == 0 and "production does not exist yet" in out and prod() == "v-good", err
    p = run_script("promote", "v-worse", "--store", uri, "--images", IMAGES)  # worse: refused, exit 1
    refused = "v-worse is not shown to be less than 1 point less accurate than production (v-good)"
    assert p.returncode == 1 and refused in p.stderr and "stays at v-good" in p.stderr, p.stderr
    assert "McNemar's exact test" in p.stderr and "p = " in p.stderr and "(alpha 0.05)" in p.stderr, p.stderr
    assert "p = " in p.stdout and "against a 1 point margin (alpha 0.05), refused" in p.stdout, p.stdout
    accs = p.stdout.split("v-worse ")[1].split(",")[0], p.stdout.split("(v-good) ")[1].split(";")[0].strip()
    assert all(a.endswith("%") for a in accs) and all(a in p.stderr for a in accs), (
        p.stdout,
        p.stderr,
    )  # both accuracies, in the refusal too
    assert prod() == "v-good"
    for name, code_, what in [
        ("v-broken", 1, "'v-broken' does not load"),
        ("v-partial", 2, "is incomplete"),
        ("v-nope", 2, "Versions: "),
    ]:
        code, _, err = run_main("promote", name, "--store", uri, "--images", IMAGES)
        assert code == code_ and what in err and prod() == "v-good", (name, err)
    code, out, err = run_main("promote", "v-worse", "--force", "--by", "bob", "--store", uri, "--images", IMAGES)
    assert code == 0 and "FORCED" in out and prod() == "v-worse", err
    last = registry.alias_doc("production")["log"][-1]
    assert (last["how"], last["by"], last["forced"], last["previous"], last["version"]) == (
        "promote",
        "bob",
        True,
        "v-good",
        "v-worse",
    )
    assert (
        last["gate"]["candidate_acc"] < last["gate"]["current_acc"]
        and last["gate"]["images"] == int(IMAGES)
        and last["at"]
    )
    g = last["gate"]
    assert (g["method"], g["margin"], g["alpha"], g["passed"]) == ("mcnemar-exact", 0.01, 0.05, False)
    assert g["p_value"] > 0.05 and g["candidate_only"] < g["current_only"]
    code, out, _ = run_main("show", "v-worse", "--store", uri)
    assert (
        code == 0 and "production: v-good -> v-worse  (promote by bob, FORCED past the gate; gate on 200 images" in out
    ), out
    code, out, err = run_main("rollback", "--by", "ada", "--store", uri)
    assert code == 0 and out.strip() == "production: v-worse -> v-good" and prod() == "v-good", err
    doc = registry.alias_doc("production")
    assert doc["history"] == [] and [e["how"] for e in doc["log"]] == ["promote", "promote", "rollback"]
    assert run_main("rollback", "--store", uri)[0] == 2  # nothing left to roll back to
    code, _, err = run_main("rollback", "--alias", "staging", "--store", uri)
    assert code == 2 and "no alias 'staging'" in err and "production" in err
    assert run_main("promote", "v-good", "--margin", "-1", "--store", uri)[0] == 2  # argparse: a usage error
    code, out, err = run_main(
        "promote", "v-worse", "--margin", "50", "--alpha", "0.01", "--store", uri, "--images", IMAGES
    )
    assert code == 0 and "against a 50 points margin (alpha 0.01), passed" in out, (out, err)  # a wide margin


def _racing(st, n: int):
    "A copy of the store `st` whose `set_alias` waits for `n` callers: promotions gated against the same version."
    barrier = threading.Barrier(n, timeout=120)

    class Racing(type(st)):
        def set_alias(self, *a, **k):
            barrier.wait()
            return super().set_alias(*a, **k)

    r = Racing.__new__(Racing)
    r.__dict__.update(st.__dict__)
    return r


def test_racing_promotions_one_wins(registry, gate_packages):
    "Two promotions gated against the same production: one moves it, the other's Conflict names where it points now."
    registry.register(gate_packages["good"], "v-good2", aliases=[])
    registry.set_alias("production", "v-worse")
    before = registry.alias_doc("production")
    racing = _racing(registry, 2)

    def go(v):
        try:
            return promote(racing, v, images=int(IMAGES), by=v, echo=lambda s: None)
        except Conflict as e:
            return e

    with ThreadPoolExecutor(2) as ex:
        results = dict(zip(("v-good", "v-good2"), ex.map(go, ("v-good", "v-good2")), strict=True))
    lost = [v for v, r in results.items() if isinstance(r, Conflict)]
    assert len(lost) == 1, results
    winner = next(v for v in results if v not in lost)
    e = results[lost[0]]
    assert (e.alias, e.current, e.expected) == ("production", winner, "v-worse") and f"now points at {winner}" in str(e)
    doc = registry.alias_doc("production")
    assert doc["version"] == winner and doc["history"] == before["history"] + ["v-worse"]
    assert doc["log"][:-1] == before["log"] and doc["log"][-1]["by"] == winner  # exactly one more move, the winner's


def test_racing_promotions_from_the_command_line(tmp_path, gate_packages):
    "Two `vit-models promote` processes, both past the gate before either moves production (we hold the alias's lock)."
    st = open_store(tmp_path / "store")
    for v, pkg in [("v-worse", "worse"), ("v-good", "good"), ("v-good2", "good")]:
        st.register(gate_packages[pkg], v, aliases=[])
    st.set_alias("production", "v-worse")
    lock = st.root / "models" / "_aliases" / ".production.json.lock~"  # LocalStore._update_json's lock file
    procs, logs = {}, {}
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for v in ("v-good", "v-good2"):
            logs[v] = tmp_path / f"{v}.out"
            with open(logs[v], "w") as out:
                procs[v] = subprocess.Popen(
                    [str(BIN / "vit-models"), "promote", v, "--store", str(st.root), "--images", IMAGES],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
        deadline = time.monotonic() + 240
        while not all("gate on" in logs[v].read_text() for v in procs):  # both compared against v-worse ...
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), {
                v: logs[v].read_text() for v in procs
            }
            time.sleep(0.1)
    codes = {v: p.wait(120) for v, p in procs.items()}  # ... then both try to move it
    out = {v: logs[v].read_text() for v in procs}
    assert sorted(codes.values()) == [0, 3], (codes, out)
    winner, loser = (v for v in sorted(codes, key=codes.get))
    assert f"vit-models promote: conflict: alias 'production' now points at {winner}, not v-worse" in out[loser], out[
        loser
    ]
    doc = st.alias_doc("production")
    assert (
        doc["version"] == winner
        and doc["history"] == ["v-worse"]
        and [e["version"] for e in doc["log"]] == ["v-worse", winner]
    )
