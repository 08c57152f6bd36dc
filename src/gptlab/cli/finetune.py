"""`gptlab finetune`: adapt a trained model to follow instructions (the book's chapter 7) or to classify
texts (chapter 6), training all its weights or LoRA adapters.

The options are made from the fields of FinetuneConfig (finetune/settings.py) and of the loop's
TrainConfig, as for `gptlab train`; TrainConfig's options not given take fine-tuning defaults.
"""

from __future__ import annotations

import argparse

from ..finetune.settings import FinetuneConfig
from ..training.settings import TrainConfig
from . import common

GROUPS = ("task", "data", "model", "lora (with --method lora)", "optimisation", "evaluation and output", "system",
          "scale (launch with torchrun for several processes)")
# The loop's prompt sample is replaced by greedy answers to validation instructions.
NOT_OPTIONS = ("sample_prompt",)
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
# The loop's options whose fine-tuning defaults differ from pretraining's (finetune/settings.py train_defaults).
HELPS = {
    "epochs": "passes over the training data (default 2, classify 5; --max-steps alone: exactly that many steps)",
    "lr": "peak learning rate (default 5e-5, LoRA 2e-4)",
    "weight_decay": "AdamW decay on 2-D weights (default 0.1, LoRA 0)",
    "warmup_steps": "linear warmup steps (default 0)",
    "sample_tokens": "longest greedy answer in the log after each epoch (default 50)",
}


DESCRIPTION = (
    "Fine-tune a trained model: on instructions (Alpaca-style records, the default task) or on labelled texts "
    "(--task classify). Examples: gptlab finetune --init gpt2-small --data instructions.json --out runs/chat "
    "--method lora;  gptlab finetune --task classify --init gpt2-small --data sms.csv --out runs/spam. "
    "Defaults: 2 epochs (classify: 5), lr 5e-5 (LoRA: 2e-4), batch 8."
)


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on instructions or labelled texts (full or LoRA)",
                       description=DESCRIPTION)
    groups = {name.split(" (")[0]: p.add_argument_group(name) for name in GROUPS}
    common.add_settings_options(groups, FinetuneConfig, TrainConfig, skip=NOT_OPTIONS, helps=HELPS)
    common.add_run_folder_options(groups["evaluation and output"], "fine-tuning")
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> tuple[FinetuneConfig, TrainConfig]:
    """The run's settings: the options given, over the saved ones on --resume, else over the defaults."""
    from pathlib import Path

    from ..errors import UsageError
    from ..finetune.run import settings_from
    from ..finetune.settings import FIXED_ON_RESUME
    from ..training.run import check_out_dir, resume_settings

    explicit = common.settings_given(args, FinetuneConfig, TrainConfig)
    common.check_run_folder_args(args)
    if args.resume:
        check_out_dir(Path(args.out), resume=True, force=False)
        return resume_settings(Path(args.out), explicit, FinetuneConfig, FIXED_ON_RESUME)
    for name, what in (("init", "the model to fine-tune (a GPT-2 name, a model or run folder)"),
                       ("data", "the examples (instructions: JSON/JSONL records; classify: CSV/TSV/JSONL)")):
        if name not in explicit:
            raise UsageError(f"--{name} is required: {what}")
    if "adapter" in explicit:
        given = [f"--{n.replace('_', '-')}" for n in LORA_OPTIONS if n in explicit]
        if explicit.get("method") == "full" or given:
            raise UsageError(f"--adapter brings its own LoRA settings; leave out {' '.join(given) or '--method full'}")
    return settings_from(explicit)


def run(args: argparse.Namespace) -> int:
    from ..finetune.run import run_finetune

    ft, cfg = settings_of(args)
    result = common.run_job(lambda: run_finetune(ft, cfg, args.out, resume=args.resume, force=args.force))
    if result is None:  # another rank than 0 of a torchrun job
        return 0
    if common.report_stop(result, "finetune"):
        return 130
    out, final = result.out_dir, result.metrics[-1]
    accuracy = f", val accuracy {final['val_accuracy']:.1%}" if "val_accuracy" in final else ""
    print(f"done: {result.state.step} steps in {final['elapsed_s'] / 60:.1f} min; train loss "
          f"{final['train_loss']:.3f}, val loss {final['val_loss']:.3f}{accuracy}")
    files = "config.json, model.safetensors" + (" (adapters merged); adapter.safetensors" if ft.uses_lora else "")
    print(f"saved in {out}: {files}, checkpoint.pt, metrics.jsonl, loss.png")
    if ft.task == "classify":
        print(f'classify with it: gptlab classify --model {out} --text "..."')
    else:
        print(f'ask it: gptlab generate --model {out} --instruction "..." [--input "..."]')
    return 0
