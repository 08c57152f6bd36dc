"""The settings of a training run, in two parts, and what a run returns.

`TrainConfig` is what the loop (`training.loop.train`) uses: the schedule, evaluation, samples,
checkpoints, precision. `RunConfig` is what `gptlab train` adds around it: the data, the model and
how the run is spread over processes. Both are plain dataclasses; each field's metadata holds the
help text of its command-line option (`--field-name`), so the options are never listed twice.
Nothing here imports torch: `gptlab train --help` builds its options from these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEVICE_CHOICES, DTYPE_NAMES
from ..errors import UsageError

LR_SCHEDULES = ("cosine", "constant")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
STRATEGY_CHOICES = ("none", "ddp", "fsdp")
AUTO = "auto"  # --batch-size auto: the micro-batch is searched for (training/autobatch.py)


def setting(default: Any, help: str, kind: str | None = None, *, group: str = "", choices: tuple = (),
            cli: bool = True, default_factory: Any = None) -> Any:
    """A dataclass field with its command-line help.

    kind: how the command line parses it: "positive" (int >= 1), "count" (int >= 0), "number" (float
    >= 0), "positive_number", "fraction" (0 < x < 1), "rate" (0 <= x < 1), "choice", "flag", "text",
    "paths" (one or more). cli=False keeps a field out of the command line (API only).
    """
    meta = {"help": help, "kind": kind, "group": group, "choices": choices, "cli": cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check(checks: list[tuple[bool, str]], what: str) -> None:
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}; fix the {what}")


class _Settings:
    """to_dict / from_dict shared by the two settings classes."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            from ..errors import did_you_mean

            hint = did_you_mean(unknown[0], cls.field_names())
            raise UsageError(f"unknown setting(s) {', '.join(unknown)}{hint}")
        return cls(**data)


