"""The OpenVINO engines on the shipped (trained) checkpoint: made from the ONNX graph, checked against fp32 and chosen
by the same rule as every other engine, made once by `vit-models export` (the suite's one export, `engine_export` in
conftest.py, NNCF's calibration included); the CUDA engines are not offered without a GPU, and asking for one says
why."""

import pytest
import torch

from vit_nbdev.config import CHECKPOINTS, ENGINES
from vit_nbdev.data import preprocess
from vit_nbdev.engine import (
    CHECK_N,
    MAX_DROP,
    MIN_AGREEMENT,
    REFERENCE_ENGINE,
    build_engine,
    candidate_names,
    check_set,
    choose_engine,
    engine_key,
    engines_prefix,
    openvino_available,
    openvino_precision,
    read_check,
)
from vit_nbdev.model import load_package
from vit_nbdev.store import open_store

SHIPPED = CHECKPOINTS / "vit-cifar-small-cifar10"
pytestmark = pytest.mark.skipif(not openvino_available(), reason="the `openvino` extra is not installed")


@pytest.fixture(scope="module", autouse=True)
def cache(engine_cache):
    "The engine tests' VIT_CACHE (conftest.py): the export decoded the held-out images there."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIT_CACHE", str(engine_cache))
        yield


@pytest.fixture(scope="module")
def shipped():
    return load_package(SHIPPED)


@pytest.fixture(scope="module")
def checked(engine_export, tmp_path_factory):
    "fp32 and the OpenVINO engines as the export stored them (artifacts and checks), alone in a folder of their own."
    uri, version, _ = engine_export
    st, folder = open_store(uri), tmp_path_factory.mktemp("engines")
    names = [REFERENCE_ENGINE, f"openvino-{openvino_precision()}", "openvino-int8"]
    for key in [k for n in names for k in st.list(f"{engines_prefix(version)}{engine_key(n)}/")]:
        st.get_file(key, folder / key[len(engines_prefix(version)) :])
    return folder, {n: read_check(folder, n) for n in names}


def test_offered_at_the_runtimes_default_precision_and_int8():
    offered = {n for n in candidate_names() if ENGINES[n][0] == "openvino"}
    assert offered == {f"openvino-{openvino_precision()}", "openvino-int8"}


def test_checked_by_the_same_rule(checked):
    _, checks = checked
    for c in checks.values():
        assert c["images"] == CHECK_N and c["eligible"] == (c["agreement"] >= MIN_AGREEMENT and c["drop"] <= MAX_DROP)
    assert checks[f"openvino-{openvino_precision()}"]["agreement"] >= 0.99  # bf16 or fp32 of a trained model


def test_chosen_by_measurement_among_the_checked(shipped, checked):
    folder, checks = checked
    c = choose_engine(shipped, folder=folder, threads=1, budget_s=0, min_s=0.05)  # budget 0: no other checks now
    eligible = {n for n, k in checks.items() if k["eligible"]}
    assert {r["name"] for r in c.report["candidates"]} == eligible and c.engine.name in eligible
    pinned = choose_engine(shipped, pin="openvino-int8", folder=folder, threads=1, min_s=0.05)
    assert pinned.engine.name == "openvino-int8" and pinned.report["selected_by"] == "VIT_ENGINE"
    images, _ = check_set(shipped, 8)
    emb, logits = pinned.engine(preprocess(images, shipped.preprocess))
    assert emb.dtype == logits.dtype == torch.float32 and logits.shape == (8, 10)


def test_made_once_by_vit_models_export(engine_export):
    uri, version, _ = engine_export
    for name in (f"openvino-{openvino_precision()}", "openvino-int8"):
        kept = open_store(uri).list(f"{engines_prefix(version)}{engine_key(name)}/")
        assert {k.rsplit("/", 1)[1] for k in kept} == {"model.xml", "model.bin", "check.json"}, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_engines_not_offered_without_a_gpu(shipped):
    assert not [n for n in candidate_names() if ENGINES[n][0] == "cuda"]
    for name in ("cuda-fp16", "cuda-bf16"):
        with pytest.raises(RuntimeError, match=f"'{name}' needs a CUDA GPU: torch.cuda.is_available"):
            build_engine(name, shipped)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        choose_engine(shipped, pin="cuda-fp16", threads=1)
