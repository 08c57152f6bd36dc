"""`gptlab train`: pretrain (or continue training) a model on text; with no options, the main job."""

from __future__ import annotations

import argparse
import sys

from ..train_config import TrainConfig
from .common import fraction_open, non_negative_float, non_negative_int, positive_int

DEFAULTS_NOTE = "default: the main job's setting, see TrainConfig"
_D = TrainConfig()  # the defaults shown in --help come from the one place that sets them


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on text (no options: a small model on the built-in corpus)",
        description="Train a GPT model on text files. With no options: gpt-nano on Python's reference docs "
        "(a few minutes on a laptop CPU). Options not given keep their defaults, or on --resume the run's.",
    )
    # Every default is None so that --resume can tell which options were given on this command line.
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH",
                      help="text files, folders of .txt files, or corpus names (python-docs, the-verdict); "
                      "default: the built-in corpus python-docs")
    data.add_argument("--val-fraction", type=fraction_open, help=f"share of tokens held out for validation ({_D.val_fraction})")
    data.add_argument("--batch-size", type=positive_int, help=f"windows per batch ({_D.batch_size})")
    data.add_argument("--context-length", type=positive_int, help="tokens per window (the model's context)")
    data.add_argument("--stride", type=positive_int, help="step between windows (the context length)")
    data.add_argument("--num-workers", type=non_negative_int, help=f"data-loader worker processes ({_D.num_workers})")
    model = p.add_argument_group("model")
    model.add_argument("--model", help="preset name or config.json (gpt-nano); random weights")
    model.add_argument("--init", metavar="PATH_OR_NAME", help="start from these weights (a model or run folder)")
    model.add_argument("--drop-rate", type=_drop_rate, help="dropout rate (the model config's)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, help=f"passes over the training data ({_D.epochs})")
    opt.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    opt.add_argument("--lr", type=non_negative_float, help=f"peak learning rate ({_D.lr})")
    opt.add_argument("--min-lr", type=non_negative_float, help="final learning rate of the cosine (lr/10)")
    opt.add_argument("--warmup-steps", type=non_negative_int, help=f"linear warmup steps ({_D.warmup_steps})")
    opt.add_argument("--lr-schedule", choices=("cosine", "constant"), help="after warmup (cosine)")
    opt.add_argument("--decay-steps", type=positive_int, help="cosine length in steps (the planned steps)")
    opt.add_argument("--weight-decay", type=non_negative_float, help=f"AdamW decay on 2-D weights ({_D.weight_decay})")
    opt.add_argument("--grad-clip", type=non_negative_float, help=f"max gradient norm, 0 disables ({_D.grad_clip})")
    opt.add_argument("--grad-accum", type=positive_int, help=f"micro-batches per optimizer step ({_D.grad_accum})")
    out = p.add_argument_group("evaluation and output")
    out.add_argument("--eval-every", type=positive_int, help=f"evaluate every N steps ({_D.eval_every})")
    out.add_argument("--eval-iters", type=positive_int, help=f"batches per evaluation ({_D.eval_iters})")
    out.add_argument("--sample-prompt", help="prompt of the sample printed after each epoch ('A function'; '' for none)")
    out.add_argument("--sample-tokens", type=positive_int, help=f"tokens per sample ({_D.sample_tokens})")
    out.add_argument("--save-every", type=non_negative_int, help="checkpoint every N steps (0: only at the end)")
    out.add_argument("--out", metavar="DIR", help="run folder (runs/<date>-<time>)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    out.add_argument("--force", action="store_true", help="overwrite the run already in --out")
    out.add_argument("--skip-nonfinite", type=non_negative_int, metavar="N",
                     help="skip up to N batches whose loss is NaN/inf instead of stopping (0)")
    out.add_argument("--quiet", action="store_true", default=None, help="no progress bar, log lines only")
    sys_ = p.add_argument_group("system")
    sys_.add_argument("--seed", type=non_negative_int, help=f"random seed ({_D.seed})")
    sys_.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="where to train (auto)")
    sys_.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                      help="autocast precision (auto: bfloat16 on GPUs that support it, else float32)")
    scale = p.add_argument_group("scale (launch with torchrun for several processes; see README)")
    scale.add_argument("--strategy", choices=("none", "ddp", "fsdp"),
                       help="data parallelism under torchrun (ddp when several ranks and none given)")
    scale.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    scale.add_argument("--compile-backend", metavar="NAME",
                       help="torch.compile backend (inductor; eager/aot_eager compile faster, run slower)")
    scale.add_argument("--vocab-multiple", type=positive_int, metavar="N",
                       help="pad the vocabulary to a multiple of N (64 is faster on GPUs; results unchanged)")
    scale.add_argument("--peak-tflops", type=_positive_float, metavar="T",
                       help="peak TFLOPS of one device, for MFU in the progress bar (known GPUs: looked up)")
    p.set_defaults(func=run)


def _positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _drop_rate(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


OPTION_FIELDS = (
    "data", "val_fraction", "batch_size", "context_length", "stride", "num_workers", "model", "init", "drop_rate",
    "epochs", "max_steps", "lr", "min_lr", "warmup_steps", "lr_schedule", "decay_steps", "weight_decay",
    "grad_clip", "grad_accum", "eval_every", "eval_iters", "sample_prompt", "sample_tokens", "save_every", "quiet",
    "seed", "device", "dtype", "skip_nonfinite", "strategy", "compile", "compile_backend", "vocab_multiple",
    "peak_tflops",
)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..runs import TrainConfig, check_out_dir, resume_settings, run_training

    explicit = {name: getattr(args, name) for name in OPTION_FIELDS if getattr(args, name) is not None}
    if args.resume and args.force:
        raise UsageError("--resume and --force contradict each other; give one of them")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR, the run to continue")
    if "model" in explicit and "init" in explicit:
        raise UsageError("give --model (random weights) or --init (existing weights), not both")
    if args.resume:
        check_out_dir(Path(args.out), resume=True, force=False)
        cfg = resume_settings(Path(args.out), explicit)
    else:
        cfg = TrainConfig(**explicit)
    from ..distributed import cleanup, is_main_process

    ok = False
    try:
        result = run_training(cfg, args.out, resume=args.resume, force=args.force)
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
    from ..evaluate import perplexity

    print(
        f"done: {result.state.step} steps, {result.state.tokens_seen:,} tokens in {final['elapsed_s'] / 60:.1f} min; "
        f"train loss {final['train_loss']:.3f}, val loss {final['val_loss']:.3f} "
        f"(perplexity {perplexity(final['val_loss']):.1f})"
    )
    print(f"saved in {out}: model (config.json, model.safetensors), checkpoint.pt, metrics.jsonl, loss.png")
    print(f'sample from it: gptlab generate --model {out} --prompt "{cfg.sample_prompt or "A function"}"')
    return 0
