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


def model_info(config) -> dict:
    import torch

    from ..model import GPTModel

    with torch.device("meta"):  # shapes only: no memory is allocated
        model = GPTModel(config)
    n = model.num_parameters()
    return {
        "config": config.to_dict(),
        "parameters": n,
        "non_embedding_parameters": n - model.tok_emb.weight.numel() - model.pos_emb.weight.numel(),
        "weights_fp32_bytes": 4 * n,
        "weights_bf16_bytes": 2 * n,
        # fp32 weights + fp32 grads + AdamW's two fp32 moments; activations come on top.
        "train_adamw_fp32_bytes": 16 * n,
    }


def run(args: argparse.Namespace) -> int:
    from .models import resolve_config

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
