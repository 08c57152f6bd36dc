"""`gptlab prepare`: tokenize text files or folders into train.bin / val.bin / meta.json."""

from __future__ import annotations

import argparse
import json
import sys

from .common import fraction_open, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text files or folders into memory-mapped token files for training",
        description=(
            "Each file is one document, followed by <|endoftext|>. val.bin holds the last --val-fraction "
            "of all tokens (files in the order given, folders sorted by path), train.bin the rest. Token ids are "
            "stored as uint16 while the vocabulary fits (65,536 tokens), else as uint32; meta.json records the "
            "tokenizer, and a tokenizer other than gpt2 is stored in DIR too, so gptlab train --data DIR uses it."
        ),
    )
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders (UTF-8)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for train.bin, val.bin and meta.json")
    p.add_argument("--val-fraction", type=fraction_open, default=0.1, help="share of tokens for val.bin (0.1)")
    p.add_argument("--tokenizer", default="gpt2", metavar="DIR",
                   help="gpt2 (the default), or a folder holding a tokenizer (made by gptlab tokenizer train, or a "
                   "model or run folder: the model's tokenizer)")
    p.add_argument(
        "--workers", type=positive_int, default=None, help="tokenizer processes (default: the CPUs available, at most 8)"
    )
    p.add_argument("--force", action="store_true", help="replace a dataset already prepared in DIR")
    p.add_argument("--json", action="store_true", help="print meta.json's content as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import default_workers, prepare_dataset

    workers = args.workers or default_workers()
    meta = prepare_dataset(
        args.data, args.out, val_fraction=args.val_fraction, workers=workers, force=args.force,
        tokenizer=args.tokenizer,
    )
    if args.json:
        print(json.dumps(meta))
    else:
        print(
            f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
            f"from {meta['documents']} file(s), tokenizer {meta['tokenizer']} ({meta['dtype']})",
            file=sys.stderr,
        )
    return 0
