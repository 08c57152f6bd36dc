"""Data-parallel training under torchrun: DDP and FSDP2 (fully_shard), on CUDA (nccl) or CPU (gloo).

Picking the strategy, joining the process group, wrapping (DDP/FSDP) and compiling the model, the
collectives the loop needs, and full (gathered) state dicts for checkpoints.

A job started by `torchrun` has RANK, WORLD_SIZE and LOCAL_RANK in its environment; without them
everything here falls back to a single process (no process group), so one code path serves both.

State dicts use torch.distributed.checkpoint's "full" form: plain names (no `module.` or
`_orig_mod.`), whole tensors, the optimizer keyed by parameter name. That form does not depend on the
strategy or the number of ranks: these helpers load a checkpoint written by 2 FSDP ranks into 4 DDP
ranks or one process. (`gptlab train --resume` still asks for the same number of ranks, because the
global batch, and with it the data order, depends on it: `check_world_size`.)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GptlabError, UsageError
from ..model import unwrap_model, wrapper_layers
from .settings import STRATEGY_CHOICES

STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "GPTLAB_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not a whole number") from None


def timeout_seconds() -> float:
    """Collective timeout: GPTLAB_DIST_TIMEOUT seconds, default 300."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw is not None else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UsageError(f"{TIMEOUT_ENV} must be positive, got {raw}")
    return value


def init_distributed(device: torch.device | str = "cpu", timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK (no-op for a single process).

    CUDA: nccl, one GPU per local rank (cuda:LOCAL_RANK). CPU: gloo. A collective that waits longer
    than `timeout_s` (default: GPTLAB_DIST_TIMEOUT or 300 s) for a dead or stuck rank raises instead
    of hanging, and torchrun then stops the other ranks.
    """
    device = torch.device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistInfo(device=device)
    if not dist.is_available():
        raise GptlabError("this torch build has no torch.distributed; run a single process")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                "set torchrun --nproc_per_node to at most the GPU count"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"distributed training supports cuda and cpu devices, not {device.type}")
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else timeout_seconds())
    if not dist.is_initialized():
        with translate_errors(rank):
            dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def is_main_process() -> bool:
    """True on rank 0, and in a single process: only it logs, plots and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cleanup(sync: bool = False) -> None:
    """Leave the process group (safe to call when none was started).

    sync: first wait for every rank (after a successful run), so no rank tears down its connections
    while a peer is still finishing (rank 0 writes files last); gloo aborts a process whose peer
    disappears under it. Not used on the error path, where a peer may be gone for good.
    """
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def translate_errors(rank: int | None = None) -> Iterator[None]:
    """Turn a collective's failure (a peer died, or a timeout) into one clear GptlabError."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if isinstance(exc, GptlabError) or not _looks_distributed(exc):
            raise
        who = f"rank {get_rank() if rank is None else rank}"
        # Keep gloo/nccl's first sentence, without its "[/path/file.cc:123]" source location.
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        first = first.split(". ")[0][:160] or type(exc).__name__
        raise GptlabError(
            f"{who}: lost contact with another rank ({first}); that rank failed or hung (its own error, "
            f"if any, is above), so the job stops; collectives time out after {timeout_seconds():g} s "
            f"({TIMEOUT_ENV})"
        ) from exc


def _looks_distributed(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "store"))


def wrap_model(model: nn.Module, strategy: str, device: torch.device | str) -> nn.Module:
    """Move `model` to `device` and wrap it for data-parallel training (as is in a single process).

    ddp: DistributedDataParallel (every rank holds all weights, gradients are all-reduced).
    fsdp: FSDP2 fully_shard on every transformer block, then on the root (embeddings, head, final
    norm): weights, gradients and optimizer state are sharded across ranks. Works with gloo on CPU
    in torch 2.13. Wrap before building the optimizer; apply torch.compile after wrapping.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    device = torch.device(device)
    model = model.to(device)
    if get_world_size() <= 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "trf_blocks", []):
        fully_shard(block)
    fully_shard(model)  # the tied embedding/head live in the root group, so the tie survives sharding
    return model