@dataclass
class TrainConfig(_Settings):
    """What the training loop does: schedule, evaluation, samples, checkpoints, precision."""

    epochs: int | None = setting(None, "passes over the training data (default: 8, or unbounded with "
                                 "--max-steps)", "positive", group="optimisation")
    max_steps: int | None = setting(None, "stop after this many optimizer steps (alone: run exactly that many, "
                                    "however many epochs it takes)", "positive", group="optimisation")
    lr: float = setting(3e-3, "peak learning rate", "number", group="optimisation")
    min_lr: float | None = setting(None, "final learning rate of the cosine (default lr/10)", "number",
                                   group="optimisation")
    warmup_steps: int = setting(20, "linear warmup steps", "count", group="optimisation")
    lr_schedule: str = setting("cosine", "after warmup", "choice", group="optimisation", choices=LR_SCHEDULES)
    decay_steps: int | None = setting(None, "cosine length in steps (default: the planned steps)", "positive",
                                      group="optimisation")
    weight_decay: float = setting(0.1, "AdamW decay on 2-D weights", "number", group="optimisation")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", cli=False)
    grad_clip: float = setting(1.0, "max gradient norm, 0 disables", "number", group="optimisation")
    grad_accum: int = setting(1, "micro-batches per optimizer step", "positive", group="optimisation")
    eval_every: int = setting(50, "evaluate every N steps (and at the start and the end)", "positive",
                              group="evaluation and output")
    eval_iters: int = setting(5, "batches per evaluation", "positive", group="evaluation and output")
    eval_at_start: bool = setting(True, "evaluate before the first step", cli=False)
    book_eval_steps: bool = setting(False, "evaluate after steps 1, 1 + eval_every, ... as the book's "
                                    "train_model_simple does (instead of every eval_every steps)", cli=False)
    sample_prompt: str | None = setting(None, "prompt of the sample printed after each epoch ('' for none; "
                                        "default: none from the API, the start of the validation text from "
                                        "gptlab train)", "text", group="evaluation and output")
    sample_tokens: int = setting(50, "tokens per sample", "positive", group="evaluation and output")
    sample_temperature: float = setting(0.8, "0: greedy, as the book's samples during training", cli=False)
    sample_top_k: int | None = setting(40, "top-k of the samples", cli=False)
    save_every: int = setting(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)", "count",
                              group="evaluation and output")
    skip_nonfinite: int = setting(0, "skip up to N batches whose loss is NaN/inf instead of stopping", "count",
                                  group="evaluation and output")
    sync_every: int | None = setting(None, "steps between the host's looks at the loss (progress, NaN check); "
                                     "more keeps a GPU busy (default: 1 on CPU, 10 on GPUs)", "positive",
                                     group="scale")
    quiet: bool = setting(False, "no progress bar, log lines only", "flag", group="evaluation and output")
    seed: int = setting(123, "random seed", "count", group="system")
    device: str = setting("auto", "where to train (auto: cuda, then mps, then cpu)", "choice", group="system",
                          choices=DEVICE_CHOICES)
    dtype: str = setting("auto", "autocast precision (auto: bfloat16 on GPUs that support it, else float32)",
                         "choice", group="system", choices=DTYPE_CHOICES)
    peak_tflops: float | None = setting(None, "peak TFLOPS of one device, for MFU in the progress bar (known GPUs: "
                                        "looked up)", "positive_number", group="scale")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        _check([
            (self.epochs is None or self.epochs >= 1, "epochs must be at least 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
            (self.lr >= 0 and math.isfinite(self.lr), "the learning rate must be 0 or more"),
            (self.min_lr is None or self.min_lr >= 0, "min_lr must be 0 or more"),
            (self.warmup_steps >= 0, "warmup_steps must be 0 or more"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.decay_steps is None or self.decay_steps >= 1, "decay_steps must be at least 1"),
            (self.weight_decay >= 0, "weight_decay must be 0 or more"),
            (self.grad_clip >= 0, "grad_clip must be 0 (off) or more"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (self.eval_every >= 1, "eval_every must be at least 1"),
            (self.eval_iters >= 1, "eval_iters must be at least 1"),
            (self.save_every >= 0, "save_every must be 0 (only at the end) or more"),
            (self.dtype in DTYPE_CHOICES, f"dtype must be one of {', '.join(DTYPE_CHOICES)}"),
            (self.skip_nonfinite >= 0, "skip_nonfinite must be 0 or more"),
            (self.sync_every is None or self.sync_every >= 1, "sync_every must be at least 1"),
            (self.sample_temperature >= 0, "sample_temperature must be 0 (greedy) or more"),
            (self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops must be positive"),
            (self.sample_top_k is None or self.sample_top_k >= 1, "sample_top_k must be at least 1"),
        ], "training settings")

    @property
    def peak_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def epoch_limit(self) -> float:
        """Epochs to run: as given; unbounded when only max_steps is given; else 8 (the main job's)."""
        if self.epochs is not None:
            return self.epochs
        return math.inf if self.max_steps is not None else 8


@dataclass
class RunConfig(_Settings):
    """What `gptlab train` sets up around the loop: data, model, processes."""

    data: list[str] | None = setting(None, "text files, folders of .txt files, corpus names (python-docs, "
                                     "the-verdict) or one folder made by gptlab prepare (default: python-docs)",
                                     "paths", group="data")
    val_fraction: float = setting(0.1, "share of tokens held out for validation", "fraction", group="data")
    batch_size: int | str = setting(8, "windows per batch and process; auto: the largest that fits in a GPU's "
                                    "memory (8 on a CPU)", "batch", group="data")
    global_batch: int | None = setting(None, "windows per optimizer step over all processes: sets --grad-accum to "
                                       "N / (--batch-size x processes)", "positive", group="data")
    context_length: int | None = setting(None, "tokens per window (default: the model's context)", "positive",
                                         group="data")
    stride: int | None = setting(None, "step between windows (default: the context length)", "positive",
                                 group="data")
    num_workers: int = setting(0, "data-loader worker processes", "count", group="data")
    tokenizer: str | None = setting(None, "gpt2, or a folder holding a tokenizer (made by gptlab tokenizer train, "
                                    "or a model or run folder); the model's vocabulary follows it (default: the "
                                    "tokenizer of --init's model, else of a prepared --data folder, else gpt2)",
                                    "text", group="data")
    data_files: list[dict] | None = setting(None, "every file the run reads, with its size and sha256: checked when "
                                            "the run resumes", cli=False)
    model: str = setting("gpt-nano", "the architecture to train from random weights: a preset name or a "
                         "config.json", "text", group="model")
    init: str | None = setting(None, "start from these weights instead: anything --model accepts elsewhere (a "
                               "GPT-2 name, a model or run folder, a weights file)", "text", group="model")
    drop_rate: float | None = setting(None, "dropout rate (default: the model config's)", "rate", group="model")
    strategy: str | None = setting(None, "data parallelism under torchrun (default: ddp when several ranks)",
                                   "choice", group="scale", choices=STRATEGY_CHOICES)
    compile: bool = setting(False, "torch.compile the model", "flag", group="scale")
    compile_backend: str = setting("inductor", "torch.compile backend (eager/aot_eager compile faster, run "
                                   "slower)", "text", group="scale")
    vocab_multiple: int | None = setting(None, "pad the vocabulary to a multiple of N (64 is faster on GPUs; "
                                         "results unchanged)", "positive", group="scale")

    def __post_init__(self) -> None:
        _check([
            (self.batch_size == AUTO or isinstance(self.batch_size, int) and self.batch_size >= 1,
             "batch_size must be at least 1, or auto"),
            (self.global_batch is None or self.global_batch >= 1, "global_batch must be at least 1"),
            (self.context_length is None or self.context_length >= 1, "context_length must be at least 1"),
            (self.stride is None or self.stride >= 1, "stride must be at least 1"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1 (exclusive)"),
            (self.num_workers >= 0, "num_workers must be 0 or more"),
            (self.strategy in (None, *STRATEGY_CHOICES), "strategy must be none, ddp or fsdp"),
            (self.vocab_multiple is None or self.vocab_multiple >= 1, "vocab_multiple must be at least 1"),
        ], "run settings")


def split_settings(data: dict[str, Any], run_cls: type = RunConfig) -> tuple[Any, TrainConfig]:
    """A flat dict of both kinds of settings (train_config.json, the command line) -> the two objects.

    `run_cls` is the run's own settings class: RunConfig for `gptlab train`, FinetuneConfig for
    `gptlab finetune`.
    """
    run_names, train_names = set(run_cls.field_names()), set(TrainConfig.field_names())
    run_cls.from_dict({k: v for k, v in data.items() if k not in train_names})  # unknown names fail here
    run = run_cls(**{k: v for k, v in data.items() if k in run_names})
    return run, TrainConfig(**{k: v for k, v in data.items() if k in train_names})


@dataclass
class TrainState:
    """Where a run stands; everything here goes into the checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress (0-based)
    batches_done: int = 0  # micro-batches of `epoch` already used
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time in earlier sessions of this run
    metrics: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    """What `train` returns; the first three lists are the book's (train_losses, val_losses, tokens_seen)."""

    train_losses: list[float]
    val_losses: list[float]
    tokens_seen: list[int]
    steps: list[int]
    metrics: list[dict]
    state: TrainState
    interrupted: bool = False
    out_dir: Path | None = None
    config: TrainConfig | None = None  # the settings the loop ran with
