"""The three training loops the training benchmarks compare, each timed over the same steps.

- `ours`: `vit_nbdev.train.train` (uint8 tensors on the device, `preprocess` + augmentation per batch, Accelerate).
- `seed`: the seed project's recipe: HF `Trainer`, a `datasets` dataset whose `with_transform` runs
  `ViTImageProcessor` on PIL images per batch.
- `bare`: a plain PyTorch loop on inputs preprocessed in advance (the ceiling: no data work at all).

All three use the same model preset, data, batch size, AdamW, clipping and cosine schedule.
"""

import tempfile, time
import torch, torch.nn.functional as F
from transformers import Trainer, TrainingArguments, ViTImageProcessor, get_cosine_schedule_with_warmup
from vit_nbdev.data import load_cifar10, preprocess, SAMPLE_DIR
from vit_nbdev.model import build_model
from vit_nbdev.train import TrainConfig, train


def ours(model_name, dataset, steps, batch, mixed_precision="no", **kw) -> float:
    "Images/s of our loop (training steps only; evaluation excluded)."
    with tempfile.TemporaryDirectory() as t:
        r = train(
            TrainConfig(
                model=model_name,
                dataset=dataset,
                max_steps=steps,
                batch_size=batch,
                eval_every=10**9,
                checkpoint_every=0,
                log_every=max(1, steps // 2),
                tracker="none",
                store=f"{t}/store",
                checkpoint_dir=f"{t}/ck",
                mixed_precision=mixed_precision,
                warmup_steps=0,
                **kw,
            )
        )
    return r.metrics["images_per_s"]


def seed(model_name, dataset, steps, batch, fp16=False, bf16=False) -> float:
    "Images/s of the seed recipe: `Trainer` + `ViTImageProcessor` through `with_transform`."
    from datasets import load_dataset

    loc = str(SAMPLE_DIR) if dataset == "sample" else dataset
    ds = load_dataset(loc, split="train")
    model, pre = build_model(model_name)
    proc = ViTImageProcessor(
        size={"height": pre.image_size, "width": pre.image_size}, image_mean=list(pre.mean), image_std=list(pre.std)
    )

    def transform(b):
        out = proc([im.convert("RGB") for im in b["img"]], return_tensors="pt")
        out["labels"] = b["label"]
        return out

    ds = ds.with_transform(transform)
    collate = lambda rows: {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "labels": torch.tensor([r["labels"] for r in rows]),
    }
    with tempfile.TemporaryDirectory() as t:
        args = TrainingArguments(
            t,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=1e-3,
            weight_decay=0.05,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            fp16=fp16,
            bf16=bf16,
            report_to=[],
            eval_strategy="no",
            save_strategy="no",
            logging_steps=10**9,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        out = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate).train()
    return out.metrics["train_samples_per_second"]


def bare(model_name, dataset, steps, batch, autocast_dtype=None) -> float:
    "Images/s of a plain PyTorch loop on inputs preprocessed ahead of time (the ceiling)."
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_cifar10(dataset, progress=False)
    model, pre = build_model(model_name)
    model.to(dev).train()
    need = steps * batch
    x = preprocess(
        data.train.images[:need].repeat(1 + need // len(data.train), 1, 1, 1)[:need], pre
    )  # decoded and normalised up front
    y = data.train.labels[:need].repeat(1 + need // len(data.train))[:need]
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=dev == "cuda")
    sched = get_cosine_schedule_with_warmup(opt, 0, steps)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        with torch.autocast(dev, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(xb).logits.float(), yb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return steps * batch / (time.perf_counter() - t)
