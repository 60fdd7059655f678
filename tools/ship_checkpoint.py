"""Ship a registered model as a checkpoint inside the package (`vit_nbdev/checkpoints/<name>/`): the release step of the
pretraining run (see configs/pretrain-small-gpu.yaml and the train chapter).

    python bench/gpu_pretrain.py --data /path/to/cifar10 --epochs 30 --out gpu-out     # on a GPU: the run that shipped
    mkdir st && tar xzf gpu-out/store.tgz -C st
    python tools/ship_checkpoint.py --store st --model pretrain --record gpu-out/<run_id>.ipynb

The weights go in fp16 (they load back as fp32), with the config, the preprocessing, the card (data fingerprint,
params, metrics, code commit, device) and the executed training notebook as the run record (a resumed run: every part,
in order). A stage trained from the shipped checkpoint (`-p model vit-cifar-small-cifar10`) keeps the one it replaces
under `lineage/`.
"""

import argparse, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", default="pretrain", help="alias or version (default: pretrain)")
    ap.add_argument(
        "--record",
        required=True,
        nargs="+",
        help="the executed training notebook(s), in order (vit-train's runs/<run-id>.ipynb)",
    )
    ap.add_argument(
        "--code-commit", default=None, help="the commit the run trained with, where its card could not tell"
    )
    ap.add_argument("--name", default="vit-cifar-small-cifar10")
    ap.add_argument("--note", default=None)
    ap.add_argument("--max-mb", type=float, default=8.0, help="refuse weights larger than this (default 8)")
    a = ap.parse_args(argv)
    from vit_nbdev.model import ship_checkpoint
    from vit_nbdev.store import open_store

    st = open_store(a.store)
    out = ship_checkpoint(
        st.fetch_model(a.model),
        ROOT / "vit_nbdev" / "checkpoints" / a.name,
        run_records=a.record,
        note=a.note,
        code_commit=a.code_commit,
    )
    mb = (out / "model.safetensors").stat().st_size / 1e6
    card = json.loads((out / "card.json").read_text())
    print(
        f"{out}: weights {mb:.2f} MB; version {card.get('version')}, "
        f"test acc {card.get('metrics', {}).get('test_acc')}, "
        f"device {card.get('device', card.get('shipped', {}).get('note'))}"
    )
    if mb > a.max_mb:
        print(f"too large: {mb:.1f} MB > {a.max_mb} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
