"""`gptlab convert SRC --to hf|gptlab DST`: move weights between gptlab and the Hugging Face format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DTYPE_NAMES


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert weights: any source gptlab loads -> Hugging Face or gptlab format")
    p.add_argument("src", help="anything --model accepts: a GPT-2 name, an OpenAI / Hugging Face / gptlab folder, "
                   "a run folder, or a book .pth")
    p.add_argument("--to", required=True, choices=("hf", "gptlab"),
                   help="output format (hf: weights, config, generation config and tokenizer files for transformers)")
    p.add_argument("dst", help="output folder; must be empty or new (or give --force)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="store weights in this dtype")
    p.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    p.set_defaults(func=run)


def check_destination(dst: Path, force: bool) -> None:
    """Refuse a destination that is a file, a training run, or (without --force) a folder with files in it."""
    from ..errors import UsageError
    from ..training.checkpoint import CHECKPOINT_NAME
    from ..training.run import TRAIN_CONFIG_NAME

    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} is a file; give a folder to convert into")
    if not dst.is_dir():
        return
    if (dst / TRAIN_CONFIG_NAME).exists() or (dst / CHECKPOINT_NAME).exists():
        raise UsageError(f"{dst} is a training run folder; convert into another folder (a run's own weights "
                         "are its training state)")
    entries = sorted(p.name for p in dst.iterdir())
    if entries and not force:
        shown = ", ".join(entries[:3]) + (" ..." if len(entries) > 3 else "")
        raise UsageError(f"{dst} already holds files ({shown}); choose an empty or new folder, or pass --force "
                         "to overwrite them")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pretrained import load_pretrained, save_hf
    from ..pretrained.native import save_model

    dst = Path(args.dst)
    check_destination(dst, args.force)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_pretrained(args.src, device="cpu", dtype=dtype)
    if args.to == "hf":
        save_hf(model, dst)
    else:
        save_model(model, dst)
    n = model.num_parameters()
    print(f"wrote {dst} ({args.to} format, {n:,} parameters)", file=sys.stderr)
    return 0
