"""What `--model` means, the same in every verb.

- a GPT-2 name (gpt2-small ... gpt2-xl, or 124M ... 1558M): OpenAI's trained weights, from the cache
  ($GPTLAB_HOME), downloaded first if absent;
- a model, run, Hugging Face or OpenAI folder, or a weights file: those weights (load_pretrained);
- a small preset (gpt-nano, gpt-micro, gpt-mini) or a config.json: that architecture with random weights
  (such presets have no trained weights);
- `random:NAME` or `random:config.json`: random weights for any architecture, GPT-2's sizes included.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..config import ALIASES, PRESETS, GPTConfig, get_preset
from ..errors import UsageError, did_you_mean
from ..model import GPTModel
from . import load_pretrained, read_config
from .download import canonical_gpt2

RANDOM_PREFIX = "random:"
# What each verb does with an untrained model, for the warning that says it has random weights.
UNTRAINED = {
    "generate": "its output will be gibberish",
    "eval": "its loss is that of an untrained model",
    "explain": "its probabilities are those of an untrained model",
    "serve": "its output will be gibberish",
    "finetune": "fine-tuning it only tries the pipeline out",
}


def is_preset(spec: str) -> bool:
    return spec in PRESETS or spec in ALIASES


def is_random_spec(spec: str) -> bool:
    """Whether `spec` asks for random weights: random:..., a preset without trained weights, or a config.json."""
    if spec.startswith(RANDOM_PREFIX):
        return True
    if canonical_gpt2(spec) is not None:
        return False
    path = Path(spec)
    return is_preset(spec) or (path.suffix == ".json" and path.is_file())


def resolve_config(spec: str) -> GPTConfig:
    """The architecture `spec` names: a preset, a config.json, `random:` either, or any model source's config."""
    spec = spec.removeprefix(RANDOM_PREFIX)
    if is_preset(spec):
        return get_preset(spec)
    path = Path(spec)
    if path.suffix == ".json" and not path.is_dir():
        if not path.is_file():
            raise UsageError(f"config file not found: {path}")
        return GPTConfig.load(path)
    if path.exists():
        return read_config(path)
    raise UsageError(f"unknown model {spec!r}{did_you_mean(spec, [*PRESETS, *ALIASES])}: give a preset "
                     f"({', '.join(PRESETS)}), a GPT-2 name, a config.json or a model folder")


def load_model_arg(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   purpose: str = "generate") -> GPTModel:
    """A model in eval mode for `--model` (module docstring); random weights come with a warning that
    says what that means for `purpose` (generate, eval, explain, serve)."""
    if not is_random_spec(spec):
        return load_pretrained(spec, device=device, dtype=dtype)
    config = resolve_config(spec)
    if not spec.startswith(RANDOM_PREFIX):
        warnings.warn(f"{spec} has random weights (untrained): {UNTRAINED.get(purpose, UNTRAINED['generate'])}",
                      stacklevel=2)
    model = GPTModel(config).to(device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
