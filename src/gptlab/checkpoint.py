"""gptlab's on-disk model format: `config.json` (GPTConfig) + `model.safetensors` (weights).

A tied LM head is stored once (as the token embedding): safetensors refuses tensors that share
memory, and the copy would only waste space.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults
from .config import GPTConfig
from .errors import GptlabError, UsageError
from .fileio import atomic_path
from .model import GPTModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def model_state_for_saving(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights, contiguous, on the CPU, with a tied head left out."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("out_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights(model: GPTModel, path: str | os.PathLike) -> None:
    """Write the model's weights as safetensors, atomically."""
    metadata = {"format": "pt", "gptlab_config": json.dumps(model.config.to_dict())}
    with atomic_path(path) as tmp:
        save_file(model_state_for_saving(model), str(tmp), metadata=metadata)


def save_model(model: GPTModel, folder: str | os.PathLike) -> Path:
    """Save `config.json` + `model.safetensors` into `folder` (created if needed)."""
    folder = Path(folder)
    model.config.save(folder / CONFIG_NAME)
    save_weights(model, folder / WEIGHTS_NAME)
    return folder


def load_state_into(model: GPTModel, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Copy `state` into `model`, checking every name and shape first with a clear error.

    assign=True makes the loaded tensors the parameters instead of copying them (no second copy of
    every weight; `model` may then live on the meta device). They are cast to the model's dtype.
    """
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("out_head.weight", None)
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise GptlabError(f"{source} does not match the model config ({'; '.join(parts)}); check config.json")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GptlabError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} but the config expects "
                f"{tuple(expected[name].shape)}; the weights were made for a different model size"
            )
    if assign:
        state = {name: t.to(expected[name].dtype) for name, t in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()  # the head must share the embedding just assigned
        return
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in state:
                param.copy_(state[name])


def expected_shapes(
    config: GPTConfig, model: GPTModel | None = None
) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """name -> shape of every tensor a model with `config` has (no memory used), and the optional names.

    `model`: a model of that config (e.g. on the meta device) to read them from instead of building one.
    """
    if model is None:
        with torch.device("meta"):
            model = GPTModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, frozenset({"out_head.weight"} if config.tie_embeddings else ())


def read_safetensors(
    path: str | os.PathLike, config: GPTConfig | None = None, model: GPTModel | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with `config`, the header is checked against it before reading."""
    from .safety import inspect_safetensors

    if config is not None:
        inspect_safetensors(path, *expected_shapes(config, model))
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UsageError(f"weights file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptlabError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from None


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """Load a model saved by `save_model` (a folder holding config.json and model.safetensors)."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise UsageError(f"{folder} is not a gptlab model folder: {name} is missing")
    config = GPTConfig.load(folder / CONFIG_NAME)
    with torch.device("meta"):  # no memory and no random init for weights that are replaced anyway
        model = GPTModel(config)
    state = read_safetensors(folder / WEIGHTS_NAME, config, model)
    load_state_into(model, state, str(folder / WEIGHTS_NAME), assign=True)
    return model.to(device)


def check_same_config(checkpoint: dict, config: GPTConfig, what: str) -> None:
    """Refuse a training checkpoint made for another model, naming every field that differs."""
    saved = GPTConfig.from_dict(checkpoint["model_config"])
    if saved != config:
        diff = [f"{k} {v} vs {getattr(config, k)}" for k, v in saved.to_dict().items() if getattr(config, k) != v]
        raise UsageError(f"{what} was made for another model ({', '.join(diff)} requested); "
                         "leave out --model/--context-length/--drop-rate or use a new --out")


# --- Training state ------------------------------------------------------------------------------
# One file, `checkpoint.pt`, holds everything needed to continue a run exactly: weights, optimizer
# moments, loss-scaler, counters, the data position and every RNG. It is written atomically (temp
# file, fsync, rename), so a crash while saving leaves the previous checkpoint intact, and read with
# torch.load(weights_only=True), so it can hold only tensors and plain containers.

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gptlab-training-state"
CHECKPOINT_VERSION = 1


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from: Python, numpy, torch CPU and each accelerator."""
    import random

    import numpy as np

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
    import random

    import numpy as np

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
    from a multi-rank (DDP/FSDP) model by gptlab.dist_train, used instead of the model's own.
    """
    if model_state is not None and model_of(model).config.tie_embeddings:
        model_state = {k: v for k, v in model_state.items() if k != "out_head.weight"}
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model_of(model).config.to_dict(),
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


def model_of(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside torch.compile / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw training state in `path`, validated; corrupt, truncated or foreign files are clear errors."""
    import zipfile

    from .safety import safe_torch_load

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
        inner = model_of(model)
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
