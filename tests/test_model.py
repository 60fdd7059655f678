"""Model presets, the hub code path on a local checkpoint, and the model package in the wider ecosystem."""

import json, os, subprocess, sys
import pytest, torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, pipeline
from vit_nbdev.data import load_cifar10, preprocess, CIFAR10_LABELS
from vit_nbdev.model import build_model, load_package, save_package, PRESETS, forward_features
from vit_nbdev.train import TrainConfig, train


def test_presets():
    m, p = build_model()
    assert m.config.image_size == 32 and m.config.patch_size == 4 and m.config._attn_implementation == "sdpa"
    b16, p16 = build_model("vit-b16")
    assert p16.image_size == 224 and 85e6 < sum(x.numel() for x in b16.parameters()) < 87e6
    assert [b16.config.id2label[i] for i in range(10)] == CIFAR10_LABELS


def test_hub_code_path_on_a_local_pretrained_checkpoint(tmp_path):
    src = ViTForImageClassification(ViTConfig(**PRESETS["vit-cifar-tiny"], num_labels=1000))
    src.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path
    )
    m, p = build_model(str(tmp_path))
    assert m.classifier.out_features == 10 and p.mean == (0.5, 0.5, 0.5)
    sd, ref = m.vit.state_dict(), src.vit.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_unreachable_hub_id_says_what_to_pass(tmp_path):
    code = "from vit_nbdev.model import build_model; build_model('google/vit-base-patch16-224-in21k')"
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "could not load model" in p.stderr and "vit-cifar-small" in p.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    t = tmp_path_factory.mktemp("run")
    r = train(
        TrainConfig(
            model="vit-cifar-tiny",
            max_steps=5,  # a trained package with its card and metrics: its accuracy does not matter here
            batch_size=64,
            eval_every=5,
            checkpoint_every=0,
            tracker="none",
            store=str(t / "store"),
            checkpoint_dir=str(t / "ck"),
        )
    )
    return r.package_dir


def test_package_round_trip_is_exact(trained):
    pkg = load_package(trained)
    assert pkg.version and pkg.card["dataset"]["fingerprint"] and set(pkg.card["metrics"]) >= {"val_acc", "test_acc"}
    names = {f.name for f in trained.iterdir()}
    assert {"config.json", "model.safetensors", "preprocess.json", "card.json", "preprocessor_config.json"} <= names
    x = preprocess(load_cifar10(progress=False).test.images[:64], pkg.preprocess)
    with torch.inference_mode():
        emb, logits = forward_features(pkg.model, x)
        assert torch.allclose(logits, pkg.model(x).logits, atol=1e-5)


def test_save_then_load_gives_back_the_same_model(tmp_path):
    "The round trip compares the model in memory with the one saved and loaded back: a bug in saving fails it."
    torch.manual_seed(1)
    model, pre = build_model("vit-cifar-tiny")
    model.eval()
    pkg = load_package(save_package(model, pre, tmp_path / "pkg", card={"note": "round trip"}))
    assert pkg.card["note"] == "round trip" and pkg.preprocess == pre and pkg.labels == CIFAR10_LABELS
    saved, loaded = model.state_dict(), pkg.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = preprocess(load_cifar10(progress=False).test.images[:64], pre)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, pkg.model(x).logits)


def test_hf_pipeline_agrees_with_our_top1(trained):
    pkg = load_package(trained)
    imgs = load_cifar10(progress=False).test.images[:200]
    clf = pipeline("image-classification", model=str(trained), device=-1)
    theirs = [r[0]["label"] for r in clf([Image.fromarray(a.permute(1, 2, 0).numpy()) for a in imgs], batch_size=50)]
    with torch.inference_mode():
        ours = [pkg.labels[i] for i in pkg.model(preprocess(imgs, pkg.preprocess)).logits.argmax(-1)]
    assert sum(a == b for a, b in zip(theirs, ours, strict=True)) >= 199, "same top-1 (ties aside)"


