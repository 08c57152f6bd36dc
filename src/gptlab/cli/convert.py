"""`gptlab convert SRC --to hf|gptlab DST`: move weights between gptlab and the Hugging Face format."""

from __future__ import annotations

import argparse
import sys

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert weights: any source gptlab loads -> Hugging Face or gptlab format")
    p.add_argument("src", help="a GPT-2 name, an OpenAI / Hugging Face / gptlab folder, or a book .pth")
    p.add_argument("--to", required=True, choices=("hf", "gptlab"), help="output format")
    p.add_argument("dst", help="output folder (config.json + model.safetensors)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="store weights in this dtype")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pretrained import load_pretrained, save_hf
    from ..pretrained.native import save_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_pretrained(args.src, device="cpu", dtype=dtype)
    if args.to == "hf":
        save_hf(model, args.dst)
    else:
        save_model(model, args.dst)
    n = model.num_parameters()
    print(f"wrote {args.dst} ({args.to} format, {n:,} parameters)", file=sys.stderr)
    return 0