def _find(model: nn.Module, kind: type) -> nn.Module | None:
    return next((layer for layer in wrapper_layers(model) if isinstance(layer, kind)), None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter when `enabled` is False (not the last micro-step).

    DDP: model.no_sync(). FSDP2: set_requires_gradient_sync(False) (gradients stay local and
    unsharded until the synchronised micro-step). Single process: nothing to skip.
    """
    if enabled or get_world_size() <= 1:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    ddp = _find(model, DistributedDataParallel)
    if ddp is not None:
        with ddp.no_sync():
            yield
        return
    fsdp = _find(model, FSDPModule)
    if fsdp is None:
        yield
        return
    fsdp.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        fsdp.set_requires_gradient_sync(True)


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | str | None = None) -> float:
    """Mean of a scalar over all ranks (the value itself in a single process)."""
    return all_reduce_sum(value, device) / get_world_size()


def all_reduce_mean_tensor(value: torch.Tensor) -> torch.Tensor:
    """Mean of a 0-d tensor over all ranks, as a tensor on its device: no host-device synchronisation."""
    if get_world_size() <= 1:
        return value.detach()
    total = value.detach().clone()
    with translate_errors():
        dist.all_reduce(total)
    return total / get_world_size()


def all_reduce_sum(value: float | torch.Tensor, device: torch.device | str | None = None) -> float:
    """Sum of a scalar over all ranks (e.g. loss sums and token counts for an exact mean)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().sum().item()
    if get_world_size() <= 1:
        return float(value)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    with translate_errors():
        dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    if get_world_size() > 1:
        with translate_errors():
            dist.barrier()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights with plain names, on the CPU. Call on EVERY rank (FSDP gathers the shards);
    under FSDP only rank 0 gets the tensors (others get {}), so save on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sharded = get_world_size() > 1 and _is_fsdp(model)
    with translate_errors():
        state = get_model_state_dict(model, options=_options(cpu_offload=sharded))
    return {k: v.detach().to("cpu") for k, v in state.items()}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name; call on every rank (see model_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sharded = get_world_size() > 1 and _is_fsdp(model)
    with translate_errors():
        return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=sharded))


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full, plain-named weights into a (possibly wrapped or sharded) model, on every rank.

    In a multi-rank job only rank 0 needs the real `state` (others may pass {}): it is broadcast.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    multi = get_world_size() > 1
    with translate_errors():
        set_model_state_dict(model, state, options=_options(broadcast_from_rank0=multi, strict=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (from optimizer_state_dict) on every rank; rank 0's is broadcast."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    multi = get_world_size() > 1
    with translate_errors():
        set_optimizer_state_dict(model, optimizer, state, options=_options(broadcast_from_rank0=multi))


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return _find(model, FSDPModule) is not None


def save_model_distributed(model: nn.Module, folder) -> None:
    """Save a wrapped/sharded/compiled model in gptlab's format (config.json + model.safetensors).

    Call on every rank; rank 0 writes.
    """
    from ..pretrained.native import save_state

    state = model_state_dict(model)
    if is_main_process():
        save_state(unwrap_model(model).config, state, folder)


def log(*parts, **kw) -> None:
    """print() on rank 0 only (to stderr unless file= is given)."""
    if is_main_process():
        kw.setdefault("file", sys.stderr)
        print(*parts, **kw)


# --- what `gptlab train` adds around the loop ------------------------------------------------------


def pick_strategy(requested: str | None, log=print) -> str:
    """--strategy: none for one process; under torchrun with several ranks, ddp unless fsdp is asked for."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if requested not in (None, *STRATEGY_CHOICES):
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGY_CHOICES)}, not {requested!r}")
    if world > 1:
        if requested == "none":
            raise UsageError(f"--strategy none cannot train on {world} ranks (WORLD_SIZE={world}); "
                             "use --strategy ddp or fsdp, or run one process")
        if requested is None:
            log(f"{world} ranks and no --strategy: using ddp")
            return "ddp"
        return requested
    if requested in ("ddp", "fsdp"):
        log(f"--strategy {requested} with a single process: training unwrapped (launch with torchrun for more ranks)")
    return requested or "none"


def setup(device: torch.device) -> DistInfo:
    """Join the torchrun job (if any), and switch on TF32 matmuls on CUDA."""
    info = init_distributed(device)
    if info.device.type == "cuda":
        # TF32 tensor cores for float32 matmuls: ~8x faster than IEEE fp32, 10-bit mantissa is plenty here.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return info


def prepare_model(model: nn.Module, strategy: str, device: torch.device, compile_backend: str | None) -> nn.Module:
    """Wrap for data parallelism (ddp/fsdp under torchrun), then torch.compile when a backend is given."""
    if strategy != "none" and get_world_size() > 1:
        model = wrap_model(model, strategy, device)
    else:
        model = model.to(device)
    if compile_backend:
        from ..hardware import compile_model

        model = compile_model(model, backend=compile_backend)
    return model


def is_multi_rank() -> bool:
    return get_world_size() > 1


def check_world_size(saved: int | None) -> None:
    """Resuming on another number of ranks changes the global batch, so the data order would not continue."""
    now = get_world_size()
    if saved is not None and int(saved) != now:
        raise UsageError(
            f"the run was trained on {saved} rank(s) and this job has {now}; resume with "
            f"torchrun --nproc_per_node {saved} (the global batch, and so the data order, depends on it)"
        )
