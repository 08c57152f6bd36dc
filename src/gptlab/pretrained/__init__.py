"""Load weights from anywhere users keep them, through one function: `load_pretrained`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model
from ..errors import UsageError
from ..model import GPTModel


def load_pretrained(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> GPTModel:
    """A ready model (eval mode) from a gptlab model or run folder."""
    path = Path(path_or_name)
    if path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        model = load_model(path, device=device)
    elif path.exists():
        raise UsageError(f"{path} is not a model folder (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)")
    else:
        raise UsageError(f"no model at {path}: give a preset name, a model folder or a run folder")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
