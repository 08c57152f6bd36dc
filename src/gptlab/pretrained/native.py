"""gptlab's own model format: `config.json` (GPTConfig) + `model.safetensors` (weights), plus the model's
tokenizer (`tokenizer.json` + `tokenizer_config.json`) unless it is GPT-2's, which needs no files.

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

from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..model import GPTModel, unwrap_model
from ..storage.files import atomic_path
from ..storage.safe_load import check_tensor_set, inspect_safetensors
from ..tokenizer import BPETokenizer, Tokenizer, as_tokenizer, get_tokenizer, has_tokenizer, write_tokenizer
from ..tokenizer.gpt2 import GPT2_NAME

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Beside config.json + model.safetensors in a classifier's folder (finetune/classifier.py): its head
# is over classes, not the vocabulary, so it is no language model.
CLASSIFIER_NAME = "classifier.json"


def model_state_for_saving(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights, contiguous, on the CPU, with a tied head left out."""
    model = unwrap_model(model)
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("out_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights(model: GPTModel, path: str | os.PathLike) -> None:
    """Write the model's weights as safetensors, atomically."""
    _write_weights(model.config, model_state_for_saving(model), path)


def _write_weights(config: GPTConfig, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    metadata = {"format": "pt", "gptlab_config": json.dumps(config.to_dict())}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def save_model(model: GPTModel, folder: str | os.PathLike) -> Path:
    """Save `config.json` + `model.safetensors` into `folder` (created if needed), and the model's tokenizer
    (`model.tokenizer`) when it is not GPT-2's."""
    inner = unwrap_model(model)
    return save_state(inner.config, model_state_for_saving(model), folder, getattr(inner, "tokenizer", None))


def save_state(config: GPTConfig, state: dict[str, torch.Tensor], folder: str | os.PathLike,
               tokenizer: Tokenizer | None = None) -> Path:
    """Write a full, plainly named state dict (e.g. gathered from several ranks) as gptlab's model format,
    with the model's tokenizer (None: GPT-2's; tokenizer files left from another model are removed)."""
    folder = Path(folder)
    tok = as_tokenizer(tokenizer)
    if tok.name != GPT2_NAME:
        check_vocabulary(config, tok, "the model to save")
    if config.tie_embeddings:  # the head is the embedding: stored once
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    config.save(folder / CONFIG_NAME)
    _write_weights(config, {k: v.detach().to("cpu").contiguous() for k, v in state.items()}, folder / WEIGHTS_NAME)
    write_tokenizer(tok, folder)
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
    check_tensor_set(source, state, expected, hint="check config.json")
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
    if config is not None:
        inspect_safetensors(path, *expected_shapes(config, model))
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UsageError(f"weights file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptlabError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from None


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """Load a model saved by `save_model` (a folder holding config.json and model.safetensors, and the
    tokenizer files of a model that does not use GPT-2's tokenizer, which become `model.tokenizer`)."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise UsageError(f"{folder} is not a gptlab model folder: {name} is missing")
    config = GPTConfig.load(folder / CONFIG_NAME)
    with torch.device("meta"):  # no memory and no random init for weights that are replaced anyway
        model = GPTModel(config)
    state = read_safetensors(folder / WEIGHTS_NAME, config, model)
    load_state_into(model, state, str(folder / WEIGHTS_NAME), assign=True)
    model.tokenizer = stored_tokenizer(folder, config)
    return model.to(device)


def stored_tokenizer(folder: str | os.PathLike, config: GPTConfig | None = None) -> Tokenizer | None:
    """The tokenizer a model folder (gptlab's or Hugging Face's) holds, checked against the model's
    vocabulary; None when it holds none or GPT-2's."""
    folder = Path(folder)
    if not (has_tokenizer(folder) or (folder / "vocab.json").is_file()):
        return None
    tok = get_tokenizer(folder)
    if tok.name == GPT2_NAME:
        return None
    if config is not None:
        check_vocabulary(config, tok, folder)
    return tok


def check_vocabulary(config: GPTConfig, tok: Tokenizer, where: str | os.PathLike) -> None:
    """A model's tokenizer must fit its vocabulary: exactly for gptlab's tokenizers, at most for imported
    ones (Hugging Face models may pad their vocabulary)."""
    imported = isinstance(tok, BPETokenizer) and "imported_from" in tok.record
    if tok.n_vocab > config.vocab_size or (tok.n_vocab != config.vocab_size and not imported):
        raise UsageError(f"{where}: the tokenizer ({tok.name}) has {tok.n_vocab:,} tokens but the model's "
                         f"vocab_size is {config.vocab_size:,}; the tokenizer files belong to another model: "
                         "restore the model's own")
