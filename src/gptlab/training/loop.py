"""The training loop: the book's `train_model_simple`, plus what real runs need.

With `lr_schedule="constant"`, `warmup_steps=0`, `grad_clip=0`, `grad_accum=1`, `eval_at_start=False`
and `book_eval_steps=True` the loop does exactly what the book's loop does: zero the gradients, compute
the batch loss, backpropagate, step, count tokens, evaluate after steps 1, 1 + eval_every, ...,
print a greedy sample after each epoch (with `sample_temperature=0`). Otherwise it evaluates at the
start, every `eval_every` steps and at the end.

`train` reads top to bottom: set up (`_start`), the epochs (`_run_epoch`, one `_step` at a time, each
a `step.train_step`), the end (`_finish`), and checkpoints (`_save`, see checkpoint.py) on the way.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import faults
from ..errors import UsageError
from ..evaluate import bytes_per_token
from ..hardware import keep_freed_memory, peak_tflops, resolve_device
from ..model import flops_per_token, unwrap_model
from ..tokenizer import tokenizer_of
from .checkpoint import CHECKPOINT_NAME, restore_rng_state, restore_training_state, save_training_state
from .distributed import is_main_process
from .optim import Precision, build_optimizer, lr_at, make_precision, planned_steps, set_lr
from .report import METRICS_NAME, Reporter, write_metrics
from .settings import TrainConfig, TrainResult, TrainState
from .step import evaluate_model, sample_text, steps_on_device, train_step

__all__ = ["TrainConfig", "TrainResult", "TrainState", "train"]

SampleFn = Callable[[nn.Module, int], "str | None"]
MetricsFn = Callable[[nn.Module], dict]


def train(
    model: nn.Module,
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
    sample: SampleFn | None = None,
    extra_metrics: MetricsFn | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train `model` on `train_loader`, evaluating on `val_loader`; returns the loss history.

    `config` (or keyword overrides of TrainConfig's fields) sets the schedule. The learning rate of
    every param group is set to `lr_at(step)` before each step, so a given `optimizer` follows the
    schedule too. With `out_dir`, metrics, checkpoints, weights and the plot are written there, and
    `resume=True` continues from its checkpoint exactly. `on_step(state)` is called after every
    optimizer step; `run_info` is kept in the checkpoint. `sample(model, step)` returns the text
    logged after each epoch (default: a continuation of `sample_prompt`, if one is set), and
    `extra_metrics(model)` more numbers for every evaluation record (e.g. accuracy).
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    run = _start(model, train_loader, val_loader, cfg, optimizer, device, out_dir, resume, run_info)
    run.sample, run.extra_metrics = sample or _prompt_sampler(cfg), extra_metrics
    try:
        with StopRequest(run.report.log) as stop:
            if cfg.eval_at_start and run.state.step == 0 and not run.state.metrics:
                _evaluate(run)
            while run.state.epoch < cfg.epoch_limit and run.state.step < run.total_steps and not stop.requested:
                _run_epoch(run, stop, on_step)
            _sync(run)
            run.interrupted = stop.requested and run.state.step < run.total_steps
            if not run.interrupted:
                _finish(run)
            _save(run, final=True)
            run.state.elapsed_s = run.elapsed()
    finally:
        run.report.close()
    if run.interrupted and run.out is not None:
        run.report.log(f"interrupted at step {run.state.step}; checkpoint saved in {run.out}")
    return run.result()


@dataclass
class _Run:
    """Everything one call of `train` works with."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    cfg: TrainConfig
    device: torch.device
    precision: Precision
    out: Path | None
    n_batches: int  # micro-batches per epoch
    total_steps: int
    decay_steps: int
    state: TrainState
    report: Reporter
    run_info: dict
    loader_state: dict  # on resume: the loader RNG states saved with the checkpoint
    epoch_start: torch.Tensor  # the loader's RNG state when the current epoch began
    last_lr: float = 0.0
    skipped: int = 0  # non-finite batches skipped in this session (skip_nonfinite)
    sync_every: int = 1  # steps between the host's looks at the loss
    on_device: bool = False  # the non-finite check stays on the device between looks (train_step)
    unsynced: list = dataclasses.field(default_factory=list)  # (step, loss tensor, tokens) not looked at yet
    val_bytes_per_token: float | None = None  # of the validation set: val_bpb = val_loss / ln 2 / this
    last_sample_step: int = 0
    interrupted: bool = False
    sample: SampleFn | None = None
    extra_metrics: MetricsFn | None = None
    session_start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.perf_counter() - self.session_start

    def result(self) -> TrainResult:
        metrics = self.state.metrics
        return TrainResult(
            train_losses=[m["train_loss"] for m in metrics], val_losses=[m["val_loss"] for m in metrics],
            tokens_seen=[m["tokens_seen"] for m in metrics], steps=[m["step"] for m in metrics],
            metrics=metrics, state=self.state, interrupted=self.interrupted, out_dir=self.out, config=self.cfg,
        )


