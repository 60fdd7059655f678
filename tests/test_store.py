"Tests of vit_nbdev.store on a local folder and on the GCS emulator (see conftest.py)."

import json, os, socket, threading, time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from vit_nbdev.store import GCSStore, LocalStore, NotFound, Store, StoreError, open_store


@pytest.fixture
def store(store_uri):
    return open_store(store_uri, timeout=5)


@pytest.fixture
def pkg(tmp_path) -> Path:
    "A small stand-in for a model package."
    d = tmp_path / "pkg"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"id2label": {"0": "airplane"}}))
    (d / "model.safetensors").write_bytes(os.urandom(3000))
    (d / "sub" / "extra.txt").write_text("nested")
    return d


def files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


# -- backends --


def test_backends_implement_every_primitive():
    "Each backend has its own version of every primitive that `Store` leaves to it (they are patched on one by one)."
    code = {k: getattr(f, "__code__", None) for k, f in vars(Store).items()}
    prims = [k for k, c in code.items() if c and "NotImplementedError" in c.co_names]
    assert prims == ["_write", "_read", "_download", "_exists", "_keys", "_remove", "_update_json", "_stamp"]
    for cls in (LocalStore, GCSStore):
        assert [p for p in prims if getattr(cls, p) is getattr(Store, p)] == [], cls.__name__


# -- objects --


def test_bytes_round_trip(store):
    assert store.list() == [] and not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"\x00\x01")
    assert store.get_bytes("a/b.bin") == b"\x00\x01" and store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"new")
    assert store.get_bytes("a/b.bin") == b"new"
    with pytest.raises(StoreError, match="already exists"):
        store.put_bytes("a/b.bin", b"x", overwrite=False)
    with pytest.raises(NotFound, match="a/missing"):
        store.get_bytes("a/missing")
    with pytest.raises(KeyError):
        store.get_bytes("a/missing")


def test_list_exists_delete(store):
    for k in ["runs/r1/m.json", "runs/r10/m.json", "runs/r1/deep/x", "top"]:
        store.put_bytes(k, b"{}")
    assert store.list() == ["runs/r1/deep/x", "runs/r1/m.json", "runs/r10/m.json", "top"]
    assert store.list("runs/r1/") == ["runs/r1/deep/x", "runs/r1/m.json"]
    assert store.list("runs/r1") == ["runs/r1/deep/x", "runs/r1/m.json", "runs/r10/m.json"]
    assert store.list("nothing/") == []
    store.delete("runs/r1/m.json")
    assert not store.exists("runs/r1/m.json") and "runs/r1/m.json" not in store.list()
    with pytest.raises(NotFound):
        store.delete("runs/r1/m.json")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "a/", "a\\b"])
def test_bad_keys(store, key):
    with pytest.raises(StoreError, match="bad key"):
        store.put_bytes(key, b"")


def test_file_and_dir_round_trip(store, pkg, tmp_path):
    store.put_file(pkg / "config.json", "x/config.json")
    assert store.get_file("x/config.json", tmp_path / "o" / "c.json").read_bytes() == (pkg / "config.json").read_bytes()
    keys = store.put_dir(pkg, "d/pkg")
    assert keys == ["d/pkg/config.json", "d/pkg/model.safetensors", "d/pkg/sub/extra.txt"] == store.list("d/")
    assert files(store.get_dir("d/pkg", tmp_path / "copy")) == files(pkg)
    with pytest.raises(NotFound):
        store.get_dir("d/none", tmp_path / "none")
    with pytest.raises(NotFound):
        store.get_file("x/none", tmp_path / "o" / "none")
    assert not (tmp_path / "o" / "none").exists()


# -- registry --


def test_register_versions_resolve(store, pkg):
    assert store.versions() == [] and store.aliases() == {}
    v1 = store.register(pkg)
    assert v1.startswith("v2") and store.versions() == [v1] and store.aliases() == {"latest": v1}
    assert store.resolve("latest") == v1 == store.resolve(v1)
    v2 = store.register(pkg)
    assert store.versions() == [v1, v2] and store.resolve("latest") == v2
    assert sorted(store.list(f"models/{v2}/")) == [
        f"models/{v2}/{f}" for f in ["_COMPLETE", "config.json", "model.safetensors", "sub/extra.txt"]
    ]


