"""The data module on the installed package: sources, fingerprints, the decode-once cache, bad rows, preprocess,
snapshots in the store, `vit-data`."""

import json, os, shutil, subprocess, sys, time
from types import SimpleNamespace
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq, pytest, torch
import vit_nbdev.data as D
from devtools import in_process
from vit_nbdev.data import load_cifar10, preprocess, PreprocessConfig, SAMPLE_DIR, fingerprint_files
from vit_nbdev.data import (
    CIFAR10_LABELS,
    add_train,
    has_snapshot,
    list_snapshots,
    load_splits,
    read_snapshot,
    snapshot_dataset,
    write_snapshot,
)
from vit_nbdev.cli import data_main
from vit_nbdev.store import MARKER, open_store

# the full CIFAR-10 as a hub-layout parquet folder, where a machine has one (else the test that needs it is skipped)
FULL = Path(os.environ["VIT_FULL_CIFAR10"]) if os.environ.get("VIT_FULL_CIFAR10") else None
BIN = Path(sys.executable).parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sample_is_small_balanced_and_split(cache):
    size = sum(f.stat().st_size for f in SAMPLE_DIR.glob("*.parquet"))
    assert size < 5e6, "a few MB at most"
    d = load_cifar10()
    assert d.info()["splits"] == {"train": 4000, "validation": 1000, "test": 1000}
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(torch.cat([d.train.labels, d.validation.labels])).tolist() == [500] * 10
    assert (cache / "datasets" / d.fingerprint / "meta.json").exists()


def test_cached_reload_does_not_decode(cache, monkeypatch):
    first = load_cifar10(progress=False)
    monkeypatch.setattr(D, "decode_split", lambda *a, **k: pytest.fail("decoded twice"))
    again = load_cifar10(progress=False)
    assert torch.equal(first.test.images, again.test.images) and first.fingerprint == again.fingerprint


def test_fingerprint_is_content_not_path(cache, tmp_path):
    copy = shutil.copytree(SAMPLE_DIR, tmp_path / "copy")
    local = load_cifar10(str(copy), progress=False)
    assert local.fingerprint == load_cifar10(progress=False).fingerprint and local.source == str(copy)
    t = pq.read_table(copy / "test-00000-of-00001.parquet")
    pq.write_table(t.slice(1), copy / "test-00000-of-00001.parquet")  # change the content
    assert fingerprint_files(D._data_files(copy)) != local.fingerprint


def _corrupt(tmp_path, split, row, *, img=None, label=None):
    d = shutil.copytree(SAMPLE_DIR, tmp_path / "bad")
    f = d / f"{split}-00000-of-00001.parquet"
    t = pq.read_table(f)
    rows = t.to_pylist()
    if img is not None:
        rows[row]["img"] = {"bytes": img, "path": None}
    if label is not None:
        rows[row]["label"] = label
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), f)
    return d


def test_undecodable_image_names_split_and_row(cache, tmp_path):
    with pytest.raises(ValueError, match=r"split 'test' row 7: cannot decode"):
        load_cifar10(str(_corrupt(tmp_path, "test", 7, img=b"\xff\xd8 truncated jpeg")), progress=False)


def test_out_of_range_label_names_split_and_row(cache, tmp_path):
    with pytest.raises(ValueError, match=r"split 'train' row 42: label 11"):
        load_cifar10(str(_corrupt(tmp_path, "train", 42, label=11)), progress=False)


def test_hub_id_offline_gives_a_clear_error(tmp_path):
    code = "from vit_nbdev.data import load_cifar10; load_cifar10('uoft-cs/cifar10')"
    t = time.time()
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),
            "VIT_CACHE": str(tmp_path / "c"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        p.returncode != 0 and "could not load dataset 'uoft-cs/cifar10'" in p.stderr and "dataset='sample'" in p.stderr
    )
    assert time.time() - t < 60


def test_missing_folder_is_refused():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10("./no/such/folder")


@pytest.mark.skipif(
    not (FULL and FULL.is_dir()), reason="set VIT_FULL_CIFAR10 to a parquet folder of the full CIFAR-10"
)
def test_full_data_splits_40k_10k_10k(cache):
    d = load_cifar10(str(FULL), progress=False)
    assert d.info()["splits"] == {"train": 40000, "validation": 10000, "test": 10000}


