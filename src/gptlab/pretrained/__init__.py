"""Load weights from anywhere users keep them, through one function: `load_pretrained`.

Sources, recognised by their files:
1. an OpenAI GPT-2 folder (hparams.json + model.ckpt.*), read without TensorFlow;
2. a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin);
3. a gptlab model / run folder (config.json + model.safetensors) or a bare gptlab .safetensors file;
4. a state_dict saved by the book's GPTModel (model.pth, model_and_optimizer.pth);
5. a GPT-2 name (gpt2-small ... gpt2-xl, 124M ... 1558M): from the cache, downloaded if absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..model import GPTModel
from ..storage.safe_load import inspect_safetensors
from .assemble import Spec, assemble
from .book import load_book
from .download import (
    GPT2_SIZES,
    approx_bytes,
    cache_dir,
    canonical_gpt2,
    download_model,
    is_complete,
)
from .hf import BIN_NAME, load_hf, looks_like_hf_config, save_hf
from .native import CONFIG_NAME, WEIGHTS_NAME, expected_shapes
from .openai import HPARAMS_NAME, is_openai_folder, load_openai

__all__ = ["download_model", "load_pretrained", "save_hf"]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _load_gptlab(path: Path, config: GPTConfig | None, device, dtype) -> GPTModel:
    """gptlab's own safetensors: read lazily, tensor by tensor (config from the file's metadata if not given)."""
    from safetensors import SafetensorError, safe_open

    inspect_safetensors(path)  # every byte range checked against the file before anything is mapped
    try:
        handle = safe_open(str(path), framework="pt")
        meta = handle.metadata() or {}
        names = set(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise GptlabError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from None
    if config is None:
        if "gptlab_config" in meta:
            config = GPTConfig.from_dict(json.loads(meta["gptlab_config"]))
        elif (path.parent / CONFIG_NAME).is_file():
            config = GPTConfig.load(path.parent / CONFIG_NAME)
        else:
            raise UsageError(f"{path} carries no gptlab config and there is no {CONFIG_NAME} beside it")
    shapes, optional = expected_shapes(config)
    inspect_safetensors(path, shapes, optional)  # names and shapes must be this config's, before any read
    if config.tie_embeddings:
        del shapes["out_head.weight"]

    def fetch(name: str) -> torch.Tensor:
        if name not in names:
            raise GptlabError(f"{path} has no tensor {name}; check config.json (n_layers, qkv_bias, tie_embeddings)")
        return handle.get_tensor(name)

    specs = [Spec(name, (name,), (shape,)) for name, shape in shapes.items()]
    return assemble(config, specs, fetch, str(path), "the config", device, dtype)


def _load_folder(path: Path, device, dtype) -> GPTModel:
    if is_openai_folder(path):
        return load_openai(path, device, dtype)
    config_path = path / CONFIG_NAME
    if config_path.is_file():
        data = _read_json(config_path)
        if looks_like_hf_config(data):
            return load_hf(path, device, dtype)
        if (path / WEIGHTS_NAME).is_file():
            return _load_gptlab(path / WEIGHTS_NAME, GPTConfig.load(config_path), device, dtype)
        if (path / "model.pth").is_file():  # a book checkpoint with its config.json
            return load_book(path / "model.pth", device, dtype)
    pths = sorted(path.glob("*.pth"))
    if len(pths) == 1:
        return load_book(pths[0], device, dtype)
    raise UsageError(
        f"{path} holds no model gptlab recognises: expected {HPARAMS_NAME} + model.ckpt.* (OpenAI), "
        f"{CONFIG_NAME} + {WEIGHTS_NAME} (gptlab or Hugging Face), or a book .pth file"
    )


def _load_file(path: Path, device, dtype) -> GPTModel:
    suffix = path.suffix.lower()
    if path.name in (HPARAMS_NAME, "checkpoint") or ".ckpt" in path.name:
        return load_openai(path.parent, device, dtype)
    if suffix in (".pth", ".pt"):
        return load_book(path, device, dtype)
    if suffix == ".bin" or path.name == BIN_NAME:
        return load_hf(path.parent, device, dtype, weights=path)
    if suffix == ".safetensors":
        beside = path.parent / CONFIG_NAME
        if beside.is_file() and looks_like_hf_config(_read_json(beside)):
            return load_hf(path.parent, device, dtype, weights=path)
        return _load_gptlab(path, None, device, dtype)
    if path.name == CONFIG_NAME:
        return _load_folder(path.parent, device, dtype)
    raise UsageError(f"{path}: not a weights file gptlab reads (.safetensors, .pth, .bin, or a model folder)")


def _load_name(key: str, device, dtype) -> GPTModel:
    """A GPT-2 size from the cache (OpenAI's files, else Hugging Face's), downloading OpenAI's if absent."""
    for source in ("openai", "huggingface"):
        folder = cache_dir(key, source)
        if is_complete(folder, source):
            return load_openai(folder, device, dtype) if source == "openai" else load_hf(folder, device, dtype)
    folder = cache_dir(key, "openai")
    print(
        f"{key} ({GPT2_SIZES[key]}) is not in the cache; downloading OpenAI's weights "
        f"(about {approx_bytes(key) / 1e9:.1f} GB) to {folder}",
        file=sys.stderr,
    )
    download_model(key, "openai", folder)
    return load_openai(folder, device, dtype)


def load_pretrained(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> GPTModel:
    """A ready model (eval mode) from any of the five sources above; every shape is checked."""
    path = Path(path_or_name)
    if path.is_dir():
        model = _load_folder(path, device, dtype)
    elif path.is_file():
        model = _load_file(path, device, dtype)
    elif (key := canonical_gpt2(str(path_or_name))) is not None:
        model = _load_name(key, device, dtype)
    else:
        raise UsageError(
            f"no model at {path}: give a GPT-2 name ({', '.join(GPT2_SIZES)}), a model folder, a run folder "
            "or a weights file"
        )
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
