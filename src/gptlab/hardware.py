"""The machine gptlab runs on: devices and dtypes, CPU memory (allocator, huge pages), torch.compile, peak FLOPS and MFU."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import sys
import warnings

import torch
from torch import nn

from .config import DEVICE_CHOICES, DTYPE_NAMES
from .errors import GptlabError, UsageError

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


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


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile(model); the result keeps the original as `_orig_mod` (see unwrap_model)."""
    try:
        return torch.compile(model, **kwargs)
    except RuntimeError as exc:  # e.g. an unsupported Python version
        raise GptlabError(f"torch.compile is not available here ({exc}); run without --compile") from None


# Published dense (no sparsity) tensor-core peak TFLOPS per GPU and dtype, from NVIDIA's datasheets.
# "float32" is the TF32 tensor-core figure: gptlab enables TF32 matmuls on CUDA.
# Matched against torch.cuda.get_device_name() in this order (A100 before A10, L40S before L4).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},  # SXM (names like "H100 80GB HBM3")
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "L40S": {"bfloat16": 362.05, "float16": 362.05, "float32": 183.0},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0},
    "A10": {"bfloat16": 125.0, "float16": 125.0, "float32": 62.5},
    "V100": {"float16": 125.0, "float32": 15.7},  # no bfloat16 tensor cores
    "T4": {"float16": 65.0, "float32": 8.1},
}
_NOT_COVERED = re.compile(r"H100 NVL", re.IGNORECASE)  # different clocks: not in the table, give --peak-tflops


def lookup_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Peak TFLOPS of a GPU named like torch.cuda.get_device_name() for dtype, or None if unknown."""
    if _NOT_COVERED.search(device_name):
        return None
    for key, table in PEAK_TFLOPS.items():
        if re.search(rf"\b{re.escape(key)}\b", device_name, re.IGNORECASE):
            return table.get(dtype)
    return None


def peak_tflops(device: torch.device | str, dtype: str, override: float | None = None) -> float | None:
    """Peak TFLOPS for MFU: `override` (--peak-tflops) if given, else looked up for a CUDA device, else None."""
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak_tflops(torch.cuda.get_device_name(device), dtype)


def mfu(tokens_per_second: float, flops_token: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the peak of all devices (None if unknown)."""
    if not peak:
        return None
    return tokens_per_second * flops_token / (peak * 1e12 * num_devices)


KEEP_MEMORY_ENV = "GPTLAB_KEEP_FREED_MEMORY"
# glibc mallopt() parameters (malloc.h) and the values set: blocks up to 32 MiB (glibc's maximum for
# this setting on 64-bit) come from the heap instead of fresh mmap()s, and the heap is not trimmed.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 1 << 30))
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; True if it applies (Linux with glibc).

    A CPU training or evaluation step frees and allocates the same large activation tensors again
    and again. By default glibc returns big blocks to the kernel at once, so every step page-faults
    all of them in anew (`python bench/ab.py` measures the kernel time it costs). With these settings
    the pages are reused: no page faults, and a few percent more tokens/s in training and evaluation
    (bench/README.md). The price is that the process keeps
    its peak memory until it exits. `gptlab train` and `gptlab eval` call this on CPU; set
    GPTLAB_KEEP_FREED_MEMORY=0 to opt out. Calling it again does nothing.
    """
    global _kept
    if _kept:
        return True
    if os.environ.get(KEEP_MEMORY_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _kept = all(mallopt(param, value) == 1 for param, value in _MALLOPT_SETTINGS)
    return _kept


HUGE_PAGE = 2 << 20  # x86-64 and arm64 transparent huge pages (PMD size)


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """An uninitialised uint8 CPU tensor of `nbytes` that Linux backs with 2 MiB pages, or None where it cannot.

    Anonymous private memory advised MADV_HUGEPAGE before its first touch; the start is aligned to
    2 MiB so every full 2 MiB of the tensor can be one page. The tensor keeps the mapping alive.
    """
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE") or nbytes <= 0:
        return None
    try:
        # MAP_PRIVATE: Python's default MAP_SHARED anonymous memory is shmem, where THP rarely applies
        area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 math natively (AVX512-BF16 or AMX on x86), by oneDNN's own check.

    Without it, PyTorch emulates bfloat16 on CPU: a 2048 x 2048 bfloat16 matmul ran at ~1 GFLOP/s on an
    AVX2-only CPU, about 100 times slower than float32.
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def warn_if_slow_bfloat16(device: torch.device | str) -> bool:
    """Warn (one line) when bfloat16 is asked for on a CPU that only emulates it; True if it warned."""
    if torch.device(device).type != "cpu" or cpu_has_native_bfloat16():
        return False
    warnings.warn("this CPU has no native bfloat16 (no AVX512-BF16 or AMX): bfloat16 runs emulated, far slower "
                  "than float32; use --dtype float32", stacklevel=2)
    return True