def _start(model, train_loader, val_loader, cfg: TrainConfig, optimizer, device, out_dir, resume: bool,
           run_info: dict | None) -> _Run:
    """Check the inputs, put the model on its device, build the optimizer, restore a checkpoint."""
    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise UsageError("resume=True needs out_dir, the run folder holding the checkpoint")
    if len(train_loader) == 0:
        raise UsageError("the training loader has no batches; give more data or a smaller batch size")
    model.to(device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for the activations every step re-allocates (hardware.py)
    optimizer = optimizer or build_optimizer(model, cfg, device)
    precision = make_precision(cfg.dtype, device)
    n_batches = len(train_loader)
    total_steps = planned_steps(cfg, math.ceil(n_batches / cfg.grad_accum))
    decay_steps = cfg.decay_steps or total_steps
    if 0 < total_steps <= cfg.warmup_steps and cfg.lr:
        warnings.warn(f"the warmup of {cfg.warmup_steps} steps is not shorter than the run's {total_steps} steps, "
                      f"so the learning rate never reaches its peak of {cfg.lr:g}; lower --warmup-steps",
                      stacklevel=3)
    state, loader_state = TrainState(), {}
    if resume:
        state, loader_state, extra = restore_training_state(out / CHECKPOINT_NAME, model, optimizer, precision.scaler)
        saved_decay = extra.get("train_config", {}).get("decay_steps")
        if cfg.decay_steps is None and saved_decay:
            decay_steps = int(saved_decay)  # the schedule stays the run's original one
        _set_loader_rng(train_loader, loader_state["current"])
    peak = peak_tflops(device, str(precision.dtype).removeprefix("torch."), cfg.peak_tflops)
    report = Reporter(cfg.quiet, total_steps, min(state.step, total_steps),
                      flops_per_token(unwrap_model(model).config, _window_length(train_loader)), peak)
    sync_every = cfg.sync_every or (1 if device.type == "cpu" else 10)
    return _Run(model, optimizer, train_loader, val_loader, cfg, device, precision, out, n_batches, total_steps,
                decay_steps, state, report, dict(run_info or {}), loader_state, _loader_rng(train_loader),
                last_lr=lr_at(max(state.step - 1, 0), cfg, decay_steps), sync_every=sync_every,
                on_device=sync_every > 1 and steps_on_device(optimizer, precision),
                val_bytes_per_token=_val_bytes_per_token(model, val_loader))


def _val_bytes_per_token(model: nn.Module, val_loader: DataLoader) -> float | None:
    """Bytes per token of the validation set under the model's tokenizer (None if the two do not fit)."""
    tok = tokenizer_of(model)
    if unwrap_model(model).config.vocab_size != tok.n_vocab:
        return None  # ids from some other tokenizer: their bytes are unknown
    return bytes_per_token(val_loader, tok)


def _run_epoch(run: _Run, stop: StopRequest, on_step: Callable[[TrainState], None] | None) -> None:
    """The rest of the current epoch, one optimizer step at a time, until it ends or the run stops."""
    state, cfg = run.state, run.cfg
    run.model.train()
    if state.batches_done == 0:
        run.epoch_start = _loader_rng(run.train_loader)
        batches = iter(run.train_loader)
    else:  # resuming inside an epoch
        run.epoch_start = run.loader_state["epoch_start"]
        batches = _resume_batches(run.train_loader, state.batches_done, run.loader_state)
    while state.step < run.total_steps and not stop.requested:
        _step(run, batches)
        if on_step is not None:
            on_step(state)
        if state.batches_done >= run.n_batches:
            # Run the iterator to its end, as a `for` loop would: the sampler draws from the loader's
            # generator on exhaustion, and the next epoch's order depends on it.
            for _ in batches:
                pass
            if state.step - run.last_sample_step >= cfg.eval_every:
                _log_sample(run)  # after an epoch, but not more often than evaluations: samples cost time
            state.epoch += 1
            state.batches_done = 0
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < run.total_steps:
            _save(run)
        faults.after_step(state.step)
        if state.batches_done == 0:
            return


def _step(run: _Run, batches: Iterator) -> None:
    """One optimizer step and, when due, a look at the losses since the last one and an evaluation."""
    state, cfg = run.state, run.cfg
    n_micro = min(cfg.grad_accum, run.n_batches - state.batches_done)
    run.last_lr = lr_at(state.step, cfg, run.decay_steps)
    set_lr(run.optimizer, run.last_lr)
    faults.begin_step(state.step + 1)
    loss, tokens = train_step(run.model, run.optimizer, batches, n_micro, cfg, run.device, run.precision,
                              on_device=run.on_device)
    state.step += 1
    state.batches_done += n_micro
    state.tokens_seen += tokens
    run.unsynced.append((state.step, loss, tokens))
    due = (state.step - 1) % cfg.eval_every == 0 if cfg.book_eval_steps else state.step % cfg.eval_every == 0
    if (due or len(run.unsynced) >= run.sync_every or state.batches_done >= run.n_batches
            or state.step >= run.total_steps):
        _sync(run)
    if due:
        _evaluate(run)


def _sync(run: _Run) -> None:
    """The host looks at the steps since its last look, in one synchronisation: reports them, and stops
    (or skips, with skip_nonfinite) on a non-finite loss, whose update never reached the weights."""
    steps, run.unsynced = run.unsynced, []
    if not steps:
        return
    losses = torch.stack([loss for _, loss, _ in steps]).tolist()
    for (step, _, tokens), loss in zip(steps, losses, strict=True):
        if not math.isfinite(loss):
            run.skipped = faults.check_nonfinite(loss, step, run.skipped, run.cfg.skip_nonfinite, run.report.log)
        run.report.step(loss, run.last_lr, tokens)


def _finish(run: _Run) -> None:
    """Where the run stops: a sample if it stopped inside an epoch, and an evaluation of the final step."""
    state = run.state
    if run.last_sample_step != state.step:
        _log_sample(run)  # where the model stands at the end
    if not state.metrics or state.metrics[-1]["step"] != state.step:
        # An evaluation only because the run stops here: iterating the train loader draws from its
        # RNG, so put that back, or a later --resume with more steps would get other batches than a
        # run that never stopped.
        loader_rng = _loader_rng(run.train_loader)
        _evaluate(run)
        _set_loader_rng(run.train_loader, loader_rng)


def _evaluate(run: _Run) -> None:
    """Train and validation loss now (plus any extra metrics): one record in metrics.jsonl and one log line."""
    state = run.state
    train_loss, val_loss = evaluate_model(run.model, run.train_loader, run.val_loader, run.device,
                                          run.cfg.eval_iters, run.precision)
    record = {
        "step": state.step, "epoch": round(state.epoch + state.batches_done / run.n_batches, 4),
        "tokens_seen": state.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
    }
    if run.val_bytes_per_token:
        record["val_bpb"] = val_loss / math.log(2) / run.val_bytes_per_token
    record.update({"lr": run.last_lr, "elapsed_s": round(run.elapsed(), 3)})
    extra = run.extra_metrics(run.model) if run.extra_metrics is not None else {}
    record.update(extra)
    state.metrics.append(record)
    epoch = max(1, state.epoch + (1 if state.batches_done else 0))
    more = "".join(f", {k.replace('_', ' ').capitalize()} {v:.3f}" for k, v in extra.items() if isinstance(v, float))
    bpb = f", Val bpb {record['val_bpb']:.3f}" if "val_bpb" in record else ""
    run.report.log(f"Ep {epoch} (Step {state.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                   f"{bpb}{more}")
    if run.out is not None and is_main_process():
        write_metrics(run.out / METRICS_NAME, state.metrics)


def _log_sample(run: _Run) -> None:
    run.last_sample_step = run.state.step
    if run.sample is not None:
        text = run.sample(run.model, run.state.step)
        if text:
            run.report.log(text)


def _prompt_sampler(cfg: TrainConfig) -> SampleFn | None:
    """The default sample after each epoch: a continuation of `cfg.sample_prompt` (none without one).

    Drawn from its own generator seeded with seed + step, never from the global RNG, so printing
    samples does not change the training run (and a resumed run stays bit-exact).
    """
    if not cfg.sample_prompt:
        return None

    def sample(model: nn.Module, step: int) -> str:
        device = next(unwrap_model(model).parameters()).device
        text = sample_text(model, cfg.sample_prompt, device, cfg.sample_tokens, cfg.sample_temperature,
                           cfg.sample_top_k, seed=cfg.seed + step)
        return f"sample: {text}" if cfg.sample_temperature else text

    return sample


def _save(run: _Run, final: bool = False) -> None:
    """Write the checkpoint (and the model folder, metrics, at the end the plot) when the run has a folder."""
    if run.out is None:
        return
    loader_rng = {"epoch_start": run.epoch_start, "current": _loader_rng(run.train_loader)}
    settings = dataclasses.replace(run.cfg, decay_steps=run.decay_steps)
    # The plot (matplotlib, ~1 s) is drawn at the end only; metrics.jsonl is the live record.
    snapshot = dataclasses.replace(run.state, elapsed_s=round(run.elapsed(), 3))
    extra = {**run.run_info, "train_config": settings.to_dict()}
    save_training_state(run.out, run.model, run.optimizer, snapshot, loader_rng, run.precision.scaler, extra,
                        plot=final)


def _window_length(loader: DataLoader) -> int | None:
    dataset = getattr(loader, "dataset", None)
    return getattr(dataset, "max_length", None) or getattr(dataset, "context_length", None)


# --- data position ---------------------------------------------------------------------------------


def _loader_rng(loader: DataLoader) -> torch.Tensor:
    gen = getattr(loader, "generator", None)
    return gen.get_state() if gen is not None else torch.get_rng_state()


def _set_loader_rng(loader: DataLoader, state: torch.Tensor) -> None:
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.set_state(state)
    else:  # a loader without its own generator shuffles from torch's global RNG
        torch.set_rng_state(state)


def _resume_batches(loader: DataLoader, skip: int, loader_state: dict) -> Iterator:
    """An iterator over this epoch's batches, `skip` batches in (a resumed run's position).

    The shuffle order comes from the loader's generator as it was when the epoch began; after
    skipping, the generator (and the global RNGs) are put back to their saved current states, which
    also account for any evaluations that iterated the loader since.
    """
    _set_loader_rng(loader, loader_state["epoch_start"])
    if hasattr(loader, "iter_from"):  # a prepared-folder loader jumps there without reading (data/prepared.py)
        batches = loader.iter_from(skip)
    else:
        batches = iter(loader)
        for _ in range(skip):
            next(batches)
    _set_loader_rng(loader, loader_state["current"])
    restore_rng_state(loader_state["rng"])
    return batches


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
