"""The training state on disk: `checkpoint.pt`, plus the model folder and metrics written beside it.

One file, `checkpoint.pt`, holds everything needed to continue a run exactly: weights, optimizer
moments, loss-scaler, counters, the data position and every RNG. It is written atomically (temp
file, fsync, rename), so a crash while saving leaves the previous checkpoint intact, and read with
torch.load(weights_only=True), so it can hold only tensors and plain containers. A checkpoint of a
multi-rank run holds the full, plain-named weights and optimizer state (distributed.model_state_dict
/ optimizer_state_dict), gathered on every rank and written by rank 0 only.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import faults
from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..finetune.lora import lora_layers, merged_state_dict
from ..model import GPTModel, unwrap_model
from ..pretrained.native import load_state_into, model_state_for_saving, save_model, save_state
from ..storage.files import atomic_path
from ..storage.safe_load import safe_torch_load
from . import distributed as D
from .report import METRICS_NAME, PLOT_NAME, plot_losses, write_metrics
from .settings import TrainState

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gptlab-training-state"
CHECKPOINT_VERSION = 1


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from: Python, numpy, torch CPU and each accelerator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        state["mps"] = mps.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back RNG states saved by `capture_rng_state` (accelerators only where present)."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    path: str | os.PathLike,
    model: GPTModel,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int = 0,
    epoch: int = 0,
    batches_done: int = 0,
    tokens_seen: int = 0,
    loader_state: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> None:
    """Write the full training state to `path` atomically, RNG states included.

    `batches_done` counts the micro-batches of `epoch` already used; `loader_state` holds the data
    loader's generator states (see gptlab.train); `extra` is any further plain data (settings,
    loss history) kept with the checkpoint. `model_state` / `optimizer_state`: full states gathered
    from a multi-rank (DDP/FSDP) model by `gather_states`, used instead of the model's own.
    """
    if model_state is not None and unwrap_model(model).config.tie_embeddings:
        model_state = {k: v for k, v in model_state.items() if k != "out_head.weight"}
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": unwrap_model(model).config.to_dict(),
        "model": model_state if model_state is not None else model_state_for_saving(model),
        "optimizer": optimizer_state if optimizer_state is not None
        else optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step),
        "epoch": int(epoch),
        "batches_done": int(batches_done),
        "tokens_seen": int(tokens_seen),
        "loader": loader_state or {},
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        faults.during_save(tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw training state in `path`, validated; corrupt, truncated or foreign files are clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; start a new run instead of resuming")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        raise GptlabError(f"checkpoint {path} is corrupt or truncated (not a PyTorch archive); "
                          "start again with --force or restore a backup")
    try:
        state = safe_torch_load(path)
    except GptlabError as exc:
        raise GptlabError(f"checkpoint {path} is corrupt or truncated ({exc}); start again with --force") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise GptlabError(f"{path} is not a gptlab training checkpoint; point --out at a gptlab run folder")
    if state.get("version") != CHECKPOINT_VERSION:
        raise GptlabError(f"{path} has checkpoint version {state.get('version')}; this gptlab reads "
                          f"version {CHECKPOINT_VERSION}")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    model: GPTModel | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = False,
) -> dict:
    """Read a checkpoint written by `save_checkpoint`, load it into `model` / `optimizer` if given.

    The model's config must equal the checkpoint's (a clear error otherwise). With `restore_rng`
    the RNG states are put back too. Returns the whole state dict (step, epoch, loader, extra, ...).
    """
    state = read_checkpoint(path)
    if model is not None:
        inner = unwrap_model(model)
        check_same_config(state, inner.config, f"checkpoint {path}")
        load_state_into(inner, state["model"], str(path))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise GptlabError(f"checkpoint {path} holds no optimizer state; it cannot be resumed")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise GptlabError(f"checkpoint {path}: the optimizer state does not fit this model ({exc})") from None
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return state


def check_same_config(checkpoint: dict, config: GPTConfig, what: str) -> None:
    """Refuse a training checkpoint made for another model, naming every field that differs."""
    saved = GPTConfig.from_dict(checkpoint["model_config"])
    if saved != config:
        diff = [f"{k} {v} vs {getattr(config, k)}" for k, v in saved.to_dict().items() if getattr(config, k) != v]
        raise UsageError(f"{what} was made for another model ({', '.join(diff)} requested); "
                         "leave out --model/--context-length/--drop-rate or use a new --out")


# --- a run's state: what the loop saves and restores ------------------------------------------------

FULL_OPTIMIZER = "full"  # extra["optimizer_format"] of a checkpoint written by a multi-rank run


def gather_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """Full model and optimizer states on every rank of a multi-rank job ((None, None) otherwise)."""
    if not D.is_multi_rank():
        return None, None
    return D.model_state_dict(model), D.optimizer_state_dict(model, optimizer)


def save_training_state(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                        loader_state: dict, scaler: torch.amp.GradScaler, extra: dict, plot: bool = True) -> None:
    """Checkpoint first, then the model folder files, the metrics and the plot: the checkpoint is the truth.

    In a multi-rank job every rank must call this (the full states are gathered); rank 0 writes.
    """
    model_state, optimizer_state = gather_states(model, optimizer)
    if not D.is_main_process():
        return
    if model_state is not None:
        extra = {**extra, "optimizer_format": FULL_OPTIMIZER}
    save_checkpoint(
        out_dir / CHECKPOINT_NAME, model, optimizer,
        step=state.step, epoch=state.epoch, batches_done=state.batches_done, tokens_seen=state.tokens_seen,
        loader_state=loader_state, scaler=scaler,
        extra={**extra, "elapsed_s": state.elapsed_s, "metrics": state.metrics},
        model_state=model_state, optimizer_state=optimizer_state,
    )
    if lora_layers(model):  # the model folder holds plain weights, adapters merged; the checkpoint keeps them apart
        model_state = merged_state_dict(model, model_state)
    if model_state is not None:
        save_state(unwrap_model(model).config, model_state, out_dir, getattr(unwrap_model(model), "tokenizer", None))
    else:
        save_model(unwrap_model(model), out_dir)
    write_metrics(out_dir / METRICS_NAME, state.metrics)
    if plot and state.metrics:
        plot_losses(state.metrics, out_dir / PLOT_NAME)


def restore_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler) -> tuple[TrainState, dict, dict]:
    """Load a checkpoint into model/optimizer/RNGs (every rank of a multi-rank job reads the file, rank 0's
    copy is loaded); returns the state, the loader's RNG states and the checkpoint's `extra`."""
    if not D.is_multi_rank():
        ckpt = load_checkpoint(path, model, optimizer, scaler=scaler, restore_rng=True)
    else:
        ckpt = load_checkpoint(path, scaler=scaler, restore_rng=True)
        _load_full_states(model, optimizer, ckpt)
    extra = ckpt.get("extra", {})
    state = TrainState(
        step=ckpt["step"], epoch=ckpt["epoch"], batches_done=ckpt["batches_done"],
        tokens_seen=ckpt["tokens_seen"], elapsed_s=float(extra.get("elapsed_s", 0.0)),
        metrics=list(extra.get("metrics", [])),
    )
    return state, {**ckpt["loader"], "rng": ckpt["rng"]}, dict(extra)


def _load_full_states(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    """Load a checkpoint's weights and optimizer state into a wrapped/sharded model on every rank."""
    if ckpt.get("extra", {}).get("optimizer_format") != FULL_OPTIMIZER:
        raise UsageError("this checkpoint was written by a single process; resume it without torchrun "
                         "(the optimizer state is stored per process there)")
    state = dict(ckpt["model"])
    if unwrap_model(model).config.tie_embeddings and "out_head.weight" not in state:
        state["out_head.weight"] = state["tok_emb.weight"]  # stored once; the module has both names
    # Rank 0's copy is broadcast to the others (the helpers expect {} on those ranks).
    main = D.is_main_process()
    D.load_model_state_dict(model, state if main else {})
    D.load_optimizer_state_dict(model, optimizer, ckpt["optimizer"] if main else {})
