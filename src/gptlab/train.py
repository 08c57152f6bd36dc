"""The training loop: the book's `train_model_simple`, plus what real runs need.

With `lr_schedule="constant"`, `warmup_steps=0`, `grad_clip=0`, `grad_accum=1` and
`eval_at_start=False` the loop does exactly what the book's loop does: zero the gradients, compute
the batch loss, backpropagate, step, count tokens, evaluate every `eval_every` steps (after steps
1, 1 + eval_every, ...), print a greedy sample after each epoch (with `sample_temperature=0`).

The pieces are small functions (`build_optimizer`, `lr_at`, `train_step`, `evaluate_model`,
`save_training_state`) so that distributed training (wrapping the model, sharding the data,
writing on rank 0 only) can be added without rewriting the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import faults
from .checkpoint import (
    CHECKPOINT_NAME,
    model_of,
    restore_rng_state,
    save_checkpoint,
)
from .device import resolve_device
from .distributed import all_reduce_mean, get_world_size, gradient_sync, is_main_process
from .errors import UsageError
from .evaluate import calc_loss_batch, calc_loss_loader
from .fileio import atomic_open
from .speed import flops_per_token, keep_freed_memory, peak_tflops
from .train_config import DTYPE_CHOICES, LR_SCHEDULES, TrainConfig, TrainResult, TrainState

__all__ = ["DTYPE_CHOICES", "LR_SCHEDULES", "TrainConfig", "TrainResult", "TrainState", "train"]

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


# --- building blocks -----------------------------------------------------------------------------


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
    total = cfg.epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


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
    """`auto` is bf16 on GPUs that have it, else float32; fp16 gets a gradient scaler."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype != torch.float32:
        try:
            with torch.autocast(device.type, dtype=dtype):
                pass
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"--dtype {name} is not supported on {device.type} ({exc}); use --dtype float32") from None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Precision(device, dtype, scaler)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    n_micro: int,
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
) -> tuple[float, int]:
    """One optimizer step over `n_micro` micro-batches; returns (mean loss, tokens used)."""
    optimizer.zero_grad()
    total = torch.zeros((), device=device)
    tokens = 0
    for i in range(n_micro):
        input_batch, target_batch = next(batches)
        # Under DDP/FSDP only the last micro-step all-reduces the gradients (no-op in one process).
        with gradient_sync(model, enabled=i == n_micro - 1):
            with precision.autocast():
                loss = faults.poison_loss(calc_loss_batch(input_batch, target_batch, model, device))
            # Dividing by the group size makes the accumulated gradient the mean over all micro-batches.
            scaled = loss / n_micro if n_micro > 1 else loss
            precision.scaler.scale(scaled).backward()
        total += loss.detach()
        tokens += input_batch.numel()
    # All ranks' mean loss and tokens (every rank's batches are the same size), so that every rank
    # takes the same decision about a non-finite loss.
    mean = all_reduce_mean(total / n_micro, device)
    tokens *= get_world_size()
    if not math.isfinite(mean):  # a non-finite loss never reaches the weights
        optimizer.zero_grad()
        return mean, tokens
    if cfg.grad_clip > 0:
        precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return mean, tokens


def evaluate_model(
    model: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    eval_iters: int,
    precision: Precision | None = None,
) -> tuple[float, float]:
    """Mean loss on the first `eval_iters` batches of each loader, in eval mode (no dropout)."""
    model.eval()
    with torch.no_grad(), (precision.autocast() if precision else contextlib.nullcontext()):
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iters)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iters)
    model.train()
    return all_reduce_mean(train_loss, device), all_reduce_mean(val_loss, device)


