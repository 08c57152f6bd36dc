"""What a tokenizer argument means, the same everywhere: `--tokenizer`, `get_tokenizer(...)`, the
`tokenizer=` argument of the Python API.

- None or "gpt2": GPT-2's BPE (the default);
- a folder: the tokenizer it holds: one made by `gptlab tokenizer train`, a model or run folder's
  (GPT-2's when it holds none), a Hugging Face folder's;
- a Tokenizer object: itself; a `tiktoken.Encoding` (the book's `tiktoken.get_encoding("gpt2")`): wrapped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UsageError
from .base import Tokenizer
from .folder import CONFIG_FILE, TOKENIZER_FILE, has_tokenizer, load_folder
from .gpt2 import GPT2_NAME, GPT2_VOCAB_SIZE, TiktokenTokenizer, gpt2_tokenizer

# Files that make a folder a model folder (gptlab, Hugging Face, OpenAI): without tokenizer files, GPT-2's.
_MODEL_FILES = ("config.json", "model.safetensors", "hparams.json")


def get_tokenizer(folder_or_name: str | os.PathLike | Tokenizer | None = None) -> Tokenizer:
    """GPT-2's tokenizer (no argument, or "gpt2"), or the tokenizer a folder holds (module docstring)."""
    if folder_or_name is None or (isinstance(folder_or_name, str) and folder_or_name == GPT2_NAME):
        return gpt2_tokenizer()
    if not isinstance(folder_or_name, (str, os.PathLike)):
        return as_tokenizer(folder_or_name)
    path = Path(folder_or_name)
    if path.is_file() and path.name in (TOKENIZER_FILE, CONFIG_FILE):
        path = path.parent
    if path.is_dir() and not has_tokenizer(path) and not (path / "vocab.json").is_file() \
            and any((path / name).is_file() for name in _MODEL_FILES):
        return gpt2_tokenizer()  # a model folder without tokenizer files: a GPT-2 model
    if path.is_file():
        raise UsageError(f"{path} is a file; give gpt2 or a tokenizer folder (tokenizer.json + {CONFIG_FILE})")
    return load_folder(path)


def as_tokenizer(tokenizer) -> Tokenizer:
    """Any tokenizer argument as a Tokenizer: None (GPT-2), a name or folder, a Tokenizer, a tiktoken.Encoding."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return get_tokenizer(tokenizer)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    import tiktoken

    if isinstance(tokenizer, tiktoken.Encoding):
        if tokenizer.name in ("gpt2", "gpt2-offline") and tokenizer.n_vocab == GPT2_VOCAB_SIZE:
            return gpt2_tokenizer()  # tiktoken's own GPT-2 encoding: the same ids
        return TiktokenTokenizer(tokenizer, tokenizer.name, sha256="")
    raise UsageError(f"not a tokenizer: {type(tokenizer).__name__}; give gpt2, a tokenizer folder or a Tokenizer")


def tokenizer_of(model) -> Tokenizer:
    """The tokenizer a model was trained with: its `tokenizer` attribute (set by load_pretrained and
    gptlab train), GPT-2's when it has none. Works through DDP/FSDP/torch.compile wrappers."""
    from ..model import unwrap_model

    return as_tokenizer(getattr(unwrap_model(model), "tokenizer", None))


def encode(text: str, tokenizer=None) -> list[int]:
    """Token ids of `text` (GPT-2's by default); `<|endoftext|>` in the text becomes its special id."""
    return as_tokenizer(tokenizer).encode(text)


def decode(ids, tokenizer=None) -> str:
    """Text of token ids (invalid UTF-8 across a cut is replaced, never raised)."""
    return as_tokenizer(tokenizer).decode(ids)


def text_to_token_ids(text: str, tokenizer=None) -> torch.Tensor:
    """Encode `text` to a (1, T) tensor of token ids, the model's batch-of-one input."""
    return torch.tensor(as_tokenizer(tokenizer).encode(text), dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer=None) -> str:
    """Decode a (1, T) or (T,) tensor of token ids back to text."""
    flat = token_ids.squeeze(0) if token_ids.dim() == 2 else token_ids
    return as_tokenizer(tokenizer).decode(flat.tolist())
