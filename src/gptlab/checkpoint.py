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


def load_state_into(model: GPTModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, checking every name and shape first with a clear error."""
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
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in state:
                param.copy_(state[name])


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
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
    with torch.device("meta"):
        model = GPTModel(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty() gives each module its own fresh tensor, which unties the head
    load_state_into(model, read_safetensors(folder / WEIGHTS_NAME), str(folder / WEIGHTS_NAME))
    return model.to(device)
