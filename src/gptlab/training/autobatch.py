"""`--batch-size auto`: the largest micro-batch whose training step fits in the device's memory.

The search doubles the batch until a step runs out of memory, then bisects between the last batch that
fit and the first that did not. Each probe runs a real forward and backward pass at full sequence length,
with the optimizer's state already allocated (AdamW keeps two moments per weight), and frees everything
after itself. A margin (the default keeps 90% of the largest that fits) leaves room for what the probe
does not see: the allocator's fragmentation over a long run, evaluation batches, the sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import faults
from ..errors import GptlabError, UsageError
from .settings import AUTO, RunConfig, TrainConfig

CPU_BATCH = 8  # `auto` on a CPU: memory is rarely the limit there, and speed stops growing long before it


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def find_micro_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 1024, margin: float = 0.9) -> int:
    """The largest batch in [start, limit] for which `fits(batch)` is true (times `margin`, at least `start`).

    `fits` may also raise an out-of-memory error, which counts as false.
    """
    def ok(batch: int) -> bool:
        try:
            return fits(batch)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            return False

    if not ok(start):
        raise GptlabError(f"a training step with a micro-batch of {start} does not fit in the device's memory; "
                          "use a smaller model or --context-length, or --dtype bfloat16")
    good, bad = start, None
    while bad is None and good < limit:  # doubling: cheap while far from the limit
        trial = min(good * 2, limit)
        if ok(trial):
            good = trial
        else:
            bad = trial
    while bad is not None and bad - good > 1:  # bisecting between what fit and what did not
        middle = (good + bad) // 2
        good, bad = (middle, bad) if ok(middle) else (good, middle)
    return max(start, int(good * margin))


def probe_training_step(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype | None = None) -> bool:
    """Run one forward and backward pass of `batch` x `seq` tokens with AdamW's state allocated; True if it
    fits. The model's weights and gradients are left as they were."""
    device = next(model.parameters()).device
    faults.simulate_out_of_memory(batch)
    moments = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad for _ in range(2)]
    x = torch.zeros(batch, seq, dtype=torch.long, device=device)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32):
            loss = model.loss(x, x)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True
    finally:
        del moments, x
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def settle_batch(run_cfg: RunConfig, cfg: TrainConfig, model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype, world_size: int = 1, log=print) -> tuple[RunConfig, TrainConfig]:
    """--batch-size auto and --global-batch made numbers: the micro-batch of each process and --grad-accum."""
    batch = run_cfg.batch_size
    if batch == AUTO:
        batch = auto_micro_batch(model, run_cfg.context_length or model.config.context_length, device, dtype)
        log(f"--batch-size auto: {batch} windows per micro-batch" + ("" if can_probe(device) else " (on a CPU)"))
    grad_accum = cfg.grad_accum
    if run_cfg.global_batch is not None:
        per_step = batch * world_size
        if run_cfg.global_batch % per_step:
            raise UsageError(f"--global-batch {run_cfg.global_batch} is not a multiple of {per_step} (--batch-size "
                             f"{batch} x {world_size} process(es)); give a multiple of it")
        grad_accum = run_cfg.global_batch // per_step
        if cfg.grad_accum not in (1, grad_accum):
            raise UsageError(f"--grad-accum {cfg.grad_accum} disagrees with --global-batch (which needs "
                             f"{grad_accum}); give one of them")
    return dataclasses.replace(run_cfg, batch_size=batch), dataclasses.replace(cfg, grad_accum=grad_accum)


def can_probe(device: torch.device) -> bool:
    """Whether running out of memory on `device` is an error to catch: on a GPU, yes; a CPU would swap or meet
    the OOM killer instead (except under the simulated limit of the fault hook)."""
    return device.type == "cuda" or bool(faults.plan().get("oom-above"))


def auto_micro_batch(model: torch.nn.Module, seq: int, device: torch.device, dtype: torch.dtype) -> int:
    """The largest micro-batch whose training step fits on `device` (probed there), the same on every rank."""
    if not can_probe(device):
        return CPU_BATCH
    model.to(device)
    batch = find_micro_batch(lambda b: probe_training_step(model, b, seq, dtype))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        smallest = torch.tensor([batch], device=device)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)  # ranks may differ in memory
        batch = int(smallest.item())
    return batch
