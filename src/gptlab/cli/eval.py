"""`gptlab eval`: loss, perplexity and bits per byte of a model on text, every token scored exactly once."""

from __future__ import annotations

import argparse
import json
import sys

from .common import MODEL_HELP, add_device_arg, pick_device, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a model on text",
        description="Score text with a model, tokenized with the model's own tokenizer. Texts longer than the "
        "context are scored with sliding windows: each window moves on by --stride tokens and only its new tokens "
        "are scored, so every token after the first is scored exactly once, with at least (context - stride) "
        "tokens of context. Bits per byte = the summed cross-entropy in bits / the UTF-8 bytes of the scored "
        "tokens (<|endoftext|> counts 0 bytes): unlike loss and perplexity, it compares models whose tokenizers "
        "differ.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders or corpus names; a folder made by gptlab prepare: its val.bin")
    src.add_argument("--text", help="the text to score")
    p.add_argument("--context-length", type=positive_int, help="window length (the model's context)")
    p.add_argument("--stride", type=positive_int, help="new tokens per window (half the context)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (8)")
    p.add_argument("--json", action="store_true", help='print {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} as JSON')
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.prepared import prepared_folder
    from ..data.text import load_documents, tokenize_documents
    from ..data.tokenfile import read_split
    from ..errors import UsageError
    from ..evaluate import score_tokens
    from ..pretrained import model_tokenizer
    from ..pretrained.resolve import load_model_arg

    if args.text is not None and not args.text.strip():
        raise UsageError("--text is empty; give some text to score")
    tokenizer = model_tokenizer(args.model)  # from the model's files, before its weights are read
    if args.text is not None:
        ids = tokenize_documents([args.text], tokenizer)
    else:
        folder = prepared_folder(args.data)
        ids = read_split(folder, "val", tokenizer) if folder is not None else \
            tokenize_documents(load_documents(args.data), tokenizer)
    device = pick_device(args, quiet=args.json)
    if device.type == "cpu":
        from ..hardware import keep_freed_memory

        keep_freed_memory()  # scoring many windows re-allocates the same activations (gptlab.hardware)
    model = load_model_arg(args.model, device, purpose="eval")
    result = score_tokens(model, ids, device=device, context_length=args.context_length, stride=args.stride,
                          batch_size=args.batch_size, tokenizer=tokenizer)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits per byte {result.bits_per_byte:.4f}  "
              f"tokens {result.tokens:,}  bytes {result.bytes:,}")
    sys.stdout.flush()
    return 0
