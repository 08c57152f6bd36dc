"""`gptlab info`: a model's config, parameter count and memory needs."""

from __future__ import annotations

import argparse
import json

from .common import MODEL_HELP


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's config, size and memory needs")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    from ..model import model_info
    from ..pretrained import model_tokenizer
    from ..pretrained.download import canonical_gpt2
    from ..pretrained.resolve import is_random_spec, resolve_config

    config = resolve_config(args.model)
    info = model_info(config)
    tokenizer = model_tokenizer(args.model)
    info["tokenizer"] = {"name": tokenizer.name, "vocab_size": tokenizer.n_vocab, "eot_id": tokenizer.eot_id}
    if args.json:
        print(json.dumps(info))
        return 0
    if is_random_spec(args.model):
        weights = "random (untrained)"
    elif canonical_gpt2(args.model):
        weights = "OpenAI's trained weights (downloaded on first use)"
    else:
        weights = f"the saved weights in {args.model}"
    print(f"model: {args.model}; weights: {weights}; tokenizer: {tokenizer.name} ({tokenizer.n_vocab:,} tokens)")
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