def sample_text(
    model: torch.nn.Module,
    prompt: str,
    device: torch.device,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """A continuation of `prompt` on one line (the book's generate_and_print_sample when greedy).

    Sampling draws from its own generator seeded with `seed`, never from the global RNG, so printing
    samples does not change the training run (and a resumed run stays bit-exact).
    """
    from .generate import generate
    from .tokenizer import text_to_token_ids, token_ids_to_text

    inner = model_of(model)
    ids = text_to_token_ids(prompt).to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out = generate(inner, ids, max_new_tokens=max_new_tokens, context_size=inner.config.context_length,
                   temperature=temperature, top_k=top_k, generator=generator)
    return token_ids_to_text(out).replace("\n", " ")


# --- data position and checkpoints ---------------------------------------------------------------


def _loader_rng(loader: DataLoader) -> torch.Tensor:
    gen = getattr(loader, "generator", None)
    return gen.get_state() if gen is not None else torch.get_rng_state()


def _set_loader_rng(loader: DataLoader, state: torch.Tensor) -> None:
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.set_state(state)
    else:  # a loader without its own generator shuffles from torch's global RNG
        torch.set_rng_state(state)


def save_training_state(
    out_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    loader_state: dict,
    precision: Precision,
    cfg: TrainConfig,
    run_info: dict | None = None,
    plot: bool = True,
) -> None:
    """Checkpoint first, then the model folder files and the plot: the checkpoint is the truth.

    In a multi-rank job every rank must call this (the full states are gathered); rank 0 writes.
    """
    from . import dist_train

    model_state, optimizer_state = dist_train.gather_states(model, optimizer)
    if not is_main_process():
        return
    run_info = dist_train.tag_run_info(run_info, model_state)
    save_checkpoint(
        out_dir / CHECKPOINT_NAME, model, optimizer,
        step=state.step, epoch=state.epoch, batches_done=state.batches_done, tokens_seen=state.tokens_seen,
        loader_state=loader_state, scaler=precision.scaler,
        extra={**(run_info or {}), "elapsed_s": state.elapsed_s, "metrics": state.metrics,
               "train_config": cfg.to_dict()},
        model_state=model_state, optimizer_state=optimizer_state,
    )
    dist_train.save_model_folder(model, model_state, out_dir)
    write_metrics(out_dir / METRICS_NAME, state.metrics)
    if plot and state.metrics:
        from .plot import plot_losses

        plot_losses(state.metrics, out_dir / PLOT_NAME)


def write_metrics(path: Path, metrics: list[dict]) -> None:
    import json

    with atomic_open(path) as fh:
        for record in metrics:
            fh.write(json.dumps(record) + "\n")


def restore_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision
) -> tuple[TrainState, dict, dict]:
    """Load a checkpoint into model/optimizer/RNGs; returns the state, the loader's RNG states and the
    settings the run was saved with."""
    from .dist_train import load_training_checkpoint

    ckpt = load_training_checkpoint(path, model, optimizer, precision.scaler)
    extra = ckpt.get("extra", {})
    state = TrainState(
        step=ckpt["step"], epoch=ckpt["epoch"], batches_done=ckpt["batches_done"],
        tokens_seen=ckpt["tokens_seen"], elapsed_s=float(extra.get("elapsed_s", 0.0)),
        metrics=list(extra.get("metrics", [])),
    )
    return state, {**ckpt["loader"], "rng": ckpt["rng"]}, dict(extra.get("train_config", {}))


# --- Ctrl-C ----------------------------------------------------------------------------------------


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save; a second one aborts."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self._log = log
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, handler)


# --- progress and logs -----------------------------------------------------------------------------


