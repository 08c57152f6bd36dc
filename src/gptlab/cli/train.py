"""`gptlab train`: pretrain (or continue training) a model on text; with no options, the main job.

The options are made from the fields of RunConfig and TrainConfig (training/settings.py): each
field's metadata carries its help text and how to parse it, so a setting is declared once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..training.settings import RunConfig, TrainConfig
from .common import add_settings_options, settings_given

GROUPS = ("data", "model", "optimisation", "evaluation and output", "system",
          "scale (launch with torchrun for several processes; see docs/scale.md)")


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on text (no options: a small model on the built-in corpus)",
        description="Train a GPT model on text files. With no options: gpt-nano on Python's reference docs "
        "(a few minutes on a laptop CPU). Options not given keep their defaults, or on --resume the run's.",
    )
    groups = {name.split(" (")[0]: p.add_argument_group(name) for name in GROUPS}
    add_settings_options(groups, RunConfig, TrainConfig)
    out = groups["evaluation and output"]
    out.add_argument("--out", metavar="DIR", help="run folder (runs/<date>-<time>)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    out.add_argument("--force", action="store_true", help="overwrite the run already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..evaluate import perplexity
    from ..training.distributed import cleanup, is_main_process
    from ..training.run import check_out_dir, resume_settings, run_training

    explicit = settings_given(args, RunConfig, TrainConfig)
    if args.resume and args.force:
        raise UsageError("--resume and --force contradict each other; give one of them")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR, the run to continue")
    if "model" in explicit and "init" in explicit:
        raise UsageError("give --model (random weights) or --init (existing weights), not both")
    if args.resume:
        check_out_dir(Path(args.out), resume=True, force=False)
        run_cfg, cfg = resume_settings(Path(args.out), explicit)
    else:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        run_cfg = RunConfig(**{k: v for k, v in explicit.items() if k in names})
        cfg = TrainConfig(**{k: v for k, v in explicit.items() if k not in names})
    ok = False
    try:
        result = run_training(run_cfg, cfg, args.out, resume=args.resume, force=args.force)
        main = is_main_process()  # before cleanup(), which leaves the process group
        ok = True
    finally:
        cleanup(sync=ok)
    if not main:
        return 0
    out = result.out_dir
    if result.interrupted:
        print(f"stopped at step {result.state.step}; continue with: gptlab train --out {out} --resume",
              file=sys.stderr)
        return 130
    final = result.metrics[-1]
    bpb = f", {final['val_bpb']:.3f} bits per byte" if "val_bpb" in final else ""
    print(
        f"done: {result.state.step} steps, {result.state.tokens_seen:,} tokens in {final['elapsed_s'] / 60:.1f} min; "
        f"train loss {final['train_loss']:.3f}, val loss {final['val_loss']:.3f} "
        f"(perplexity {perplexity(final['val_loss']):.1f}{bpb})"
    )
    tokenizer = ", tokenizer.json, tokenizer_config.json" if (out / "tokenizer.json").is_file() else ""
    print(f"saved in {out}: model (config.json, model.safetensors{tokenizer}), checkpoint.pt, metrics.jsonl, "
          "loss.png")
    prompt = result.config.sample_prompt if result.config is not None else ""
    print(f'sample from it: gptlab generate --model {out} --prompt "{prompt or ""}"')
    return 0