def test_versions_are_immutable(store, pkg):
    v = store.register(pkg, "v1")
    before = store.get_bytes("models/v1/model.safetensors")
    (pkg / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(StoreError, match="already exists"):
        store.register(pkg, "v1")
    assert store.get_bytes(f"models/{v}/model.safetensors") == before
    with pytest.raises(StoreError, match="bad version"):
        store.register(pkg, "../v0")
    with pytest.raises(StoreError, match="not a directory"):
        store.register(pkg / "config.json")


def test_aliases_and_rollback(store, pkg):
    v1 = store.register(pkg, "v1", aliases=["latest", "production"])
    v2 = store.register(pkg, "v2")
    assert store.aliases() == {"latest": v2, "production": v1}
    store.set_alias("production", v2)
    store.set_alias("production", v2)  # no-op: already there
    assert store.aliases() == {"latest": v2, "production": v2}
    assert json.loads(store.get_bytes("models/_aliases/production.json"))["history"] == [v1]
    assert store.rollback("production") == v1 and store.resolve("production") == v1
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback("production")
    with pytest.raises(NotFound, match="no alias 'staging'"):
        store.rollback("staging")
    store.register(pkg, "v3", aliases="staging")  # a single alias as a string
    assert store.aliases()["staging"] == "v3"


def test_resolve_unknown_name_lists_what_exists(store, pkg):
    store.register(pkg, "v1", aliases=["latest", "production"])
    with pytest.raises(NotFound) as e:
        store.resolve("prod")
    msg = str(e.value)
    assert "'prod'" in msg and "latest -> v1" in msg and "production -> v1" in msg and "Versions: v1" in msg
    with pytest.raises(NotFound, match="../x"):
        store.resolve("../x")


def test_incomplete_version_is_invisible(store, pkg):
    store.put_dir(pkg, "models/v9")  # files without the marker: an interrupted upload
    assert store.versions() == []
    with pytest.raises(StoreError, match="not a complete version"):
        store.set_alias("latest", "v9")
    with pytest.raises(NotFound):
        store.resolve("v9")
    with pytest.raises(StoreError, match="already exists"):
        store.register(pkg, "v9")


def test_history_is_bounded(store, pkg):
    store.history_limit = 3
    vs = [store.register(pkg, f"v{i}") for i in range(6)]
    assert json.loads(store.get_bytes("models/_aliases/latest.json"))["history"] == vs[2:5]


def test_fetch_model(store, pkg, tmp_path):
    v = store.register(pkg)
    got = store.fetch_model("latest", cache_dir=tmp_path / "cache")
    assert got == tmp_path / "cache" / v
    assert files(got) == {**files(pkg), "_COMPLETE": store.get_bytes(f"models/{v}/_COMPLETE")}
    # a complete copy is reused without asking the store for files
    orig, store.get_file = store.get_file, lambda *a: pytest.fail("downloaded again")
    assert store.fetch_model(v, cache_dir=tmp_path / "cache") == got
    # a damaged copy is fetched again
    store.get_file = orig
    (got / "model.safetensors").write_bytes(b"trunc")
    assert (
        files(store.fetch_model(v, cache_dir=tmp_path / "cache"))["model.safetensors"]
        == (pkg / "model.safetensors").read_bytes()
    )
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [v]  # no temporary folders left


def test_fetch_model_default_cache(store, pkg, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE", str(tmp_path / "vc"))
    v = store.register(pkg)
    got = store.fetch_model("latest")
    if isinstance(store, LocalStore):
        assert got == store.root / "models" / v
    else:
        assert got.parent.parent == tmp_path / "vc" / "models" and got.name == v
    assert (got / "_COMPLETE").exists() and files(got)["config.json"] == (pkg / "config.json").read_bytes()


# -- concurrency --


def _race_worker(uri: str, pkg: str, worker: int, moves: int) -> list[str]:
    "Register two versions (each moves `latest`), then move `latest` between them; return the moves in order."
    st = open_store(uri, timeout=10)
    a = st.register(pkg, f"w{worker}-a")
    b = st.register(pkg, f"w{worker}-b")
    done = [a, b]
    for i in range(moves):
        v = a if i % 2 == 0 else b
        st.set_alias("latest", v)
        done.append(v)
    return done


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_race_on_alias(store, pkg, mode):
    workers, moves = 4, 8
    store.put_dir(pkg, "models/incomplete")
    stop, refused, accepted = threading.Event(), [], []

    def saboteur():  # keeps trying to point latest at an incomplete version
        while not stop.is_set():
            try:
                store.set_alias("latest", "incomplete")
                accepted.append(1)
            except StoreError:
                refused.append(1)

    sab = threading.Thread(target=saboteur)
    sab.start()
    args = [(store.uri, str(pkg), w, moves) for w in range(workers)]
    try:
        if mode == "threads":
            with ThreadPoolExecutor(workers) as ex:
                results = list(ex.map(lambda a: _race_worker(*a), args))
        else:
            with get_context("spawn").Pool(workers) as pool:
                results = pool.starmap_async(_race_worker, args).get(timeout=300)
                pool.close()
                pool.join()  # let the workers exit on their own: Pool.__exit__ would SIGTERM them, which
                # can leave one hanging under coverage's SIGTERM handler
    finally:
        stop.set()
        sab.join()
    assert refused and not accepted
    doc = json.loads(store.get_bytes("models/_aliases/latest.json"))
    seq = doc["history"] + [doc["version"]]
    assert len(seq) == workers * (moves + 2) < store.history_limit  # every move landed once
    for w, done in enumerate(results):  # ... and in each writer's order
        assert [v for v in seq if v.startswith(f"w{w}-")] == done
    assert set(seq) <= set(store.versions()) and "incomplete" not in seq


# -- opening, failing fast --


def test_open_store_uris(tmp_path, monkeypatch, gcs_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VIT_STORE", raising=False)
    assert open_store().uri == str(tmp_path / "artifacts") and not (tmp_path / "artifacts").exists()
    monkeypatch.setenv("VIT_STORE", str(tmp_path / "elsewhere"))
    assert isinstance(open_store(), LocalStore) and open_store().uri == str(tmp_path / "elsewhere")
    assert open_store(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    monkeypatch.setenv("VIT_STORE", gcs_uri + "/")
    st = open_store()
    assert isinstance(st, GCSStore) and st.uri == gcs_uri
    for bad, msg in [("s3://b/x", "unsupported store uri"), ("gs://", "bad GCS uri"), ("gs://B_/x", "bad GCS uri")]:
        with pytest.raises(StoreError, match=msg):
            open_store(bad)


def test_missing_bucket(gcs_uri):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        open_store("gs://no-such-bucket/x")


def test_no_credentials(tmp_path, monkeypatch):
    for k in ["STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"]:
        monkeypatch.delenv(k, raising=False)
    for k in ["HOME", "CLOUDSDK_CONFIG"]:
        monkeypatch.setenv(k, str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on GCE: do not probe the metadata server
    with pytest.raises(StoreError, match="no usable Google credentials for gs://bkt/x"):
        open_store("gs://bkt/x", timeout=2)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_emulator_fails_fast(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(
        StoreError, match=r"cannot reach gs://bkt/prefix: connection refused \(is STORAGE_EMULATOR_HOST"
    ):
        open_store("gs://bkt/prefix", timeout=3)
    assert time.monotonic() - t0 < 15


def test_hung_emulator_fails_fast(gcs_emulator, gcs_uri, pkg):
    st = open_store(gcs_uri, timeout=2)
    st.register(pkg, "v1")
    with gcs_emulator.paused():
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="cannot reach .*timed out"):
            st.resolve("latest")
        assert time.monotonic() - t0 < 15
    assert st.resolve("latest") == "v1"  # back once the server answers again


def test_emulator_restart(gcs_emulator, gcs_uri):
    open_store(gcs_uri).put_bytes("x", b"1")
    with gcs_emulator.down():
        with pytest.raises(StoreError, match="connection refused"):
            open_store(gcs_uri, timeout=1)
    st = open_store(gcs_uri)  # back, and empty: the in-memory backend starts afresh
    assert st.list() == []
