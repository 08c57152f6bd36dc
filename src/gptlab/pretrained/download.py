"""Download GPT-2's weights: OpenAI's original files or the Hugging Face copies, resumably.

Files go through gptlab's one downloader (storage.download.fetch_file: resumable, size and sha256
checked); OpenAI's files fall back to the book's public mirror.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ALIASES, PRESETS
from ..errors import GptlabError, UsageError
from ..storage.download import fetch_file, gptlab_home

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# The public mirror used by the book's own downloader (LLMs-from-scratch, ch05 gpt_download.py).
OPENAI_MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
HF_URL = "https://huggingface.co"

OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
HF_FILES = ("config.json", "model.safetensors")
GPT2_SIZES = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
HF_REPOS = {"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
SOURCES = ("openai", "huggingface")

# Sizes (bytes) established as facts: the book's own test of OpenAI's and the mirror's files
# (LLMs-from-scratch ch05, tests.py), and the Hugging Face LFS record of gpt2's model.safetensors.
# Other files are checked against the server's Content-Length, and OpenAI's tensors against the
# CRC-32C stored in the checkpoint when they are loaded.
_OPENAI_COMMON = {"checkpoint": 77, "encoder.json": 1042301, "vocab.bpe": 456318}
KNOWN_SIZES: dict[tuple[str, str], dict[str, int]] = {
    ("openai", "gpt2-small"): {**_OPENAI_COMMON, "hparams.json": 90, "model.ckpt.data-00000-of-00001": 497759232,
                               "model.ckpt.index": 5215, "model.ckpt.meta": 471155},
    ("openai", "gpt2-medium"): {**_OPENAI_COMMON, "hparams.json": 91, "model.ckpt.data-00000-of-00001": 1419292672,
                                "model.ckpt.index": 10399, "model.ckpt.meta": 926519},
    ("huggingface", "gpt2-small"): {"model.safetensors": 548105171},
}
KNOWN_SHA256: dict[tuple[str, str], dict[str, str]] = {
    ("huggingface", "gpt2-small"): {
        "model.safetensors": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"},
}

# Said when no server can be reached: the user may already have the files.
OFFLINE_HINT = ("; or point --model at a GPT-2 folder you already have (OpenAI's files or a Hugging Face "
                "folder)")


def canonical_gpt2(name: str) -> str | None:
    """'gpt2-small' for 'gpt2-small', '124M' or 'gpt2'; None if `name` is not a GPT-2 size."""
    key = ALIASES.get(name, name)
    return key if key in GPT2_SIZES else None


def require_gpt2(name: str) -> str:
    key = canonical_gpt2(name)
    if key is None:
        choices = ", ".join(f"{k} ({v})" for k, v in GPT2_SIZES.items())
        raise UsageError(f"unknown GPT-2 model {name!r}; choose one of: {choices}")
    return key


def cache_dir(name: str, source: str = "openai") -> Path:
    key = require_gpt2(name)
    if source == "openai":
        return gptlab_home() / "openai" / GPT2_SIZES[key]
    return gptlab_home() / "huggingface" / HF_REPOS[key].split("/")[-1]


def files_for(source: str) -> tuple[str, ...]:
    return OPENAI_FILES if source == "openai" else HF_FILES


def is_complete(folder: Path, source: str) -> bool:
    return all((folder / f).is_file() for f in files_for(source))


def approx_bytes(name: str) -> int:
    """About how much a GPT-2 download weighs: its float32 parameters (the tokenizer files are ~1.5 MB)."""
    from ..model import model_info

    return model_info(PRESETS[require_gpt2(name)])["weights_fp32_bytes"]


def base_urls(source: str) -> list[str]:
    """Servers to try in order; GPTLAB_OPENAI_URL / GPTLAB_HF_URL replace the defaults (tests, proxies)."""
    if source == "openai":
        primary = os.environ.get("GPTLAB_OPENAI_URL")
        mirror = os.environ.get("GPTLAB_OPENAI_MIRROR_URL")
        if primary:  # an explicit server: no silent fallback to the internet
            return [primary] + ([mirror] if mirror else [])
        return [OPENAI_URL, mirror or OPENAI_MIRROR_URL]
    return [os.environ.get("GPTLAB_HF_URL") or HF_URL]


def file_url(base: str, source: str, name: str, filename: str) -> str:
    key = require_gpt2(name)
    base = base.rstrip("/")
    if source == "openai":
        return f"{base}/{GPT2_SIZES[key]}/{filename}"
    return f"{base}/{HF_REPOS[key]}/resolve/main/{filename}"


def download_model(name: str, source: str = "openai", folder: str | os.PathLike | None = None,
                   progress: bool = True) -> Path:
    """Download GPT-2 `name` ('gpt2-small' or '124M' ...) from `source`; files already there are kept."""
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    key = require_gpt2(name)
    folder = Path(folder) if folder is not None else cache_dir(key, source)
    sizes = KNOWN_SIZES.get((source, key), {})
    hashes = KNOWN_SHA256.get((source, key), {})
    for filename in files_for(source):
        dest = folder / filename
        if dest.is_file() and (filename not in sizes or dest.stat().st_size == sizes[filename]):
            continue
        errors = []
        for base in base_urls(source):
            try:
                fetch_file(file_url(base, source, key, filename), dest, sizes.get(filename), hashes.get(filename),
                           progress=progress, offline_hint=OFFLINE_HINT)
                break
            except GptlabError as exc:
                errors.append(str(exc))
        else:
            extra = f" (and {len(errors) - 1} mirror(s) failed too)" if len(errors) > 1 else ""
            raise GptlabError(errors[0] + extra)
    return folder
