"""`gptlab info`: a model's config, parameter count and memory needs."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's config, size and memory needs")
    p.add_argument("--model", required=True, help="preset name (e.g. gpt2-small) or a config.json path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    from ..model import model_info
    from ..pretrained.resolve import resolve_config

    config = resolve_config(args.model)
    info = model_info(config)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model: {args.model}")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    print(f"parameters: {info['parameters']:,}")
    print(f"non-embedding parameters: {info['non_embedding_parameters']:,}")
    print(f"weights fp32: {_gib(info['weights_fp32_bytes'])}   bf16: {_gib(info['weights_bf16_bytes'])}")
    print(
        f"training with AdamW (fp32 weights, grads, 2 moments): {_gib(info['train_adamw_fp32_bytes'])} "
        "plus activations"
    )
    return 0
