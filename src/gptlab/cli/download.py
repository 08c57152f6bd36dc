"""`gptlab download NAME`: fetch GPT-2's weights (OpenAI's files or Hugging Face's) into the cache."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("download", help="download GPT-2's pretrained weights (resumable)")
    p.add_argument("name", help="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl (or 124M, 355M, 774M, 1558M)")
    p.add_argument("--source", choices=("openai", "huggingface"), default="openai",
                   help="OpenAI's original TensorFlow files (default) or Hugging Face's safetensors")
    p.add_argument("--dir", default=None, help="folder to download into (default: the cache, $GPTLAB_HOME)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrained.download import download_model, files_for, require_gpt2

    key = require_gpt2(args.name)
    folder = download_model(key, args.source, args.dir)
    files = {f: (folder / f).stat().st_size for f in files_for(args.source)}
    if args.json:
        print(json.dumps({"model": key, "source": args.source, "folder": str(folder), "files": files}))
    else:
        print(f"{key} ({args.source}): {sum(files.values()) / 1e6:.1f} MB in {folder}", file=sys.stderr)
        print(folder)
    return 0
