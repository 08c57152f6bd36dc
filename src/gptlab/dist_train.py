"""What `gptlab train` adds around the loop for torchrun jobs and accelerators.

Picking the strategy, joining the process group, wrapping (DDP/FSDP) and compiling the model, the
CUDA speed switches (TF32), and checkpoints of wrapped models. A checkpoint of a multi-rank run holds
the full, plain-named weights and optimizer state (distributed.model_state_dict /
optimizer_state_dict), gathered on every rank and written by rank 0 only.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import distributed as D
from .errors import UsageError

STRATEGY_CHOICES = ("none", "ddp", "fsdp")
FULL_OPTIMIZER = "full"  # extra["optimizer_format"] of a checkpoint written by a multi-rank run


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


def setup(device: torch.device) -> D.DistInfo:
    """Join the torchrun job (if any), and switch on TF32 matmuls on CUDA."""
    info = D.init_distributed(device)
    if info.device.type == "cuda":
        # TF32 tensor cores for float32 matmuls: ~8x faster than IEEE fp32, 10-bit mantissa is plenty here.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return info


def prepare_model(model: nn.Module, strategy: str, device: torch.device, compile_backend: str | None) -> nn.Module:
    """Wrap for data parallelism (ddp/fsdp under torchrun), then torch.compile when a backend is given."""
    if strategy != "none" and D.get_world_size() > 1:
        model = D.wrap_model(model, strategy, device)
    else:
        model = model.to(device)
    if compile_backend:
        from .speed import compile_model

        model = compile_model(model, backend=compile_backend)
    return model


def is_multi_rank() -> bool:
    return D.get_world_size() > 1


def gather_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """Full model and optimizer states on every rank of a multi-rank job ((None, None) otherwise)."""
    if not is_multi_rank():
        return None, None
    return D.model_state_dict(model), D.optimizer_state_dict(model, optimizer)


def load_states(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    """Load a checkpoint's weights and optimizer state into a wrapped/sharded model on every rank."""
    from .checkpoint import model_of

    if ckpt.get("extra", {}).get("optimizer_format") != FULL_OPTIMIZER:
        raise UsageError("this checkpoint was written by a single process; resume it without torchrun "
                         "(the optimizer state is stored per process there)")
    state = dict(ckpt["model"])
    if model_of(model).config.tie_embeddings and "out_head.weight" not in state:
        state["out_head.weight"] = state["tok_emb.weight"]  # stored once; the module has both names
    # Rank 0's copy is broadcast to the others (the helpers expect {} on those ranks).
    main = D.is_main_process()
    D.load_model_state_dict(model, state if main else {})
    D.load_optimizer_state_dict(model, optimizer, ckpt["optimizer"] if main else {})


def check_world_size(saved: int | None) -> None:
    """Resuming on another number of ranks changes the global batch, so the data order would not continue."""
    now = D.get_world_size()
    if saved is not None and int(saved) != now:
        raise UsageError(
            f"the run was trained on {saved} rank(s) and this job has {now}; resume with "
            f"torchrun --nproc_per_node {saved} (the global batch, and so the data order, depends on it)"
        )


def tag_run_info(run_info: dict | None, model_state: dict | None) -> dict | None:
    """Mark a checkpoint whose optimizer state is in the full (name-keyed) form of a multi-rank run."""
    if model_state is None:
        return run_info
    return {**(run_info or {}), "optimizer_format": FULL_OPTIMIZER}


def save_model_folder(model: nn.Module, model_state: dict | None, folder) -> None:
    """config.json + model.safetensors of a (possibly wrapped or sharded) model, on rank 0."""
    from .checkpoint import model_of, save_model

    if model_state is not None:
        D.save_full_state(model_of(model).config, model_state, folder)
    else:
        save_model(model_of(model), folder)


def load_training_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> dict:
    """checkpoint.load_checkpoint, or on several ranks: every rank reads the file, rank 0's copy is loaded."""
    from .checkpoint import load_checkpoint

    if not is_multi_rank():
        return load_checkpoint(path, model, optimizer, scaler=scaler, restore_rng=True)
    ckpt = load_checkpoint(path, scaler=scaler, restore_rng=True)
    load_states(model, optimizer, ckpt)
    return ckpt
