"""The optimizer, the learning-rate schedule and the precision (autocast dtype, loss scaler) of a run."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..hardware import DTYPES, warn_if_slow_bfloat16
from .settings import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D tensors (matrices, embeddings) only, never on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:  # fused: one kernel for the whole update, where this device/torch build has it
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def lr_at(step: int, cfg: TrainConfig, decay_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, decay_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.peak_min_lr + 0.5 * (cfg.lr - cfg.peak_min_lr) * (1.0 + math.cos(math.pi * progress))


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps the run will take: max_steps alone, or the epochs (cut short by max_steps)."""
    if cfg.max_steps is not None and cfg.epochs is None:
        return cfg.max_steps
    total = int(cfg.epoch_limit) * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Precision:
    """Autocast dtype and loss scaler for one device (float32: both no-ops)."""

    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def make_precision(name: str, device: torch.device) -> Precision:
    """`auto` is bf16 on GPUs that have it, else float32 (never bfloat16 on a CPU that only emulates it);
    fp16 gets a gradient scaler."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = DTYPES[name]
    if dtype == torch.bfloat16:
        warn_if_slow_bfloat16(device)
    if dtype != torch.float32:
        try:
            with torch.autocast(device.type, dtype=dtype):
                pass
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"--dtype {name} is not supported on {device.type} ({exc}); use --dtype float32") from None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Precision(device, dtype, scaler)
