"""What `--model` means: a preset, a config.json, a GPT-2 name or saved weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..config import ALIASES, PRESETS, GPTConfig, get_preset
from ..errors import UsageError
from ..model import GPTModel
from . import load_pretrained
from .download import canonical_gpt2


def is_preset(spec: str) -> bool:
    return spec in PRESETS or spec in ALIASES


def resolve_config(spec: str) -> GPTConfig:
    """The config named by `spec`: a preset, a config.json file, or a folder holding one."""
    if is_preset(spec):
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UsageError(f"config file not found: {path}")
        return GPTConfig.load(path)
    raise UsageError(f"unknown model {spec!r}: give a preset ({', '.join(PRESETS)}), a config.json or a model folder")


RANDOM_PREFIX = "random:"


def load_model_arg(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, warn_random: bool = True
) -> GPTModel:
    """A model for `--model`.

    - a GPT-2 name (gpt2-small ... gpt2-xl, 124M ... 1558M): OpenAI's trained weights, from the cache
      ($GPTLAB_HOME), downloaded first if absent;
    - `random:NAME` or `random:config.json`: that architecture with random (untrained) weights;
    - another preset (gpt-nano ...) or a config.json: random weights, with a warning;
    - anything else: saved weights, through load_pretrained (OpenAI / Hugging Face / gptlab / book).
    """
    explicit_random = spec.startswith(RANDOM_PREFIX)
    if explicit_random:
        spec = spec[len(RANDOM_PREFIX) :]
    elif canonical_gpt2(spec) is not None:
        return load_pretrained(spec, device=device, dtype=dtype)
    path = Path(spec)
    if not explicit_random and not is_preset(spec) and not (path.suffix == ".json" and path.is_file()):
        return load_pretrained(spec, device=device, dtype=dtype)
    config = resolve_config(spec)
    if warn_random and not explicit_random:
        print(f"warning: {spec} has random weights (untrained); output will be gibberish", file=sys.stderr)
    model = GPTModel(config).to(device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
