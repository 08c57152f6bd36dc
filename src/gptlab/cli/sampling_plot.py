"""`gptlab sampling-plot`: what temperature, top-k and top-p do to a model's next-token distribution.

Draws one bar chart per setting (each temperature alone, then with top-k / top-p when given) over
the prompt's most likely next tokens, and prints the same numbers as a table (on stdout, or on
stderr with --json, which prints the table as one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import MODEL_HELP, add_device_arg, finite_float, non_negative_int, pick_device, positive_int
from .generate import top_p_value


def temperature_list(text: str) -> list[float]:
    """Comma-separated temperatures, each >= 0."""
    values = []
    for part in text.split(","):
        if not part.strip():
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
        value = finite_float(part.strip())
        if value < 0:
            raise argparse.ArgumentTypeError(f"temperatures must be >= 0, got {part.strip()}")
        values.append(value)
    return values


def register(sub) -> None:
    p = sub.add_parser("sampling-plot", help="plot next-token probabilities under temperature / top-k / top-p")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="text whose next token is shown ('' = <|endoftext|>), in the model's own tokenizer")
    p.add_argument("--temperatures", type=temperature_list, default=[0.1, 1.0, 5.0],
                   help="comma-separated temperatures (default 0.1,1,5)")
    p.add_argument("--top-k", type=positive_int, default=None, help="also show each temperature with top-k")
    p.add_argument("--top-p", type=top_p_value, default=None, help="also show each temperature with top-p")
    p.add_argument("--candidates", type=positive_int, default=10, help="most likely tokens to show (default 10)")
    p.add_argument("--samples", type=non_negative_int, default=0, help="also draw N samples and count them")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for --samples (default 0)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..errors import UsageError
    from ..generation.explain import explain_sampling, format_table, plot_sampling
    from ..pretrained.resolve import load_model_arg
    from ..tokenizer import token_label, tokenizer_of
    from .generate import prompt_ids_for

    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out}")
    device = pick_device(args, quiet=True)
    model = load_model_arg(args.model, device, purpose="explain")
    tokenizer = tokenizer_of(model)
    ids, warning = prompt_ids_for(args.prompt, model.config.context_length, tokenizer)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if max(ids) >= model.config.vocab_size:
        raise UsageError(f"the prompt has token id {max(ids)}, outside the model's vocabulary of {model.config.vocab_size}")
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device), last_only=True)[0, -1].float().cpu()
    generator = torch.Generator().manual_seed(args.seed)

    def texts(candidates: list[int]) -> list[str]:
        return [tokenizer.decode([c]) for c in candidates]

    def labels(candidates: list[int]) -> list[str]:
        return [token_label(tokenizer.decode_single_token_bytes(c)) for c in candidates]

    table = explain_sampling(
        logits, texts, prompt=args.prompt, temperatures=args.temperatures, top_k=args.top_k, top_p=args.top_p,
        candidates=args.candidates, samples=args.samples, generator=generator, candidate_labels_of=labels,
    )
    plot_sampling(table, args.out)
    if args.json:
        print(json.dumps({**dataclasses.asdict(table), "out": args.out}))
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(format_table(table))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
