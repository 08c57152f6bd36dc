"""Refuse untrusted content before it can do harm: pickles that run code, lying safetensors headers."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import GptlabError, UsageError

# Bytes per element of every dtype the safetensors format defines.
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit for the JSON header
# torch.load(weights_only=True) could be bypassed to run code before 2.6 (CVE-2025-32434).
MIN_TORCH = (2, 6)


def require_safe_torch(version: str | None = None) -> None:
    """Refuse to unpickle anything with a torch whose weights_only loader has known bypasses."""
    version = version or torch.__version__
    try:
        found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return  # a development build with an unusual version string: assume it is recent
    if found < MIN_TORCH:
        raise GptlabError(
            f"torch {version} can run code hidden in .pt/.pth/.bin files even with weights_only=True "
            f"(CVE-2025-32434); upgrade: pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'"
        )


def inspect_safetensors(
    path: str | os.PathLike,
    expected: dict[str, tuple[int, ...]] | None = None,
    optional: frozenset[str] | set[str] = frozenset(),
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file's header without allocating any tensor; return name -> (dtype, shape).

    Checks the header length, that every tensor's byte range matches its dtype and shape and lies
    inside the file, and (with `expected`) that names and shapes are exactly those a model needs, so
    a header claiming a huge tensor is refused before anything is read or allocated. Names in
    `optional` may be absent (a tied head), but must have the expected shape when present.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise GptlabError(f"{path} is not a readable safetensors file (only {size} bytes); re-create it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise GptlabError(f"{path} has a corrupt safetensors header (claims {header_len} bytes); re-create it")
            raw = fh.read(header_len)
    except FileNotFoundError:
        raise UsageError(f"weights file not found: {path}") from None
    except OSError as exc:
        raise GptlabError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptlabError(f"{path} has a corrupt safetensors header (not JSON); the file may be truncated") from None
    if not isinstance(header, dict):
        raise GptlabError(f"{path} has a corrupt safetensors header; re-create it")
    data_len = size - 8 - header_len
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _check_entry(path, name, entry, data_len)
    if expected is not None:
        _compare(path, tensors, expected, optional)
    return tensors


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[str, tuple[int, ...]]:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (KeyError, TypeError, ValueError):
        raise GptlabError(f"{path}: tensor {name} has a malformed header entry; re-create the file") from None
    if dtype not in SAFETENSORS_DTYPE_SIZES or any(d < 0 for d in shape):
        raise GptlabError(f"{path}: tensor {name} has an invalid dtype or shape ({dtype}, {shape})")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
    if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
        raise GptlabError(
            f"{path}: tensor {name} claims {nbytes} bytes at {begin}..{end} but the file holds {data_len}; "
            "the file is truncated or corrupt"
        )
    return dtype, shape


def check_tensor_set(source: str, found: Iterable[str], expected: Iterable[str],
                     optional: Iterable[str] = (), hint: str = "check the model config") -> None:
    """Refuse a set of tensor names that is not exactly `expected` (names in `optional` may be absent)."""
    found, expected = set(found), set(expected)
    missing = sorted(expected - found - set(optional))
    unexpected = sorted(found - expected)
    if not missing and not unexpected:
        return
    parts = []
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            parts.append(f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    raise GptlabError(f"{source} does not hold this model's tensors ({'; '.join(parts)}); {hint}")


def _compare(path: Path, found: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]],
             optional: frozenset[str] | set[str] = frozenset()) -> None:
    check_tensor_set(str(path), found, expected, optional)
    for name, shape in expected.items():
        if name in found and tuple(found[name][1]) != tuple(shape):
            raise GptlabError(
                f"{path}: tensor {name} has shape {found[name][1]} but the config expects {tuple(shape)}; "
                "the weights were made for a different model size"
            )


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """torch.load that never runs code from the file: only tensors and plain containers are accepted."""
    require_safe_torch()
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise GptlabError(
            f"refusing to load {path}: it holds Python objects that could run code ({first[:120]}); "
            "only load files you trust, converted to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise GptlabError(f"{path} is not a readable PyTorch file ({str(exc)[:120]}); it may be truncated") from None
