"""The one place that decides which device (and autocast dtype) gptlab runs on."""

from __future__ import annotations

import torch

from .errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but this torch build sees no CUDA GPU; use --device cpu")
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise UsageError("--device mps asked for, but MPS is not available here; use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}")


def resolve_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None
