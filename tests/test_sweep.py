"""Sweeps end to end: real `vit-sweep` worker processes, each trial a real papermill run of the training notebook.

- Two workers share a study on a real PostgreSQL server; one is killed (with its kernel) in the middle of a trial:
  the trial is failed by its heartbeat and run again by the other worker, and the study ends with its budget.
- `vit-sweep run` on the default SQLite storage: a trial whose notebook raises is a failed trial with its record;
  Ctrl-C stops after the running trial, and nothing is lost; `latest` moves to the best trial; `show` draws the plots;
  `optuna-dashboard` reads the same storage.
- Bad input exits 2 with a clear message.
"""

import json, os, signal, subprocess, urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from devtools import dev_tool, free_port, in_process, wait_for
from postgres import postgres_server

from vit_nbdev.store import open_store
from vit_nbdev.sweep import SweepError, load_spec, main, open_storage, open_study, trial_reporter

# trials as short as a papermill run of the training notebook can be: 256 images, two epochs, a small validation carve
SPEC = dict(
    study="tests",
    trials=4,
    pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
    fixed=dict(
        model="vit-cifar-tiny",
        epochs=2,
        max_train_images=256,
        val_fraction=0.05,
        checkpoint_every=0,
        eval_batch_size=256,
        tracker="wandb",
    ),
    space=dict(
        lr={"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        batch_size={"type": "categorical", "choices": [32, 64, 512]},  # 512 > 256 images: that trial's notebook raises
    ),
)
TS = optuna.trial.TrialState


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch):
    "A working folder with the sweep file; W&B offline, its runs under the folder."
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(SPEC))
    return tmp_path


def worker(d: Path, storage: str, *extra) -> subprocess.Popen:
    "A `vit-sweep worker` process on the study in `storage` (the URL in the environment, never in the arguments)."
    cmd = [dev_tool("vit-sweep"), "worker", "-f", "sweep.yaml", "--store", str(d / "store"), "--heartbeat", "2", *extra]
    log = open(d / f"worker{extra[-1] if extra else ''}.log", "ab")
    env = {**os.environ, "VIT_SWEEP_STORAGE": storage, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    "The child processes of `pid` (the worker's notebook kernel among them)."
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []


def test_two_workers_on_postgres_one_killed_mid_trial(sweep_dir):
    spec = load_spec(sweep_dir / "sweep.yaml")
    with postgres_server() as url:
        study = open_study(spec, open_storage(url, heartbeat=None))
        study.enqueue_trial({"lr": 1e-3, "batch_size": 64})  # the first trials: known parameters that train
        study.enqueue_trial({"lr": 2e-3, "batch_size": 32})
        # a budget of two trials: one each; B dies in its trial, A then runs B's trial again
        a = worker(sweep_dir, url, "--trials", "2", "--worker", "0")
        b = worker(sweep_dir, url, "--trials", "2", "--worker", "1")
        try:
            b_id = f":{b.pid}"

            def b_mid_trial():
                return [
                    t
                    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,))
                    if t.user_attrs.get("worker", "").endswith(b_id) and t.intermediate_values
                ]

            victim = wait_for(b_mid_trial, timeout=240, what="worker B to report an epoch of its trial")[0]
            for pid in children(b.pid) + [b.pid]:  # the machine goes: the worker and its kernel, at once
                os.kill(pid, signal.SIGKILL)
            b.wait(timeout=30)
            assert a.wait(timeout=480) == 0, (sweep_dir / "worker0.log").read_text()[-3000:]
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.kill()
        trials = optuna.load_study(study_name="tests", storage=open_storage(url, heartbeat=None)).trials
        # nothing but the retry is lost: the victim failed by its heartbeat, and its parameters ran again
        assert trials[victim.number].state == TS.FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state.is_finished()
        final = [t for t in trials if t.number != victim.number]
        assert len(final) == 2 and all(t.state in (TS.COMPLETE, TS.PRUNED, TS.FAIL) for t in final), final
        complete = [t for t in trials if t.state == TS.COMPLETE]
        assert complete, [(t.number, t.state, t.user_attrs.get("error")) for t in trials]
        # each trial's record is in the store; each finished model is a version tagged with the study, not `latest`
        st = open_store(sweep_dir / "store")
        for t in final:
            assert st.exists(t.user_attrs["record"]), t.user_attrs
        for t in complete:
            card = st.card(t.user_attrs["version"])
            assert card["sweep"] == {"study": "tests", "trial": t.number} and card["params"]["lr"] == t.params["lr"]
        assert "latest" not in st.aliases()  # workers leave the registry's aliases alone
        # W&B: each trial is a run in the study's group; the offline run file holds the run record, whose `run_group`
        # (protobuf field 6, a string) protobuf writes as the bytes 0x32, the length, the name
        runs = [p.read_bytes() for p in sweep_dir.glob("wandb/offline-run-*/*.wandb")]
        assert sum(b"\x32\x05tests" in r for r in runs) >= len(complete), [len(r) for r in runs]
        # the password never reached a log or a record
        password = url.split(":")[2].split("@")[0]
        for f in [*sweep_dir.glob("*.log"), *sweep_dir.glob("runs/sweeps/tests/*.ipynb")]:
            assert password not in f.read_text(errors="replace"), f


