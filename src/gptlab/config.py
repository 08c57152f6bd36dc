"""GPTConfig: the one dataclass that describes a model, plus GPT-2's named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UsageError, did_you_mean

# Names the command line offers without importing torch (hardware.py maps them to torch's objects).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT-2-architecture model (field names as in the book).

    `vocab_multiple` pads the embedding/LM-head rows up to a multiple (e.g. 64) for faster matmuls
    on accelerators; the padded logits are never returned, so results are unchanged.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = True
    tie_embeddings: bool = True
    vocab_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"GPTConfig.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise UsageError(f"GPTConfig.{name} must be positive, got {value}")
        if self.emb_dim % self.n_heads != 0:
            raise UsageError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                "pick a head count that divides the width"
            )
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, (int, float)):
            raise UsageError(f"GPTConfig.drop_rate must be a number, got {self.drop_rate!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise UsageError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def replace(self, **overrides: Any) -> GPTConfig:
        """A copy with some fields changed (None values are ignored), validated again."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UsageError(f"unknown GPTConfig field(s): {', '.join(unknown)}{did_you_mean(unknown[0], known)}; "
                             f"known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        if not isinstance(data, dict):
            raise UsageError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(
                f"unknown GPTConfig field(s) {', '.join(unknown)}{did_you_mean(unknown[0], known)}; expected "
                f"fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        from .storage.files import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> GPTConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read config {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate it") from None
        return cls.from_dict(data)


_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.1, qkv_bias=True, tie_embeddings=True)

PRESETS: dict[str, GPTConfig] = {
    # OpenAI's four GPT-2 sizes, exact hyper-parameters.
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12, **_GPT2),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16, **_GPT2),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20, **_GPT2),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25, **_GPT2),
    # Small models for CPU experiments (GPT-2 tokenizer, so the embedding dominates the count).
    "gpt-nano": GPTConfig(context_length=128, emb_dim=128, n_layers=4, n_heads=4, drop_rate=0.0),  # ~7M
    "gpt-micro": GPTConfig(context_length=256, emb_dim=192, n_layers=6, n_heads=6, drop_rate=0.0),  # ~12M
    "gpt-mini": GPTConfig(context_length=512, emb_dim=384, n_layers=6, n_heads=6, drop_rate=0.0),  # ~30M
}

# OpenAI's own names for the four sizes.
ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl", "gpt2": "gpt2-small"}


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """A named preset (or OpenAI alias such as '124M'), optionally with fields overridden."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise UsageError(f"unknown model preset {name!r}{did_you_mean(name, [*PRESETS, *ALIASES])}; choose one of: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[key].replace(**overrides)
