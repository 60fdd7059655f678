"""`vit-cloud`: dry-run plans, the VM startup script (bash -n, shellcheck, and its life run against
stand-ins for gcloud/docker: nothing here can reach Google), and bad options."""

import json, os, stat, subprocess, sys, textwrap
from pathlib import Path

import pytest, yaml

from devtools import dev_tool, shellcheck
from vit_nbdev.cloud import (
    CloudError,
    CloudRunService,
    TrainVM,
    main,
    render,
    startup_script,
    sweep_plan,
    sweep_startup_script,
    sweep_vm_from_args,
    sweep_vm_options,
    train_params,
)

ROOT = Path(__file__).resolve().parents[1]
CLI = dev_tool("vit-cloud")
STORE, PROJECT = "gs://vit-test-bucket/runs-a", "vit-test-project"

# A stand-in for gcloud, docker, nvidia-smi...: logs its name, arguments and a few env vars as a JSON line, and
# does what the script needs of it (copies the startup script it is given, fails `docker run` on request).
DB_URL = "postgresql+psycopg://optuna:db-password-from-secret-manager@127.0.0.1:5432/optuna"
FAKE = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, shutil, sys
    from pathlib import Path
    DB_URL = {DB_URL!r}
    name, args = Path(sys.argv[0]).name, sys.argv[1:]
    rec = dict(name=name, args=args, wandb=os.environ.get("WANDB_API_KEY"))
    rec["storage"] = os.environ.get("VIT_SWEEP_STORAGE")
    for a in args:
        if a.startswith("startup-script="): shutil.copy(a.split("=", 1)[1], os.environ["FAKE_DIR"] + "/startup.sh")
        if a.endswith("/service.yaml"): shutil.copy(a, os.environ["FAKE_DIR"] + "/service.yaml")
        if a.startswith("--external_table_definition="):
            definition = a.split("=", 1)[1]
            shutil.copy(definition, os.environ["FAKE_DIR"] + "/" + Path(definition).name)
        if a.startswith("--data-file="): shutil.copy(a.split("=", 1)[1], os.environ["FAKE_DIR"] + "/secret-data")
    if name == "docker" and args[:1] == ["run"] and "-v" in args:
        vol = args[args.index("-v") + 1].split(":")[0]
        for f, key in (("params.yaml", "params"), ("sweep.yaml", "spec")):
            if Path(vol, f).exists(): rec[key] = Path(vol, f).read_text()
    with open(os.environ["FAKE_DIR"] + "/calls.jsonl", "a") as f: f.write(json.dumps(rec) + "\\n")
    if name == "gcloud" and args[:3] == ["secrets", "versions", "access"]:
        print(DB_URL if "vit-sweep-db" in args else "wandb-key-from-secret-manager")
    if name == "docker" and args[:1] == ["run"] and "-d" not in args:  # (not the proxy, started in the background)
        print("training... (fake)")
        sys.exit(int(os.environ.get("FAKE_DOCKER_RC", "0")))
    """)


def fakebin(tmp_path, names=("gcloud", "docker", "nvidia-smi", "nvidia-ctk")):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).write_text(FAKE)
        (d / n).chmod(stat.S_IRWXU)
    return d


def calls(tmp_path):
    return (
        [json.loads(l) for l in (tmp_path / "calls.jsonl").read_text().splitlines()]
        if (tmp_path / "calls.jsonl").exists()
        else []
    )


def run_cli(*args, env=None):
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)


TRAIN = [
    "train",
    "--project",
    PROJECT,
    "--store",
    STORE,
    "-f",
    str(ROOT / "configs/cifar10-scratch.yaml"),
    "-p",
    "epochs",
    "30",
    "--run-id",
    "20261126-120000-abc123",
    "--wandb-secret",
    "wandb-api-key",
]


def test_train_dry_run_is_the_plan_and_runs_as_printed(tmp_path):
    r = run_cli(*TRAIN, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    shellcheck(text=out)
    create = next(l for l in out.splitlines() if l.startswith("gcloud compute instances create"))
    for flag in [
        "vit-train-20261126-120000-abc123",
        f"--project {PROJECT}",
        "--zone us-central1-a",
        "--machine-type g2-standard-8",
        "--provisioning-model SPOT",
        "--instance-termination-action DELETE",
        "--max-run-duration 1440m",
        "--image-family common-cu128-ubuntu-2204-nvidia-570",
        "--boot-disk-size 200GB",
        "--maintenance-policy TERMINATE",
        f"--service-account vit-train@{PROJECT}.iam.gserviceaccount.com",
        'startup-script="$D/startup.sh"',
    ]:
        assert flag in create, flag
    assert "--accelerator" not in create  # g2 comes with its L4
    # the printed script, run with a stand-in gcloud, passes exactly the startup script the library makes
    env = {**os.environ, "PATH": f"{fakebin(tmp_path)}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    subprocess.run(["bash", "-c", out], env=env, check=True)
    [c] = calls(tmp_path)
    assert c["args"][:4] == ["compute", "instances", "create", "vit-train-20261126-120000-abc123"]
    vm = TrainVM(project=PROJECT, store=STORE, wandb_secret="wandb-api-key")
    params = train_params(
        [ROOT / "configs/cifar10-scratch.yaml"], [("epochs", "30")], store=STORE, run_id="20261126-120000-abc123"
    )
    assert (tmp_path / "startup.sh").read_text() == startup_script(vm, "20261126-120000-abc123", params)


def test_n1_gets_an_accelerator_and_standard_vm_options():
    r = run_cli(
        "train",
        "--project",
        PROJECT,
        "--store",
        STORE,
        "--machine-type",
        "n1-standard-8",
        "--gpu",
        "nvidia-tesla-v100",
        "--gpu-count",
        "2",
        "--no-spot",
        "--max-run-hours",
        "6",
        "--disk-size",
        "100",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    assert "--accelerator type=nvidia-tesla-v100,count=2" in r.stdout and "--provisioning-model STANDARD" in r.stdout
    assert "--max-run-duration 360m" in r.stdout and "--boot-disk-size 100GB" in r.stdout


def boot(tmp_path, script, *, bins=("gcloud", "docker", "nvidia-smi", "nvidia-ctk"), **env):
    "Run the startup script as a VM boot would, with stand-ins on PATH and the work folder in tmp_path."
    b = fakebin(tmp_path, bins)
    path = f"{b}:/usr/bin:/bin"  # no real gcloud/docker/nvidia tools can be reached
    e = {"PATH": path, "FAKE_DIR": str(tmp_path), "VIT_WORK_DIR": str(tmp_path / "work"), "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=e, timeout=60)


@pytest.fixture
def script():
    vm = TrainVM(
        project=PROJECT,
        store=STORE,
        wandb_secret="wandb-api-key",
        image="us-central1-docker.pkg.dev/p-1234/vit/vit-train:abc",
    )
    params = train_params([], [("epochs", "2"), ("model", "vit-cifar-small")], store=STORE, run_id="run-1")
    return startup_script(vm, "run-1", params)


def test_vm_trains_uploads_its_log_and_deletes_itself(tmp_path, script):
    r = boot(tmp_path, script)
    assert r.returncode == 0, r.stdout + r.stderr
    cs = calls(tmp_path)
    names = [(c["name"], c["args"][:2]) for c in cs]
    assert names == [
        ("nvidia-smi", []),
        ("gcloud", ["auth", "configure-docker"]),
        ("docker", ["pull", "us-central1-docker.pkg.dev/p-1234/vit/vit-train:abc"]),
        ("gcloud", ["secrets", "versions"]),
        ("docker", ["run", "--rm"]),
        ("gcloud", ["storage", "cp"]),
        ("gcloud", ["compute", "instances"]),
    ]
    run = cs[4]
    assert run["args"][-3:] == ["us-central1-docker.pkg.dev/p-1234/vit/vit-train:abc", "-f", "/config/params.yaml"]
    assert ["--gpus", "all"] == run["args"][run["args"].index("--gpus") :][:2] and f"VIT_STORE={STORE}" in run["args"]
    assert yaml.safe_load(run["params"]) == dict(epochs=2, model="vit-cifar-small", store=STORE, run_id="run-1")
    # the W&B key reaches the container through the environment only: in no argument, not in the log
    assert run["wandb"] == "wandb-key-from-secret-manager" and "WANDB_API_KEY" in run["args"]
    assert not any("wandb-key-from" in a for c in cs for a in c["args"])
    assert cs[5]["args"][2:] == [str(tmp_path / "work/train.log"), f"{STORE}/runs/run-1/vm.log"]
    assert cs[6]["args"] == ["compute", "instances", "delete", "vit-train-run-1", "--zone", "us-central1-a", "--quiet"]
    log = (tmp_path / "work/train.log").read_text()
    assert "training... (fake)" in log and "finished with status 0" in log and "wandb-key-from" not in log
    # booting again (a stopped VM started by hand) does nothing
    (tmp_path / "calls.jsonl").unlink()
    r = boot(tmp_path, script)
    assert r.returncode == 0 and "already ran" in r.stdout and calls(tmp_path) == []


def test_vm_is_deleted_when_training_fails(tmp_path, script):
    r = boot(tmp_path, script, FAKE_DOCKER_RC="3")
    assert r.returncode == 3
    cs = calls(tmp_path)
    assert [c["args"][:3] for c in cs[-2:]] == [
        ["storage", "cp", str(tmp_path / "work/train.log")],
        ["compute", "instances", "delete"],
    ]
    assert "finished with status 3" in (tmp_path / "work/train.log").read_text()


def test_vm_without_driver_fails_clearly_and_is_still_deleted(tmp_path, script):
    r = boot(tmp_path, script, bins=("gcloud", "docker"))
    assert r.returncode == 1 and "no NVIDIA driver" in r.stdout + r.stderr
    assert [c["args"][:3] for c in calls(tmp_path)] == [
        ["storage", "cp", str(tmp_path / "work/train.log")],
        ["compute", "instances", "delete"],
    ]
    assert not any(c["name"] == "docker" for c in calls(tmp_path))


def test_on_finish_stop_stops_instead(tmp_path):
    vm = TrainVM(project=PROJECT, store=STORE, on_finish="stop")
    s = startup_script(vm, "r2", train_params([], [], store=STORE, run_id="r2"))
    r = boot(tmp_path, s)
    assert r.returncode == 0, r.stderr
    assert calls(tmp_path)[-1]["args"][:3] == ["compute", "instances", "stop"]
    assert "WANDB_MODE=offline" in next(c for c in calls(tmp_path) if c["args"][:1] == ["run"])["args"]


def heredoc(script, name):
    "The text of file `name` in a printed plan."
    lines = script.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(f'cat > "$D/{name}"'))
    end = lines[i].split("<<")[1].strip("'")
    return "\n".join(lines[i + 1 : lines.index(end, i + 1)])


def test_deploy_dry_run_builds_pushes_and_deploys_with_a_secret():
    r = run_cli(
        "deploy", "--project", PROJECT, "--store", STORE, "--model", "production", "--max-instances", "5", "--dry-run"
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    shellcheck(text=out)
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cmds = [l for l in out.splitlines() if l and not l.startswith("#") and l.split()[0] in ("gcloud", "docker")]
    assert [c.split()[:4] for c in cmds] == [
        ["gcloud", "auth", "configure-docker", "us-central1-docker.pkg.dev"],
        ["docker", "build", "-f", "docker/serve.Dockerfile"],
        ["docker", "push", cmds[2].split()[2]],
        ["gcloud", "run", "services", "replace"],
        ["gcloud", "run", "services", "add-iam-policy-binding"],
        ["gcloud", "run", "jobs", "deploy"],
        ["gcloud", "run", "jobs", "deploy"],
    ]
    image = cmds[2].split()[2]
    assert (
        image.startswith(f"us-central1-docker.pkg.dev/{PROJECT}/vit/vit-serve:{sha}")
        and f"VIT_CODE_COMMIT={image.split(':')[-1]}" in cmds[1]
    )
    assert cmds[3].endswith(f'"$D/service.yaml" --project {PROJECT} --region us-central1')
    assert "--member allUsers --role roles/run.invoker" in cmds[4]
    # the compaction job: the same image, account and store as the service, `vit-monitor compact` for a command
    job = cmds[5]
    assert job.startswith(f"gcloud run jobs deploy vit-compact --image {image} --command vit-monitor --args compact ")
    assert f"--set-env-vars VIT_STORE={STORE} --service-account vit-serve@{PROJECT}.iam.gserviceaccount.com" in job
    assert job.endswith(f"--project {PROJECT} --region us-central1")
    # the canary's watch: one step of `vit-models canary watch` on the same store, never retried (exit 1 = rolled back)
    watch = cmds[6]
    assert watch.startswith(
        f"gcloud run jobs deploy vit-canary-watch --image {image} --command vit-models "
        "--args canary,watch,--once,--by,vit-canary-watch "
    )
    assert f"--set-env-vars VIT_STORE={STORE} --service-account vit-serve@{PROJECT}.iam.gserviceaccount.com" in watch
    assert "--tasks 1 --max-retries 0 " in watch and watch.endswith(f"--project {PROJECT} --region us-central1")
    svc = yaml.safe_load(heredoc(out, "service.yaml"))
    assert svc["kind"] == "Service" and svc["metadata"]["name"] == "vit-serve"
    t = svc["spec"]["template"]
    spec = t["spec"]
    [c] = spec["containers"]
    assert c["image"] == image and spec["serviceAccountName"] == f"vit-serve@{PROJECT}.iam.gserviceaccount.com"
    assert spec["containerConcurrency"] == 32 and c["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert (
        t["metadata"]["annotations"]["autoscaling.knative.dev/maxScale"] == "5"
        and t["metadata"]["annotations"]["autoscaling.knative.dev/minScale"] == "0"
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["VIT_STORE"]["value"] == STORE and env["VIT_MODEL"]["value"] == "production"
    assert env["VIT_ADMIN_TOKEN"] == {
        "name": "VIT_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "vit-admin-token", "key": "latest"}},
    }
    assert (
        c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert c["ports"] == [{"name": "http1", "containerPort": 8080}]


def test_deploy_runs_the_plan_with_the_tools_it_finds(tmp_path):
    "Without --dry-run the same commands run here, in order (stand-ins for gcloud and docker)."
    env = {**os.environ, "PATH": f"{fakebin(tmp_path, ('gcloud',))}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    image = "us-central1-docker.pkg.dev/vit-test-project/vit/vit-serve:v7"
    r = run_cli(
        "deploy", "--project", PROJECT, "--store", STORE, "--image", image, "--no-allow-unauthenticated", env=env
    )
    assert r.returncode == 0, r.stderr
    c, job, watch = calls(tmp_path)  # private: no allUsers binding
    assert c["args"][:3] == ["run", "services", "replace"] and c["args"][4:] == [
        "--project",
        PROJECT,
        "--region",
        "us-central1",
    ]
    assert job["args"][:6] == ["run", "jobs", "deploy", "vit-compact", "--image", image]
    assert watch["args"][:6] == ["run", "jobs", "deploy", "vit-canary-watch", "--image", image]
    assert "+ gcloud run services replace" in r.stderr
    from vit_nbdev.cloud import service_yaml

    svc = CloudRunService(project=PROJECT, store=STORE, image=image, allow_unauthenticated=False)
    assert (tmp_path / "service.yaml").read_text() == service_yaml(svc, image)


def test_setup_dry_run_grants_the_least(tmp_path):
    r = run_cli(
        "setup", "--project", PROJECT, "--bucket", "vit-test-bucket", "--wandb-secret", "wandb-api-key", "--dry-run"
    )
    assert r.returncode == 0, r.stderr
    shellcheck(text=r.stdout)
    grants = [l for l in r.stdout.splitlines() if "--role" in l and not l.startswith("#")]
    serve = [l for l in grants if f"vit-serve@{PROJECT}" in l]
    assert len(serve) == 2
    assert any(
        l.startswith("gcloud storage buckets add-iam-policy-binding gs://vit-test-bucket")
        and "roles/storage.objectUser" in l
        for l in serve
    )
    assert any(
        l.startswith("gcloud secrets add-iam-policy-binding vit-admin-token")
        and "roles/secretmanager.secretAccessor" in l
        for l in serve
    )
    admin = [l for l in grants if "instanceAdmin" in l]
    assert admin and all("vit-train@" in l and "--condition" in l and 'startsWith("vit-train-")' in l for l in admin)
    assert not any(r in r_ for r_ in grants for r in ("roles/owner", "roles/editor", "roles/storage.admin"))
    # by default the canary's watch takes a step every 5 minutes
    [watch] = [l for l in r.stdout.splitlines() if l.startswith("gcloud scheduler jobs create http vit-canary-watch ")]
    assert "--schedule '*/5 * * * *' --time-zone Etc/UTC" in watch


def test_setup_defines_the_bigquery_tables_and_the_schedules(tmp_path):
    "The external tables read the store's hive-partitioned parquet files; a scheduler starts the two jobs."
    schedules = ["--canary-schedule", "*/10 * * * *"]
    r = run_cli("setup", "--project", PROJECT, "--bucket", STORE, "--region", "europe-west4", *schedules, "--dry-run")
    assert r.returncode == 0, r.stderr
    shellcheck(text=r.stdout)
    cmds = [l for l in r.stdout.splitlines() if l and not l.startswith("#") and l.split()[0] in ("gcloud", "bq")]
    bq = [c for c in cmds if c.startswith("bq ")]
    where = f"bq --project_id={PROJECT} --location=europe-west4 mk"
    assert bq[0].startswith(f"{where} --dataset ") and bq[0].endswith(f" {PROJECT}:vit_telemetry")
    for kind, c in zip(("telemetry", "feedback"), bq[1:], strict=True):
        assert c == f'{where} --table --external_table_definition="$D/{kind}-table.json" {PROJECT}:vit_telemetry.{kind}'
        definition = json.loads(heredoc(r.stdout, f"{kind}-table.json"))
        assert definition == {
            "sourceFormat": "PARQUET",
            "sourceUris": [f"{STORE}/{kind}/*.parquet"],
            "hivePartitioningOptions": {
                "mode": "CUSTOM",
                "sourceUriPrefix": f"{STORE}/{kind}/{{version:STRING}}/{{day:STRING}}",
                "requirePartitionFilter": False,
            },
            "parquetOptions": {"enableListInference": True},
        }
    assert "bigquery.googleapis.com" in cmds[0] and "cloudscheduler.googleapis.com" in cmds[0]
    scheduler = f"vit-scheduler@{PROJECT}.iam.gserviceaccount.com"
    grants = [c for c in cmds if f"serviceAccount:{scheduler}" in c]
    member = f"--member serviceAccount:{scheduler}"
    assert grants == [f"gcloud projects add-iam-policy-binding {PROJECT} {member} --role roles/run.jobsExecutor"]
    for name, schedule in [("vit-compact", "30 1 * * *"), ("vit-canary-watch", "*/10 * * * *")]:
        [job] = [c for c in cmds if c.startswith(f"gcloud scheduler jobs create http {name} ")]
        for flag in [
            f"--schedule '{schedule}' --time-zone Etc/UTC --location europe-west4",
            f"--uri https://run.googleapis.com/v2/projects/{PROJECT}/locations/europe-west4/jobs/{name}:run",
            f"--http-method POST --oauth-service-account-email {scheduler}",
        ]:
            assert flag in job, (name, flag)
    # run with stand-ins: bq gets the definitions as files, exactly as printed
    env = {
        **os.environ,
        "PATH": f"{fakebin(tmp_path, ('gcloud', 'bq'))}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
    }
    r2 = run_cli("setup", "--project", PROJECT, "--bucket", STORE, "--region", "europe-west4", env=env)
    assert r2.returncode == 0, r2.stderr
    assert [c["name"] for c in calls(tmp_path)].count("bq") == 3
    for kind in ("telemetry", "feedback"):
        assert (tmp_path / f"{kind}-table.json").read_text().strip() == heredoc(r.stdout, f"{kind}-table.json")


@pytest.mark.parametrize(
    "args,msg",
    [
        (["train", "--project", PROJECT, "--store", "./artifacts"], "gs://bucket"),
        (["train", "--project", PROJECT, "--store", STORE, "-p", "epoch", "3"], "epoch"),
        (["train", "--project", PROJECT, "--store", STORE, "-p", "precision", "fp8"], "bad training parameters"),
        (["train", "--project", PROJECT, "--store", STORE, "-f", "/no/such.yaml"], "cannot read the parameters"),
        (["train", "--project", PROJECT, "--store", STORE, "--machine-type", "e2-standard-8"], "takes no GPU"),
        (["train", "--project", PROJECT, "--store", STORE, "--gpu", "nvidia-tesla-t4"], "comes with nvidia-l4"),
        (["train", "--project", PROJECT, "--store", STORE, "--zone", "uscentral"], "zone"),
        (["train", "--project", "Bad_Project", "--store", STORE], "project id"),
        (["train", "--project", PROJECT, "--store", STORE, "--wandb-secret", "my key 123"], "not the secret itself"),
        (
            ["setup", "--project", PROJECT, "--bucket", "vit-test-bucket", "--dataset", "vit-telemetry"],
            "BigQuery dataset",
        ),
        (
            ["setup", "--project", PROJECT, "--bucket", "vit-test-bucket", "--compact-schedule", "daily"],
            "cron schedule",
        ),
        (
            ["setup", "--project", PROJECT, "--bucket", "vit-test-bucket", "--canary-schedule", "*/5 * * *"],
            "--canary-schedule",
        ),
        (
            ["deploy", "--project", PROJECT, "--store", STORE, "--admin-token-secret", "hunter2 hunter2"],
            "not the secret itself",
        ),
        (["deploy", "--project", PROJECT, "--store", f"{STORE},VIT_MODEL=x"], "no commas"),
        (
            ["deploy", "--project", PROJECT, "--store", STORE, "--min-instances", "3", "--max-instances", "1"],
            "--min-instances",
        ),
        (["deploy", "--project", PROJECT, "--store", STORE, "--memory", "4GB"], "memory"),
        (["deploy", "--project", PROJECT, "--store", STORE, "--image", "Not An Image"], "--image"),
        (
            ["deploy", "--project", PROJECT, "--store", STORE, "--service-account", "vit-serve@gmail.com"],
            "service account email",
        ),
    ],
)
def test_bad_options_exit_2_with_a_message(args, msg, capsys):
    "In this process (the installed `vit-cloud` runs in the tests above): `main` exits as the console script does."
    with pytest.raises(SystemExit) as e:
        main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and msg in err and out == "", (e.value.code, err)


def test_missing_gcloud_fails_before_anything_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "empty")}  # (this machine has a gcloud in /usr/bin)
    r = run_cli("setup", "--project", PROJECT, "--bucket", "vit-test-bucket", env=env)
    assert r.returncode == 2 and "gcloud not found on PATH" in r.stderr and "--dry-run" in r.stderr


def test_deploy_outside_a_checkout_needs_an_image(tmp_path):
    from vit_nbdev.cloud import CloudError, deploy_plan

    with pytest.raises(CloudError, match="pass --image"):
        deploy_plan(CloudRunService(project=PROJECT, store=STORE), root=tmp_path)


# Sweeps on a fleet of GPU VMs: K workers of one study, each behind the Cloud SQL Auth Proxy
SPEC = "space:\n  lr: {low: 1.0e-4, high: 3.0e-3, log: true}\nfixed:\n  epochs: 30\n"
SWEEP_VM = TrainVM(project=PROJECT, store=STORE, image="us-central1-docker.pkg.dev/p-1234/vit/vit-train:abc")


def test_sweep_dry_run_starts_k_workers_with_the_proxy_and_no_password():
    out = render(sweep_plan(SWEEP_VM, SPEC, "lr-search", 3, 24))
    shellcheck(text=out)
    creates = [l for l in out.splitlines() if l.startswith("gcloud compute instances create")]
    assert [c.split()[4] for c in creates] == [f"vit-sweep-lr-search-{i}" for i in (1, 2, 3)]
    for i, c in enumerate(creates, 1):
        assert f'startup-script="$D/startup-{i}.sh" --labels app=vit-nbdev,vit-sweep=lr-search' in c
        assert "--provisioning-model SPOT" in c and "--instance-termination-action DELETE" in c
        script = heredoc(out, f"startup-{i}.sh")
        shellcheck(text=script)
        assert "worker -f /config/sweep.yaml --study \"$STUDY\" --store \"$STORE\" --trials \"$TRIALS\"" in script
        assert "--entrypoint vit-sweep" in script and "--network host" in script and SPEC.rstrip() in script
        for line in [
            f"WORKER={i}",
            "TRIALS=24",
            f"SQL_CONNECTION={PROJECT}:us-central1:vit-sweeps",
            "SQL_PROXY_IMAGE=gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.21.0",
            "DB_SECRET=vit-sweep-db",
        ]:
            assert line in script.splitlines(), line
        assert "--address 127.0.0.1 --port 5432" in script
    assert "password" not in out.lower() and "postgresql" not in out


def test_sweep_vm_runs_the_worker_behind_the_proxy_and_deletes_itself(tmp_path):
    script = sweep_startup_script(SWEEP_VM, "lr-search", 2, SPEC, 24)
    r = boot(tmp_path, script, bins=("gcloud", "docker", "nvidia-smi", "nvidia-ctk", "curl"))
    assert r.returncode == 0, r.stdout + r.stderr
    cs = calls(tmp_path)
    assert [(c["name"], c["args"][:2]) for c in cs] == [
        ("nvidia-smi", []),
        ("gcloud", ["auth", "configure-docker"]),
        ("docker", ["pull", SWEEP_VM.image]),
        ("docker", ["run", "-d"]),  # the proxy
        ("curl", ["-fsS", "-o"]),  # ready
        ("gcloud", ["secrets", "versions"]),  # the URL
        ("docker", ["run", "--rm"]),  # the worker
        ("gcloud", ["storage", "cp"]),
        ("gcloud", ["compute", "instances"]),
    ]
    proxy, worker = cs[3]["args"], cs[6]["args"]
    assert proxy[-1] == f"{PROJECT}:us-central1:vit-sweeps" and "--network" in proxy
    i = worker.index("--entrypoint")
    assert worker[i : i + 3] == ["--entrypoint", "vit-sweep", SWEEP_VM.image]
    assert worker[i + 3 :] == ["worker", "-f", "/config/sweep.yaml", "--study", "lr-search"] + [
        "--store",
        STORE,
        "--trials",
        "24",
        "--worker",
        "2",
        "--notebook",
        "/app/nbs/train.ipynb",
    ]
    assert ["--gpus", "all"] == worker[worker.index("--gpus") :][:2] and "WANDB_MODE=offline" in worker
    assert cs[5]["args"][4:] == ["--secret", "vit-sweep-db"] and cs[6]["spec"] == SPEC
    # the URL reaches the worker through the environment only: in no argument, not in the log
    assert cs[6]["storage"] == DB_URL and "VIT_SWEEP_STORAGE" in worker
    assert not any("db-password" in a for c in cs for a in c["args"])
    assert cs[7]["args"][2:] == [str(tmp_path / "work/sweep.log"), f"{STORE}/sweeps/lr-search/vm-2.log"]
    assert cs[8]["args"] == ["compute", "instances", "delete", "vit-sweep-lr-search-2", "--zone", "us-central1-a"] + [
        "--quiet"
    ]
    log = (tmp_path / "work/sweep.log").read_text()
    assert "vit-sweep: study lr-search, worker 2 finished with status 0" in log and "db-password" not in log


def test_sweep_vm_is_deleted_when_the_worker_fails(tmp_path):
    script = sweep_startup_script(SWEEP_VM, "lr-search", 1, SPEC, 24)
    r = boot(tmp_path, script, bins=("gcloud", "docker", "nvidia-smi", "nvidia-ctk", "curl"), FAKE_DOCKER_RC="3")
    assert r.returncode == 3
    assert [c["args"][:3] for c in calls(tmp_path)[-2:]] == [
        ["storage", "cp", str(tmp_path / "work/sweep.log")],
        ["compute", "instances", "delete"],
    ]


def test_setup_makes_the_sweeps_database_and_prints_no_password(tmp_path):
    r = run_cli("setup", "--project", PROJECT, "--bucket", "vit-test-bucket", "--sql-tier", "db-g1-small", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    shellcheck(text=out)
    cmds = [l for l in out.splitlines() if l and not l.startswith("#") and l.split()[0] == "gcloud"]
    assert "sqladmin.googleapis.com" in cmds[0]
    sql = [c for c in cmds if c.startswith("gcloud sql ")]
    assert sql == [
        "gcloud sql instances create vit-sweeps --database-version POSTGRES_15 --edition enterprise --tier db-g1-small "
        f"--storage-size 10GB --region us-central1 --project {PROJECT}",
        f"gcloud sql databases create optuna --instance vit-sweeps --project {PROJECT}",
        f'gcloud sql users create optuna --instance vit-sweeps --password="$VIT_SWEEP_DB_PASSWORD" --project {PROJECT}',
    ]
    [secret] = [c for c in cmds if c.startswith("gcloud secrets create vit-sweep-db ")]
    assert '--data-file="$D/sweep-db-url"' in secret
    train = f"--member serviceAccount:vit-train@{PROJECT}.iam.gserviceaccount.com"
    assert f"gcloud projects add-iam-policy-binding {PROJECT} {train} --role roles/cloudsql.client" in cmds
    assert (
        f"gcloud secrets add-iam-policy-binding vit-sweep-db {train} --role roles/secretmanager.secretAccessor "
        f"--project {PROJECT}"
    ) in cmds
    # the printed script makes the password (or takes yours): the same one for the user and in the secret's URL
    env = {
        **os.environ,
        "PATH": f"{fakebin(tmp_path, ('gcloud', 'bq'))}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
    }
    env.pop("VIT_SWEEP_DB_PASSWORD", None)
    subprocess.run(["bash", "-c", out], env=env, check=True, timeout=120)
    [user] = [c["args"] for c in calls(tmp_path) if c["args"][:3] == ["sql", "users", "create"]]
    password = user[6].removeprefix("--password=")
    assert len(password) >= 32 and password not in out
    assert (tmp_path / "secret-data").read_text() == f"postgresql+psycopg://optuna:{password}@127.0.0.1:5432/optuna"
    # and so does vit-cloud setup without --dry-run, showing the variable, never the value
    (tmp_path / "calls.jsonl").unlink()
    given = "a-password-of-the-user-0123"
    r2 = run_cli(
        "setup", "--project", PROJECT, "--bucket", "vit-test-bucket", env={**env, "VIT_SWEEP_DB_PASSWORD": given}
    )
    assert r2.returncode == 0, r2.stderr
    assert given not in r2.stdout + r2.stderr and '--password="$VIT_SWEEP_DB_PASSWORD"' in r2.stderr
    [user] = [c["args"] for c in calls(tmp_path) if c["args"][:3] == ["sql", "users", "create"]]
    assert user[6] == f"--password={given}" and given in (tmp_path / "secret-data").read_text()
    # a password that would break the URL is refused before anything runs, without being repeated
    (tmp_path / "calls.jsonl").unlink()
    bad = "p@ss/word with spaces"
    r3 = run_cli(
        "setup", "--project", PROJECT, "--bucket", "vit-test-bucket", env={**env, "VIT_SWEEP_DB_PASSWORD": bad}
    )
    assert r3.returncode == 2 and "VIT_SWEEP_DB_PASSWORD must be 16 or more" in r3.stderr and bad not in r3.stderr
    assert calls(tmp_path) == []


def test_setup_without_sweeps_has_no_database():
    r = run_cli("setup", "--project", PROJECT, "--bucket", "vit-test-bucket", "--no-sweeps", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "gcloud sql" not in r.stdout and "VIT_SWEEP_DB_PASSWORD" not in r.stdout and "vit-sweep-db" not in r.stdout


@pytest.mark.parametrize(
    "change,msg",
    [
        (dict(workers=0), "--workers must be a whole number, 1 or more"),
        (dict(workers=2.5), "--workers"),
        (dict(study="LR_search"), "--study 'LR_search' cannot name the VMs vit-sweep-<study>-<i>"),
        (dict(study="lr-search-" + "x" * 45), "at most 51"),
        (dict(study="-lr"), "cannot name the VMs"),
        (dict(trials=0), "--trials"),
        (dict(db_secret="postgresql://optuna:hunter2@db/optuna"), "not the secret itself"),
        (dict(sql_instance="Vit_Sweeps"), "--sql-instance"),
        (dict(sql_instance="p:vit-sweeps"), "PROJECT:REGION:NAME"),
        (dict(spec_text="  \n"), "the sweep's YAML is empty"),
        (dict(vm=TrainVM(project=PROJECT, store="./artifacts")), "gs://bucket"),
        (dict(vm=TrainVM(project=PROJECT, store=STORE, machine_type="e2-standard-8")), "takes no GPU"),
    ],
)
def test_bad_sweep_options_raise_a_clear_cloud_error(change, msg):
    args = dict(vm=SWEEP_VM, spec_text=SPEC, study="lr-search", workers=2, trials=24) | change
    with pytest.raises(CloudError, match=None) as e:
        sweep_plan(**args)
    assert msg in str(e.value), str(e.value)


def test_sweep_vm_options_fit_vit_sweep_run():
    "`vit-sweep run` has its own -f, --store, --study, --trials and --workers: the VM options add none of them."
    import argparse

    p = argparse.ArgumentParser("vit-sweep run")
    p.add_argument("-f", "--file")
    for o in ("--store", "--study", "--trials", "--workers", "--storage"):
        p.add_argument(o)
    sweep_vm_options(p)  # argparse raises on a clash
    a = p.parse_args(["--project", PROJECT, "--machine-type", "n1-standard-8", "--gpu", "nvidia-tesla-t4"])
    vm = sweep_vm_from_args(a, STORE)
    assert (vm.project, vm.store, vm.machine_type, vm.gpu, vm.spot) == (
        PROJECT,
        STORE,
        "n1-standard-8",
        "nvidia-tesla-t4",
        True,
    )
    assert (a.db_secret, a.sql_instance) == ("vit-sweep-db", "vit-sweeps")
    with pytest.raises(CloudError, match="--cloud needs --project"):
        sweep_vm_from_args(p.parse_args([]), STORE)
    with pytest.raises(CloudError, match="--gpu-count"):
        sweep_vm_from_args(
            p.parse_args(["--project", PROJECT, "--machine-type", "n1-standard-8", "--gpu-count", "3"]), STORE
        )


def test_deploy_gpu_dry_run_asks_for_one_l4(capsys):
    "`--gpu`: the CUDA image, one L4 in the service's YAML (limit and node selector), CPU never throttled."
    r = run_cli(
        "deploy", "--project", PROJECT, "--store", STORE, "--gpu", "--cpu", "4", "--memory", "16Gi", "--dry-run"
    )
    assert r.returncode == 0, r.stderr
    build = next(l for l in r.stdout.splitlines() if l.startswith("docker build"))
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in build and "-cuda " in build
    t = yaml.safe_load(heredoc(r.stdout, "service.yaml"))["spec"]["template"]
    [c] = t["spec"]["containers"]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert t["spec"]["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-l4"}
    assert t["metadata"]["annotations"]["run.googleapis.com/cpu-throttling"] == "false"
    for args, msg in [
        ((), "--cpu 4 --memory 16Gi"),
        (("--cpu", "4", "--memory", "16Gi", "--region", "us-west1"), "us-west1"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["deploy", "--project", PROJECT, "--store", STORE, "--gpu", *args, "--dry-run"])
        assert e.value.code == 2 and msg in capsys.readouterr().err
