"""Download GPT-2's weights: OpenAI's original files or the Hugging Face copies, resumably.

Each file is streamed into `NAME.part` with a progress bar; an interrupted download resumes from
the bytes already there (HTTP Range), and only a complete file whose size (and sha256 where known)
checks out is renamed to its final name. OpenAI's files fall back to the book's public mirror.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..config import ALIASES, PRESETS
from ..errors import GptlabError, UsageError
from ..fileio import fsync_dir

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

CHUNK = 1 << 20
ATTEMPTS = 3  # tries per file and server: a dropped connection resumes where it stopped
TIMEOUT_S = 60.0


def gptlab_home() -> Path:
    """The cache folder: $GPTLAB_HOME, default ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_HOME") or Path.home() / ".cache" / "gptlab").expanduser()


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
    from ..commands.info import model_info

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


class _Interrupted(Exception):
    """The connection ended before the whole file arrived (resumable)."""


def _host(url: str) -> str:
    return urllib.request.urlparse(url).netloc or url


def _open(url: str, start: int):
    headers = {"User-Agent": "gptlab"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return None  # our partial file is not a prefix the server knows: start over
        raise GptlabError(f"{url}: server answered HTTP {exc.code} {exc.reason}; try again later") from None
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        raise GptlabError(
            f"cannot reach {_host(url)} ({reason}); check your internet connection or proxy and try again"
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise GptlabError(f"cannot reach {_host(url)} ({exc}); check your connection and try again") from None


def _fetch_once(url: str, part: Path, expected: int | None, label: str, progress: bool) -> None:
    """Append the rest of `url` to `part` (or restart it when the server ignores Range)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if expected is not None and have > expected:
        part.unlink()
        have = 0
    resp = _open(url, have)
    if resp is None:
        part.unlink()
        have = 0
        resp = _open(url, 0)
    with resp:
        if have and resp.status != 206:
            have = 0  # the server sent the whole file
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if expected is not None and total is not None and total != expected:
            raise GptlabError(
                f"{url} is {total} bytes but {label} should be {expected}; the server sent another file "
                "(a broken mirror or proxy?)"
            )
        with open(part, "ab" if have else "wb") as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            disable=None if progress else True, file=sys.stderr, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(str(exc) or exc.__class__.__name__) from None
                if not chunk:
                    break
                fh.write(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"connection closed after {got} of {total} bytes")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(url: str, dest: Path, expected_size: int | None = None, sha256: str | None = None,
               progress: bool = True, attempts: int = ATTEMPTS) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming after dropped connections."""
    # Not fileio.atomic_path: it deletes its temporary file on failure, and the partial file is
    # exactly what a resumed download needs. The guarantee is the same: fsync, then rename.
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(url, part, expected_size, dest.name, progress)
            break
        except _Interrupted as exc:
            if attempt == attempts:
                have = part.stat().st_size if part.exists() else 0
                raise GptlabError(
                    f"download of {url} stopped after {have} bytes ({exc}); run the same command again to resume"
                ) from None
            time.sleep(0.5 * attempt)
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise GptlabError(f"{dest.name}: got {size} bytes, expected {expected_size}; deleted it, try again")
    if sha256 is not None and (digest := _sha256(part)) != sha256:
        part.unlink()
        raise GptlabError(f"{dest.name}: sha256 {digest[:12]}... is not the known {sha256[:12]}...; deleted it, "
                          "try again (or another mirror)")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


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
                           progress)
                break
            except GptlabError as exc:
                errors.append(str(exc))
        else:
            extra = f" (and {len(errors) - 1} mirror(s) failed too)" if len(errors) > 1 else ""
            raise GptlabError(errors[0] + extra)
    return folder
