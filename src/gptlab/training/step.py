"""One optimizer step, one evaluation, one sample: the pieces the loop calls."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .. import faults
from ..evaluate import calc_loss_batch, calc_loss_loader
from ..generation.generate import generate
from ..model import unwrap_model
from ..tokenizer import text_to_token_ids, token_ids_to_text, tokenizer_of
from .distributed import all_reduce_mean, all_reduce_mean_tensor, get_world_size, gradient_sync
from .optim import Precision
from .settings import TrainConfig


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    n_micro: int,
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
    on_device: bool = False,
) -> tuple[torch.Tensor, int]:
    """One optimizer step over `n_micro` micro-batches; returns (mean loss as a 0-d tensor, tokens used).

    A non-finite loss never reaches the weights. By default that is decided on the host (one
    synchronisation per step). With `on_device` (a fused AdamW, no loss scaler) the decision stays on
    the device: the optimizer gets `found_inf` and skips the update itself, and the caller checks the
    returned losses later, at its next synchronisation.
    """
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
    mean = all_reduce_mean_tensor(total / n_micro)
    tokens *= get_world_size()
    if on_device:
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.found_inf = (~torch.isfinite(mean)).float()  # fused AdamW: skip the update when set
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return mean, tokens
    if not math.isfinite(mean.item()):  # a non-finite loss never reaches the weights
        optimizer.zero_grad()
        return mean, tokens
    if cfg.grad_clip > 0:
        precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return mean, tokens


def steps_on_device(optimizer: torch.optim.Optimizer, precision: Precision) -> bool:
    """Whether the non-finite check can stay on the device: a fused optimizer that takes `found_inf`."""
    return bool(optimizer.defaults.get("fused")) and not precision.scaler.is_enabled()


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
    inner = unwrap_model(model)
    tokenizer = tokenizer_of(inner)
    ids = text_to_token_ids(prompt, tokenizer).to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out = generate(inner, ids, max_new_tokens=max_new_tokens, context_size=inner.config.context_length,
                   temperature=temperature, top_k=top_k, generator=generator)
    return token_ids_to_text(out, tokenizer).replace("\n", " ")
