"""The data module on the installed package: sources, fingerprints, the decode-once cache, bad rows, preprocess."""
import os, shutil, subprocess, sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq, pytest, torch
import vit_nbdev.data as D
from vit_nbdev.data import load_cifar10, preprocess, PreprocessConfig, SAMPLE_DIR, fingerprint_files

SHARED = Path(__file__).resolve().parents[2]/"shared"/"data"/"cifar10"

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE", str(tmp_path/"cache"))
    return tmp_path/"cache"

def test_sample_is_small_balanced_and_split(cache):
    size = sum(f.stat().st_size for f in SAMPLE_DIR.glob("*.parquet"))
    assert size < 5e6, "a few MB at most"
    d = load_cifar10()
    assert d.info()["splits"] == {"train": 4000, "validation": 1000, "test": 1000}
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(torch.cat([d.train.labels, d.validation.labels])).tolist() == [500] * 10
    assert (cache/"datasets"/d.fingerprint/"meta.json").exists()

def test_cached_reload_does_not_decode(cache, monkeypatch):
    first = load_cifar10(progress=False)
    monkeypatch.setattr(D, "decode_split", lambda *a, **k: pytest.fail("decoded twice"))
    again = load_cifar10(progress=False)
    assert torch.equal(first.test.images, again.test.images) and first.fingerprint == again.fingerprint

def test_fingerprint_is_content_not_path(cache, tmp_path):
    copy = shutil.copytree(SAMPLE_DIR, tmp_path/"copy")
    local = load_cifar10(str(copy), progress=False)
    assert local.fingerprint == load_cifar10(progress=False).fingerprint and local.source == str(copy)
    t = pq.read_table(copy/"test-00000-of-00001.parquet")
    pq.write_table(t.slice(1), copy/"test-00000-of-00001.parquet")            # change the content
    assert fingerprint_files(D._data_files(copy)) != local.fingerprint

def _corrupt(tmp_path, split, row, *, img=None, label=None):
    d = shutil.copytree(SAMPLE_DIR, tmp_path/"bad")
    f = d/f"{split}-00000-of-00001.parquet"
    t = pq.read_table(f)
    rows = t.to_pylist()
    if img is not None: rows[row]["img"] = {"bytes": img, "path": None}
    if label is not None: rows[row]["label"] = label
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
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "HF_HOME": str(tmp_path/"hf"), "VIT_CACHE": str(tmp_path/"c")}, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "could not load dataset 'uoft-cs/cifar10'" in p.stderr and "dataset='sample'" in p.stderr
    assert time.time() - t < 60

def test_missing_folder_is_refused():
    with pytest.raises(FileNotFoundError, match="does not exist"): load_cifar10("./no/such/folder")

@pytest.mark.skipif(not SHARED.exists(), reason="the full CIFAR-10 is not next to this checkout")
def test_full_data_splits_40k_10k_10k(cache):
    d = load_cifar10(str(SHARED), progress=False)
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
    with pytest.raises(ValueError, match="uint8"): preprocess(x.float(), cfg)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_preprocess_on_cuda_matches_cpu(cache):
    x = load_cifar10(progress=False).test.images[:16]
    cfg = PreprocessConfig(image_size=224)
    assert torch.allclose(preprocess(x.cuda(), cfg).cpu(), preprocess(x, cfg), atol=1e-4)
