"""Load weights from anywhere users keep them, through one function: `load_pretrained`.

Sources, recognised by their files:
1. an OpenAI GPT-2 folder (hparams.json + model.ckpt.*), read without TensorFlow;
2. a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin);
3. a gptlab model / run folder (config.json + model.safetensors) or a bare gptlab .safetensors file;
4. a state_dict saved by the book's GPTModel (model.pth, model_and_optimizer.pth);
5. a GPT-2 name (gpt2-small ... gpt2-xl, 124M ... 1558M): from the cache, downloaded if absent.

A gptlab or Hugging Face folder may hold the model's tokenizer (tokenizer.json, tokenizer_config.json);
the loaded model carries it as `model.tokenizer` (None means GPT-2's, what every other source uses).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ALIASES, PRESETS, GPTConfig
from ..errors import GptlabError, UsageError, did_you_mean
from ..model import GPTModel
from ..storage.files import read_json
from ..storage.safe_load import inspect_safetensors
from ..tokenizer import Tokenizer, get_tokenizer
from .assemble import Spec, assemble
from .book import book_config, load_book, read_book_state
from .download import (
    GPT2_SIZES,
    approx_bytes,
    cache_dir,
    canonical_gpt2,
    download_model,
    is_complete,
)
from .hf import (
    BIN_NAME,
    SAFETENSORS_NAME,
    config_from_hf,
    hf_weight_files,
    load_hf,
    looks_like_hf_config,
    save_hf,
)
from .native import CLASSIFIER_NAME, CONFIG_NAME, WEIGHTS_NAME, expected_shapes, stored_tokenizer
from .openai import HPARAMS_NAME, config_from_hparams, is_openai_folder, load_openai

__all__ = ["download_model", "identify", "load_pretrained", "model_tokenizer", "read_config", "save_hf"]


def _gptlab_file_config(path: Path, meta: dict | None = None) -> GPTConfig:
    """The config a bare gptlab .safetensors carries in its metadata, else the config.json beside it."""
    if meta is None:
        from safetensors import SafetensorError, safe_open

        inspect_safetensors(path)
        try:
            meta = safe_open(str(path), framework="pt").metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise GptlabError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from None
    if "gptlab_config" in meta:
        return GPTConfig.from_dict(json.loads(meta["gptlab_config"]))
    if (path.parent / CONFIG_NAME).is_file():
        return GPTConfig.load(path.parent / CONFIG_NAME)
    raise UsageError(f"{path} carries no gptlab config and there is no {CONFIG_NAME} beside it")


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
        config = _gptlab_file_config(path, meta)
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


@dataclass(frozen=True)
class Source:
    """What a --model spec points at: its kind and the file or folder to read."""

    kind: str  # openai | hf | gptlab | book | gpt2
    path: Path
    weights: Path | None = None  # hf: a weights file given directly; gptlab: the safetensors file
    config: Path | None = None  # gptlab: the config.json beside the weights, if any


def identify(path_or_name: str | os.PathLike) -> Source:
    """Recognise a model source by its files (or a GPT-2 name), without reading any weights."""
    path = Path(path_or_name)
    if path.is_dir():
        return _identify_folder(path)
    if path.is_file():
        return _identify_file(path)
    if (key := canonical_gpt2(str(path_or_name))) is not None:
        return Source("gpt2", Path(key))
    raise UsageError(f"no model at {path}: give a GPT-2 name ({', '.join(GPT2_SIZES)}), a model folder, a run "
                     f"folder or a weights file{did_you_mean(str(path_or_name), [*PRESETS, *ALIASES])}")


def _refuse_classifier(folder: Path) -> None:
    if (folder / CLASSIFIER_NAME).is_file():
        raise UsageError(f"{folder} holds a text classifier, not a language model: classify with it "
                         f"(gptlab classify --model {folder}; Python: gptlab.load_classifier)")


def _identify_folder(path: Path) -> Source:
    _refuse_classifier(path)
    if is_openai_folder(path):
        return Source("openai", path)
    config_path = path / CONFIG_NAME
    if config_path.is_file():
        if looks_like_hf_config(read_json(config_path)):
            if hf_weight_files(path) is None:
                raise UsageError(f"{path} has a Hugging Face {CONFIG_NAME} but no weights ({SAFETENSORS_NAME} or "
                                 f"{BIN_NAME}); copy the weights there")
            return Source("hf", path)
        if (path / WEIGHTS_NAME).is_file():
            return Source("gptlab", path, path / WEIGHTS_NAME, config_path)
        if (path / "model.pth").is_file():  # a book checkpoint with its config.json
            return Source("book", path / "model.pth")
        raise UsageError(f"{path} has {CONFIG_NAME} but no weights file ({WEIGHTS_NAME}, {BIN_NAME} or a book "
                         ".pth); copy the weights there, or point --model at the weights file")
    pths = sorted(path.glob("*.pth"))
    if len(pths) == 1:
        return Source("book", pths[0])
    raise UsageError(
        f"{path} holds no model gptlab recognises: expected {HPARAMS_NAME} + model.ckpt.* (OpenAI), "
        f"{CONFIG_NAME} + {WEIGHTS_NAME} (gptlab or Hugging Face), or a book .pth file"
    )


def _identify_file(path: Path) -> Source:
    suffix = path.suffix.lower()
    if path.name in (HPARAMS_NAME, "checkpoint") or ".ckpt" in path.name:
        return Source("openai", path.parent)
    if suffix in (".pth", ".pt"):
        return Source("book", path)
    if suffix == ".bin" or path.name == BIN_NAME:
        return Source("hf", path.parent, weights=path)
    if suffix == ".safetensors":
        _refuse_classifier(path.parent)
        beside = path.parent / CONFIG_NAME
        if beside.is_file() and looks_like_hf_config(read_json(beside)):
            return Source("hf", path.parent, weights=path)
        return Source("gptlab", path.parent, path, None)
    if path.name == CONFIG_NAME:
        return _identify_folder(path.parent)
    raise UsageError(f"{path}: not a weights file gptlab reads (.safetensors, .pth, .bin, or a model folder)")


def read_config(path_or_name: str | os.PathLike) -> GPTConfig:
    """The GPTConfig of any source load_pretrained accepts, reading configs only (a book .pth: its tensors' shapes)."""
    source = identify(path_or_name)
    if source.kind == "gpt2":
        return PRESETS[str(source.path)]
    if source.kind == "openai":
        return config_from_hparams(source.path / HPARAMS_NAME)
    if source.kind == "hf":
        return config_from_hf(read_json(source.path / CONFIG_NAME), str(source.path / CONFIG_NAME))
    if source.kind == "book":
        return book_config(read_book_state(source.path), source.path)[0]
    if source.config is not None:
        return GPTConfig.load(source.config)
    return _gptlab_file_config(source.weights)


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


def source_tokenizer(source: Source, config: GPTConfig | None = None) -> Tokenizer | None:
    """The tokenizer stored with a model (gptlab and Hugging Face folders), checked against its vocabulary;
    None for GPT-2's (OpenAI folders, the book's files, GPT-2 names, folders without tokenizer files)."""
    return stored_tokenizer(source.path, config) if source.kind in ("hf", "gptlab") else None


def model_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """The tokenizer of anything --model accepts, without reading weights (GPT-2's unless one is stored)."""
    from .resolve import RANDOM_PREFIX, is_random_spec

    spec = str(path_or_name)
    if is_random_spec(spec):
        return get_tokenizer()
    return source_tokenizer(identify(spec.removeprefix(RANDOM_PREFIX)), read_config(spec)) or get_tokenizer()


def load_pretrained(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> GPTModel:
    """A ready model (eval mode) from any of the five sources above; every shape is checked. The model's
    `tokenizer` is the one stored with it (None: GPT-2's)."""
    source = identify(path_or_name)
    if source.kind == "gpt2":
        model = _load_name(str(source.path), device, dtype)
    elif source.kind == "openai":
        model = load_openai(source.path, device, dtype)
    elif source.kind == "hf":
        model = load_hf(source.path, device, dtype, weights=source.weights)
    elif source.kind == "book":
        model = load_book(source.path, device, dtype)
    else:
        config = GPTConfig.load(source.config) if source.config is not None else None
        model = _load_gptlab(source.weights, config, device, dtype)
    model.tokenizer = source_tokenizer(source, model.config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
