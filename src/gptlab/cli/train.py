"""`gptlab train`: pretrain (or continue training) a model on text; with no options, the main job.

The options are made from the fields of RunConfig and TrainConfig (training/settings.py): each
field's metadata carries its help text and how to parse it, so a setting is declared once.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..training.settings import RunConfig, TrainConfig
from .common import (
    add_run_folder_options,
    add_settings_options,
    check_run_folder_args,
    report_stop,
    run_job,
    settings_given,
)

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
    add_run_folder_options(groups["evaluation and output"], "training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..evaluate import perplexity
    from ..training.run import check_out_dir, resume_settings, run_training

    explicit = settings_given(args, RunConfig, TrainConfig)
    check_run_folder_args(args)
    if "model" in explicit and "init" in explicit:
        raise UsageError("give --model (random weights) or --init (existing weights), not both")
    if args.resume:
        check_out_dir(Path(args.out), resume=True, force=False)
        run_cfg, cfg = resume_settings(Path(args.out), explicit)
    else:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        run_cfg = RunConfig(**{k: v for k, v in explicit.items() if k in names})
        cfg = TrainConfig(**{k: v for k, v in explicit.items() if k not in names})
    result = run_job(lambda: run_training(run_cfg, cfg, args.out, resume=args.resume, force=args.force))
    if result is None:  # another rank than 0 of a torchrun job
        return 0
    if report_stop(result, "train"):
        return 130
    out = result.out_dir
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