def test_preprocess_contract(cache):
    x = load_cifar10(progress=False).test.images[:16]
    cfg = PreprocessConfig(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    y = preprocess(x, cfg)
    assert y.shape == (16, 3, 224, 224) and y.dtype == torch.float32 and -1.01 <= y.min() and y.max() <= 1.01
    big = torch.nn.functional.interpolate(x.float(), size=(300, 300), mode="bilinear").round().to(torch.uint8)
    assert preprocess(big, cfg).shape == (16, 3, 224, 224)
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(preprocess(x, cfg, train=True, generator=g()), preprocess(x, cfg, train=True, generator=g()))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(x.float(), cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_preprocess_on_cuda_matches_cpu(cache):
    x = load_cifar10(progress=False).test.images[:16]
    cfg = PreprocessConfig(image_size=224)
    assert torch.allclose(preprocess(x.cuda(), cfg).cpu(), preprocess(x, cfg), atol=1e-4)


# -- snapshots: the decoded splits kept in the store under datasets/<fingerprint>/ --


def _tiny(n_train=12, n_test=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x, y = (
        torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n,), generator=g),
    )
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}


def test_snapshot_write_read_and_load(cache, tmp_path):
    st = open_store(tmp_path / "store")
    meta = snapshot_dataset(st, "sample", progress=False)
    fp = meta["fingerprint"]
    assert meta["written"] and meta["snapshot"] == f"datasets/{fp}" and meta["splits"] == {"train": 5000, "test": 1000}
    assert (
        meta["label_names"] == CIFAR10_LABELS
        and meta["source"] == "sample"
        and meta["kind"] == "source"
        and meta["created"]
    )
    assert set(st.list(f"datasets/{fp}/")) == {
        f"datasets/{fp}/{f}" for f in ("train.safetensors", "test.safetensors", "meta.json", MARKER)
    }
    marker = json.loads(st.get_bytes(f"datasets/{fp}/{MARKER}"))
    assert marker["fingerprint"] == fp and set(marker["files"]) == {
        "train.safetensors",
        "test.safetensors",
        "meta.json",
    }
    raw, lineage = load_splits("sample", progress=False)
    tensors, smeta = read_snapshot(st, fp)
    assert lineage["fingerprint"] == fp and smeta["fingerprint"] == fp
    for s in ("train", "test"):
        assert torch.equal(tensors[s][0], raw[s][0]) and torch.equal(tensors[s][1], raw[s][1])
    assert [r["fingerprint"] for r in list_snapshots(st)] == [fp]


def test_store_source_gives_the_source_splits_bit_for_bit(cache, tmp_path, monkeypatch):
    st = open_store(tmp_path / "store")
    fp = snapshot_dataset(st, "sample", progress=False)["fingerprint"]
    src = load_cifar10(val_fraction=0.25, seed=3, progress=False)
    snap = load_cifar10(f"store:{fp}", val_fraction=0.25, seed=3, progress=False, store=st)
    for s in ("train", "validation", "test"):
        assert torch.equal(getattr(snap, s).images, getattr(src, s).images) and torch.equal(
            getattr(snap, s).labels, getattr(src, s).labels
        )
    info = snap.info()
    assert (
        info["fingerprint"] == src.fingerprint and info["snapshot"] == f"datasets/{fp}" and info["source"] == "sample"
    )
    assert info["splits"] == src.info()["splits"]
    monkeypatch.setenv("VIT_STORE", str(tmp_path / "store"))  # no store argument: $VIT_STORE
    assert torch.equal(load_cifar10(f"store:{fp}", progress=False).test.images, src.test.images)


def test_snapshot_is_written_once(cache, tmp_path):
    st = open_store(tmp_path / "store")
    first = snapshot_dataset(st, "sample", progress=False)
    stamp = lambda: {k: ((s := (st.root / k).stat()).st_ino, s.st_mtime_ns, s.st_size) for k in st.list("datasets/")}
    files = stamp()
    again = snapshot_dataset(st, "sample", progress=False)
    assert not again["written"] and again["created"] == first["created"]
    assert (
        write_snapshot(st, first["fingerprint"], _tiny(), {"source": "other", "label_names": CIFAR10_LABELS})
        == first["snapshot"]
    )
    assert stamp() == files  # nothing rewritten, nothing added