def test_shipped_checkpoint_loads_like_a_local_folder(tmp_path, monkeypatch):
    "`ship_checkpoint` writes fp16 weights that come back as fp32; a name under CHECKPOINTS is a model name everywhere."
    import vit_nbdev.config as C
    from vit_nbdev.model import checkpoint_lineage, ship_checkpoint

    torch.manual_seed(2)
    model, pre = build_model("vit-cifar-tiny")
    pkg_dir = save_package(
        model.eval(),
        pre,
        tmp_path / "pkg",
        card={"version": "v-test", "run_id": "stage-1", "metrics": {"test_acc": 0.5}},
    )
    (tmp_path / "record.ipynb").write_text("{}")
    ck = ship_checkpoint(
        pkg_dir, tmp_path / "checkpoints" / "tiny-demo", run_records=[tmp_path / "record.ipynb"], note="test"
    )
    assert (ck / "train.ipynb").exists() and (ck / "model.safetensors").stat().st_size < (
        pkg_dir / "model.safetensors"
    ).stat().st_size * 0.6
    card2 = {
        "version": "v-test-2",
        "run_id": "stage-2",
        "params": {"model": "tiny-demo"},
        "metrics": {"test_acc": 0.6},
        "parent": "tiny-demo",
    }
    stage1_card = json.loads((ck / "card.json").read_text())
    ck2 = ship_checkpoint(
        save_package(model.eval(), pre, tmp_path / "pkg2", card=card2), ck, run_records=[tmp_path / "record.ipynb"] * 2
    )
    assert (
        ck2 == ck and json.loads((ck / "card.json").read_text())["parent"]["version"] == "v-test"
    )  # stage 1 moved to lineage/
    assert sorted(f.name for f in ck.glob("*.ipynb")) == ["train-part1.ipynb", "train.ipynb"]
    assert [c["version"] for c in checkpoint_lineage(ck)] == ["v-test-2", "v-test"] and checkpoint_lineage(ck)[
        1
    ] == stage1_card
    monkeypatch.setattr(C, "CHECKPOINTS", tmp_path / "checkpoints")
    assert C.check_model_name("tiny-demo") == "tiny-demo" and C.shipped_checkpoint("tiny-demo") == ck
    with pytest.raises(ValueError, match="shipped checkpoint \\(tiny-demo\\)"):
        C.check_model_name("tiny-dem0")
    m, p = build_model("tiny-demo")
    assert m.dtype == torch.float32 and p == pre
    x = preprocess(load_cifar10(progress=False).test.images[:32], pre)
    with torch.inference_mode():
        a, b = model(x).logits, m.eval()(x).logits
    assert (a - b).abs().max() < 0.05 and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_the_shipped_pretrained_checkpoint():
    """The checkpoint in the package: a model name like a hub id, its lineage in the card, its run record beside it,
    at most 8 MB."""
    from vit_nbdev.config import CHECKPOINTS, TrainConfig
    from vit_nbdev.model import checkpoint_lineage

    ck = CHECKPOINTS / "vit-cifar-small-cifar10"
    card = json.loads((ck / "card.json").read_text())
    assert card["dataset"]["fingerprint"] and card["dataset"]["splits"]["train"] == 40000 and card["code_commit"]
    assert (
        card["metrics"]["test_acc"] > 0.7 and card["shipped"]["weights"] == "fp16" and card["code_commit"] != "unknown"
    )
    assert (ck / "train.ipynb").exists() and (ck / "model.safetensors").stat().st_size < 8e6
    chain = checkpoint_lineage(ck)  # every stage's card and run record, back to the preset it started from
    assert chain[-1]["params"]["model"] == "vit-cifar-small" and all(
        c["params"]["model"] == "vit-cifar-small-cifar10" for c in chain[:-1]
    )
    assert all(c["dataset"]["fingerprint"] == card["dataset"]["fingerprint"] for c in chain)
    assert all((ck / "lineage" / c["run_id"] / "train.ipynb").exists() for c in chain[1:])
    TrainConfig.from_dict({"model": "vit-cifar-small-cifar10"})
    m, p = build_model("vit-cifar-small-cifar10")
    test = load_cifar10(progress=False).test
    with torch.inference_mode():
        acc = (m.eval()(preprocess(test.images, p)).logits.argmax(-1) == test.labels).float().mean().item()
    assert acc > 0.7, acc  # the sample's test images come from CIFAR-10's test split, which pretraining never saw
