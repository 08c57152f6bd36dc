"""The settings of a training run and what it returns: TrainConfig, TrainState, TrainResult."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

LR_SCHEDULES = ("cosine", "constant")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Every setting of a training run (saved as train_config.json). Defaults are the main job's."""

    # data
    data: list[str] | None = None  # files, folders or corpus names; None: the built-in corpus
    val_fraction: float = 0.1
    batch_size: int = 8
    context_length: int | None = None  # window length; None: the model's context length
    stride: int | None = None  # None: context_length (windows do not overlap)
    num_workers: int = 0
    # model
    model: str = "gpt-nano"
    init: str | None = None  # start from these weights instead of random ones
    drop_rate: float | None = None  # None: the model config's
    # optimisation
    epochs: int = 8
    max_steps: int | None = None
    lr: float = 3e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    decay_steps: int | None = None  # cosine length; None: the planned number of steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    # evaluation, samples, output
    eval_every: int = 50
    eval_iters: int = 5
    eval_at_start: bool = True
    sample_prompt: str | None = "A function"
    sample_tokens: int = 50
    sample_temperature: float = 0.8  # 0: greedy, as the book's samples during training
    sample_top_k: int | None = 40
    save_every: int = 0  # 0: save only at the end (and on Ctrl-C)
    seed: int = 123
    device: str = "auto"
    dtype: str = "auto"
    quiet: bool = False
    skip_nonfinite: int = 0  # NaN/inf batches to skip (per session) before stopping
    # scale (issue 7): torchrun strategy, torch.compile, padded vocabulary, MFU
    strategy: str | None = None  # none | ddp | fsdp; None: ddp under torchrun with several ranks, else none
    compile: bool = False
    compile_backend: str = "inductor"
    vocab_multiple: int | None = None  # None: the model config's
    peak_tflops: float | None = None  # None: looked up for known GPUs (MFU shown only when known)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        checks = [
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.context_length is None or self.context_length >= 1, "context_length must be at least 1"),
            (self.stride is None or self.stride >= 1, "stride must be at least 1"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1 (exclusive)"),
            (self.epochs >= 1, "epochs must be at least 1"),
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
            (self.num_workers >= 0, "num_workers must be 0 or more"),
            (self.skip_nonfinite >= 0, "skip_nonfinite must be 0 or more"),
            (self.sample_temperature >= 0, "sample_temperature must be 0 (greedy) or more"),
            (self.strategy in (None, "none", "ddp", "fsdp"), "strategy must be none, ddp or fsdp"),
            (self.vocab_multiple is None or self.vocab_multiple >= 1, "vocab_multiple must be at least 1"),
            (self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops must be positive"),
            (self.sample_top_k is None or self.sample_top_k >= 1, "sample_top_k must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"{message}; fix the training settings")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**data)

    @property
    def peak_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


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