def test_incomplete_or_unknown_snapshot_is_refused(cache, tmp_path):
    st = open_store(tmp_path / "store")
    p = write_snapshot(st, "fb-1", _tiny(), {"kind": "feedback", "source": "test", "label_names": CIFAR10_LABELS})
    assert p == "datasets/fb-1" and has_snapshot(st, "fb-1")
    st.delete(f"{p}/{MARKER}")  # an interrupted write
    assert not has_snapshot(st, "fb-1") and list_snapshots(st) == []
    with pytest.raises(FileNotFoundError, match="'fb-1' .* is incomplete"):
        read_snapshot(st, "fb-1")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_cifar10("store:fb-1", store=st)
    write_snapshot(
        st, "fb-1", _tiny(), {"kind": "feedback", "source": "test", "label_names": CIFAR10_LABELS}
    )  # completed by writing again
    assert read_snapshot(st, "fb-1")[1]["splits"] == {"train": 12, "test": 4}
    with pytest.raises(FileNotFoundError, match=r"no dataset snapshot '0123456789abcdef' .*snapshots there: fb-1"):
        load_cifar10("store:0123456789abcdef", store=st)
    with pytest.raises(ValueError, match="bad snapshot fingerprint"):
        load_cifar10("store:../x", store=st)
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        write_snapshot(
            st,
            "bad",
            {"train": (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 10]))},
            {"source": "x", "label_names": CIFAR10_LABELS},
        )
    with pytest.raises(ValueError, match="needs"):
        write_snapshot(st, "bad", _tiny(), {"label_names": CIFAR10_LABELS})
    assert not st.list("datasets/bad/")


def test_add_train_appends_to_training_only(cache, tmp_path):
    st = open_store(tmp_path / "store")
    write_snapshot(st, "fb-2", _tiny(), {"kind": "feedback", "source": "test", "label_names": CIFAR10_LABELS})
    d = load_cifar10(progress=False)
    more = add_train(d, "store:fb-2", store=st)
    assert len(more.train) == len(d.train) + 12 and torch.equal(more.train.images[-12:], _tiny()["train"][0])
    assert torch.equal(more.validation.images, d.validation.images) and torch.equal(more.test.images, d.test.images)
    assert more.info()["extra_train"] == {
        "source": "store:fb-2",
        "fingerprint": "fb-2",
        "snapshot": "datasets/fb-2",
        "images": 12,
    }
    write_snapshot(st, "fb-3", _tiny(), {"source": "test", "label_names": list(reversed(CIFAR10_LABELS))})
    with pytest.raises(ValueError, match="must be the same"):
        add_train(d, "store:fb-3", store=st)


def _vit_data(*args, env=None):
    return subprocess.run(
        [BIN / "vit-data", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _vit_data_here(*args):
    "`vit-data` in this process, answered as `_vit_data` answers: no process start (torch, pandas) per command."
    code, out, err = in_process(data_main, *(str(a) for a in args))
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_vit_data_command_line(cache, tmp_path):
    "The installed `vit-data` writes the snapshot; the commands after it run in this process (`cache` is its cache)."
    store = tmp_path / "store"
    p = _vit_data("snapshot", "--store", store, env={"VIT_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads(p.stdout)
    assert (
        meta["written"] and meta["splits"] == {"train": 5000, "test": 1000} and has_snapshot(store, meta["fingerprint"])
    )
    copy = shutil.copytree(SAMPLE_DIR, tmp_path / "copy")  # the same content: the same snapshot, not written again
    p = _vit_data_here("snapshot", "--dataset", copy, "--store", store)
    assert p.returncode == 0 and json.loads(p.stdout)["written"] is False, p.stderr[-2000:]
    p = _vit_data_here("snapshots", "--store", store)
    assert p.returncode == 0 and meta["fingerprint"] in p.stdout and "train 5000, test 1000" in p.stdout, p.stderr
    p = _vit_data_here("snapshots", "--json", "--store", store)
    assert [r["fingerprint"] for r in json.loads(p.stdout)] == [meta["fingerprint"]]
    for args, msg in [
        (("snapshot", "--dataset", tmp_path / "no-such-folder", "--store", store), "does not exist"),
        (("snapshot", "--dataset", "store:0123456789abcdef", "--store", store), "no dataset snapshot"),
        (("snapshot", "--store", "s3://bucket/x"), "unsupported store uri"),
        (("snapshot", "--feedback", "--holdout", "1.5", "--store", store), "--holdout must be"),
        (("snapshot", "--feedback", "--dataset", "sample"), "takes no --dataset"),
        (("snapshot", "--since", "2026-01-01"), "go with --feedback"),
    ]:
        p = _vit_data_here(*args)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
        assert len(p.stderr.strip().splitlines()) <= 2, p.stderr  # one line (argparse: usage and the message)


def test_vit_data_help_loads_nothing_heavy():
    code = (
        "import contextlib, io, sys\nfrom vit_nbdev.cli import data_main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    data_main(['snapshot', '--help'])\n"
        "heavy = ('torch', 'pandas', 'numpy', 'google')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('vit_nbdev.')))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "['vit_nbdev.cli', 'vit_nbdev.config']", (p.stdout, p.stderr)