class Reporter:
    """A tqdm bar (loss, lr, tokens/s) unless quiet; log lines that do not break the bar."""

    def __init__(self, cfg: TrainConfig, total: int, initial: int) -> None:
        self.bar = None
        self.main = is_main_process()  # only rank 0 of a torchrun job reports
        self.flops_per_token = 0.0  # set by the caller; with a known peak the bar shows MFU
        self.peak_tflops: float | None = None
        if not cfg.quiet and self.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def log(self, message: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def step(self, loss: float, lr: float, tokens: int) -> None:
        self._tokens += tokens
        if self.bar is not None:
            rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
            extra = {}
            if self.peak_tflops:
                from .speed import mfu

                extra["mfu"] = f"{mfu(rate, self.flops_per_token, self.peak_tflops, get_world_size()):.1%}"
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", **extra, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the loop --------------------------------------------------------------------------------------


def train(
    model: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    config: TrainConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[TrainState], None] | None = None,
    run_info: dict | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train `model` on `train_loader`, evaluating on `val_loader`; returns the loss history.

    `config` (or keyword overrides of TrainConfig's fields) sets the schedule; its data and model
    fields are not used here. The learning rate of every param group is set to `lr_at(step)` before
    each step, so a given `optimizer` follows the schedule too. With `out_dir`, metrics, checkpoints,
    weights and the plot are written there, and `resume=True` continues from its checkpoint exactly.
    `on_step(state)` is called after every optimizer step; `run_info` is kept in the checkpoint.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise UsageError("resume=True needs out_dir, the run folder holding the checkpoint")
    if len(train_loader) == 0:
        raise UsageError("the training loader has no batches; give more data or a smaller batch size")
    model.to(device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for the activations every step re-allocates (gptlab.speed)
    optimizer = optimizer or build_optimizer(model, cfg, device)
    precision = make_precision(cfg.dtype, device)
    n_batches = len(train_loader)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = planned_steps(cfg, steps_per_epoch)
    decay_steps = cfg.decay_steps or total_steps

    state, loader_state = TrainState(), {}
    if resume:
        state, loader_state, saved_cfg = restore_training_state(out / CHECKPOINT_NAME, model, optimizer, precision)
        if cfg.decay_steps is None and saved_cfg.get("decay_steps"):
            decay_steps = int(saved_cfg["decay_steps"])  # the schedule stays the run's original one
        _set_loader_rng(train_loader, loader_state["current"])
    report = Reporter(cfg, total_steps, min(state.step, total_steps))
    report.peak_tflops = peak_tflops(device, str(precision.dtype).removeprefix("torch."), cfg.peak_tflops)
    report.flops_per_token = flops_per_token(model_of(model).config, cfg.context_length)
    session_start = time.perf_counter()
    last_lr = lr_at(max(state.step - 1, 0), cfg, decay_steps)
    epoch_start = _loader_rng(train_loader)
    interrupted = False
    skipped = 0  # non-finite batches skipped in this session (--skip-nonfinite)

    def elapsed() -> float:
        return state.elapsed_s + time.perf_counter() - session_start

    def record_eval() -> None:
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, cfg.eval_iters, precision)
        record = {
            "step": state.step, "epoch": round(state.epoch + state.batches_done / n_batches, 4),
            "tokens_seen": state.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
            "lr": last_lr, "elapsed_s": round(elapsed(), 3),
        }
        state.metrics.append(record)
        epoch = max(1, state.epoch + (1 if state.batches_done else 0))
        report.log(f"Ep {epoch} (Step {state.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        if out is not None and is_main_process():
            write_metrics(out / METRICS_NAME, state.metrics)

    def save(final: bool = False) -> None:
        if out is not None:
            loader_rng = {"epoch_start": epoch_start, "current": _loader_rng(train_loader)}
            settings = dataclasses.replace(cfg, decay_steps=decay_steps)
            # The plot (matplotlib, ~1 s) is drawn at the end only; metrics.jsonl is the live record.
            snapshot = dataclasses.replace(state, elapsed_s=round(elapsed(), 3))
            save_training_state(out, model, optimizer, snapshot, loader_rng, precision, settings, run_info, plot=final)

    def sample() -> None:
        if cfg.sample_prompt:
            text = sample_text(model, cfg.sample_prompt, device, cfg.sample_tokens, cfg.sample_temperature,
                               cfg.sample_top_k, seed=cfg.seed + state.step)
            report.log(f"sample: {text}" if cfg.sample_temperature else text)

    try:
        with StopRequest(report.log) as stop:
            if cfg.eval_at_start and state.step == 0 and not state.metrics:
                record_eval()
            while state.epoch < cfg.epochs and state.step < total_steps and not stop.requested:
                model.train()
                if state.batches_done == 0:
                    epoch_start = _loader_rng(train_loader)
                    batches = iter(train_loader)
                else:  # resuming inside an epoch
                    epoch_start = loader_state["epoch_start"]
                    batches = _resume_batches(train_loader, state.batches_done, loader_state)
                while state.step < total_steps and not stop.requested:
                    n_micro = min(cfg.grad_accum, n_batches - state.batches_done)
                    last_lr = lr_at(state.step, cfg, decay_steps)
                    set_lr(optimizer, last_lr)
                    faults.begin_step(state.step + 1)
                    loss, tokens = train_step(model, optimizer, batches, n_micro, cfg, device, precision)
                    if not math.isfinite(loss):
                        skipped = faults.check_nonfinite(loss, state.step + 1, skipped, cfg.skip_nonfinite, report.log)
                    state.step += 1
                    state.batches_done += n_micro
                    state.tokens_seen += tokens
                    report.step(loss, last_lr, tokens)
                    if (state.step - 1) % cfg.eval_every == 0:
                        record_eval()
                    if on_step is not None:
                        on_step(state)
                    if state.batches_done >= n_batches:
                        # Run the iterator to its end, as a `for` loop would: the sampler draws from the
                        # loader's generator on exhaustion, and the next epoch's order depends on it.
                        for _ in batches:
                            pass
                        sample()
                        state.epoch += 1
                        state.batches_done = 0
                    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                        save()
                    faults.after_step(state.step)
                    if state.batches_done == 0:
                        break
            interrupted = stop.requested and state.step < total_steps
            if not interrupted:
                if state.batches_done:
                    sample()  # stopped by max_steps inside an epoch: still show where the model stands
                if not state.metrics or state.metrics[-1]["step"] != state.step:
                    # An evaluation only because the run stops here: iterating the train loader draws
                    # from its RNG, so put that back, or a later --resume with more steps would get
                    # other batches than a run that never stopped.
                    loader_rng = _loader_rng(train_loader)
                    record_eval()
                    _set_loader_rng(train_loader, loader_rng)
            save(final=True)
            state.elapsed_s = elapsed()
    finally:
        report.close()
    if interrupted and out is not None:
        report.log(f"interrupted at step {state.step}; checkpoint saved in {out}")
    return TrainResult(
        train_losses=[m["train_loss"] for m in state.metrics],
        val_losses=[m["val_loss"] for m in state.metrics],
        tokens_seen=[m["tokens_seen"] for m in state.metrics],
        steps=[m["step"] for m in state.metrics],
        metrics=state.metrics,
        state=state,
        interrupted=interrupted,
        out_dir=out,
    )


def _resume_batches(loader: DataLoader, skip: int, loader_state: dict) -> Iterator:
    """An iterator over this epoch's batches, `skip` batches in (a resumed run's position).

    The shuffle order comes from the loader's generator as it was when the epoch began; after
    skipping, the generator (and the global RNGs) are put back to their saved current states, which
    also account for any evaluations that iterated the loader since.
    """
    _set_loader_rng(loader, loader_state["epoch_start"])
    if hasattr(loader, "iter_from"):  # a prepared-folder loader jumps there without reading (train_data.py)
        batches = loader.iter_from(skip)
    else:
        batches = iter(loader)
        for _ in range(skip):
            next(batches)
    _set_loader_rng(loader, loader_state["current"])
    restore_rng_state(loader_state["rng"])
    return batches
