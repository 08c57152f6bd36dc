"""OpenAI's GPT-2 checkpoint folders (hparams.json + model.ckpt.*) -> GPTModel, without TensorFlow."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..model import GPTModel
from ..storage.download import gptlab_home
from ..storage.files import write_json
from .assemble import assemble, gpt2_specs, squeeze_transpose
from .tf_checkpoint import TFCheckpoint, find_prefix

HPARAMS_NAME = "hparams.json"
_HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "context_length", "n_embd": "emb_dim", "n_head": "n_heads",
            "n_layer": "n_layers"}


def is_openai_folder(path: Path) -> bool:
    return path.is_dir() and (path / HPARAMS_NAME).is_file() and any(path.glob("*.index"))


def config_from_hparams(path: str | os.PathLike) -> GPTConfig:
    """GPTConfig from OpenAI's hparams.json ({n_vocab, n_ctx, n_embd, n_head, n_layer})."""
    path = Path(path)
    try:
        hparams = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}; download the model again") from None
    missing = [k for k in _HPARAMS if k not in (hparams if isinstance(hparams, dict) else {})]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; is this an OpenAI GPT-2 hparams.json?")
    # GPT-2's own choices: biases on q/k/v, the LM head tied to the token embedding, dropout 0.1.
    return GPTConfig(**{ours: hparams[theirs] for theirs, ours in _HPARAMS.items()}, drop_rate=0.1,
                     qkv_bias=True, tie_embeddings=True)


def _openai_name(module: str, param: str) -> str:
    return f"model/{module.replace('.', '/')}" + (f"/{param}" if param else "")


def _data_stamp(prefix: Path) -> dict:
    """Size and modification time of the data shards: what a verified-marker vouches for."""
    shards = sorted(prefix.parent.glob(f"{prefix.name}.data-*"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in shards}


def verified_marker(prefix: Path) -> Path:
    """Where the note that a checkpoint's CRCs checked out lives: gptlab's cache, one file per checkpoint."""
    key = hashlib.sha256(str(Path(prefix).resolve()).encode()).hexdigest()[:16]
    return gptlab_home() / "verified" / f"{key}.json"


def load_openai(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                verify: bool | None = None) -> GPTModel:
    """Load an OpenAI GPT-2 folder; tensors are read from a memory map and CRC-checked.

    verify=None checks the CRCs once and remembers it in gptlab's cache ($GPTLAB_HOME/verified, keyed by
    the folder and the data files' size and mtime; never in the user's own folder, which may be
    read-only or shared) so later loads skip the check (~3-10 s for 124M with numpy); True always checks.
    """
    folder = Path(folder)
    config = config_from_hparams(folder / HPARAMS_NAME)
    prefix = find_prefix(folder)
    marker = verified_marker(prefix)
    stamp = _data_stamp(prefix)
    if verify is None:
        try:
            verify = json.loads(marker.read_text(encoding="utf-8")) != stamp
        except (OSError, ValueError):
            verify = True
    ckpt = TFCheckpoint(prefix, verify=verify)

    def fetch(name: str) -> torch.Tensor:
        # A private copy per tensor: the memory map is read-only, and torch wants writable memory.
        tensor = torch.from_numpy(np.array(ckpt.read(name)))
        return tensor.view(torch.bfloat16) if ckpt.is_bfloat16(name) else tensor

    specs = gpt2_specs(config, _openai_name, lambda n_in, n_out: (1, n_in, n_out), squeeze_transpose, ("g", "b"))
    model = assemble(config, specs, fetch, str(ckpt.prefix), str(folder / HPARAMS_NAME), device, dtype)
    if verify:
        with contextlib.suppress(GptlabError):  # a read-only folder just means checking again next time
            write_json(marker, stamp)
    return model