def test_run_failed_trial_ctrl_c_show_and_dashboard(sweep_dir):
    spec = load_spec(sweep_dir / "sweep.yaml")
    store = sweep_dir / "store"
    storage = f"sqlite:///{store}/sweeps/optuna.db"  # the default beside a local store
    study = open_study(spec, open_storage(storage, heartbeat=None))
    study.enqueue_trial({"lr": 1e-3, "batch_size": 512})  # its notebook raises: batch larger than the 256 images
    study.enqueue_trial({"lr": 1e-3, "batch_size": 32})
    cmd = [dev_tool("vit-sweep"), "run", "-f", "sweep.yaml", "--store", str(store), "--heartbeat", "2"]
    run = subprocess.Popen(cmd, cwd=sweep_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def second_running():
            return [t for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,)) if t.number == 1]

        wait_for(second_running, timeout=240, what="the second trial to start")
        run.send_signal(signal.SIGINT)  # Ctrl-C: finish the running trial, start no other
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials[:2]] in ([TS.FAIL, TS.COMPLETE], [TS.FAIL, TS.PRUNED]), out
    assert len(trials) == 2 and "stopping after the running trials" in out, out  # no third trial started
    assert "batch_size 512 is larger than the training split" in trials[0].user_attrs["error"]
    st = open_store(store)
    assert st.exists(trials[0].user_attrs["record"]) and st.exists(trials[1].user_attrs["record"])
    if trials[1].state == TS.COMPLETE:  # latest moved to the best (here: the only) finished trial
        assert st.resolve("latest") == trials[1].user_attrs["version"] and "latest: moved" in out
    # show: the table, the best trial, the plots in the store
    code, shown, err = in_process(main, "show", "tests", "--store", str(store))
    assert code == 0, err
    assert "FAIL" in shown and "best:" in shown and st.exists("sweeps/tests/history.png"), shown
    # Optuna's dashboard reads the same storage
    port = free_port()
    dash = subprocess.Popen(
        [dev_tool("optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def studies():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        listed = wait_for(studies, timeout=60, what="optuna-dashboard to answer")
        assert [s["study_name"] for s in listed["study_summaries"]] == ["tests"]
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_bad_input_exits_2(sweep_dir, monkeypatch):
    def bad(change: dict, *args) -> str:
        Path("bad.yaml").write_text(yaml.safe_dump({**SPEC, **change}))
        code, _, err = in_process(main, "run", "-f", "bad.yaml", "--store", str(sweep_dir / "store"), *args)
        assert code == 2, err
        return err

    space = SPEC["space"]
    err = bad({"space": {**space, "lrr": {"type": "float", "low": 0.1, "high": 1.0}}})
    assert "unknown parameter(s) lrr; valid: dataset," in err and "weight_decay" in err
    assert "low must be below high" in bad({"space": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}})
    assert "above 0" in bad({"space": {"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}})
    assert "refuses" in bad({"space": {"label_smoothing": {"type": "float", "low": 0.0, "high": 1.0}}})
    assert "set by the sweep" in bad({"fixed": {**SPEC["fixed"], "store": "elsewhere"}})
    # a storage out of reach: exit 2, the password hidden
    err = bad({}, "--storage", f"postgresql://optuna:s3cret@127.0.0.1:{free_port()}/optuna")
    assert "cannot open the study storage postgresql://optuna:***@127.0.0.1" in err and "s3cret" not in err
    # the study's name again with another space: a clear error
    storage = f"sqlite:///{sweep_dir}/studies.db"
    open_study(load_spec(Path("sweep.yaml")), open_storage(storage, heartbeat=None))
    err = bad({"space": {"lr": space["lr"]}}, "--storage", storage)
    assert "exists with another space" in err
    code, _, err = in_process(main, "show", "nope", "--storage", storage)
    assert code == 2 and "no study 'nope'" in err and "there are: tests" in err
    code, _, err = in_process(main, "run", "-f", "sweep.yaml", "--workers", "0", "--storage", storage)
    assert code == 2 and "--workers must be at least 1" in err
    # a run given a trial outside a sweep has no storage to report to
    monkeypatch.delenv("VIT_SWEEP_STORAGE", raising=False)
    with pytest.raises(SweepError, match="VIT_SWEEP_STORAGE"):
        trial_reporter("tests:0")
    # the cloud plan, printed: the workers on GPU VMs, their database password nowhere
    cloud = ["--cloud", "--workers", "2", "--project", "my-proj", "--store", "gs://my-bucket/vit", "--dry-run"]
    code, plan, err = in_process(main, "run", "-f", "sweep.yaml", *cloud)
    assert code == 0, err
    assert (
        plan.count("gcloud compute instances create vit-sweep-tests-") == 2 and "worker -f /config/sweep.yaml" in plan
    )
