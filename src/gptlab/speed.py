"""Speed helpers: torch.compile, unwrapping models, model FLOPs utilisation (MFU), CPU memory (allocator, huge pages)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import sys

import torch
from torch import nn

from .config import GPTConfig
from .errors import GptlabError

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


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile(model); the result keeps the original as `_orig_mod` (see unwrap_model)."""
    try:
        return torch.compile(model, **kwargs)
    except RuntimeError as exc:  # e.g. an unsupported Python version
        raise GptlabError(f"torch.compile is not available here ({exc}); run without --compile") from None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile (`_orig_mod`) and DistributedDataParallel (`module`) wrappers.

    FSDP2's fully_shard changes the module in place (no wrapper), so it is returned as is; its
    parameters are sharded, so save it with distributed.model_state_dict, not state_dict().
    """
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * L * C * T.

    N counts the weights of every matmul: 12 * C^2 per layer (qkv 3C^2, out 1C^2, MLP 8C^2) plus the
    LM head (padded V * C); embedding look-ups cost no FLOPs, biases and norms are negligible. Each
    weight costs 2 FLOPs per token forward and 4 backward, hence 6N. Attention scores and their
    weighted sum add 2 * 2 * T * C per layer forward (x3 with backward): 12 * L * C * T, counted
    without the causal half-saving, as in the PaLM paper's MFU (appendix B) and nanoGPT.
    """
    T = config.context_length if seq_len is None else seq_len
    C, L = config.emb_dim, config.n_layers
    n_matmul = 12 * L * C * C + config.padded_vocab_size * C
    return 6.0 * n_matmul + 12.0 * L * C * T


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
    all of them in anew: on the development VM that was 0.27-0.34 s of kernel time per gpt2-small
    training step (bench/ab.py). With these settings the pages are reused: no page faults, 4-6%
    more tokens/s in training and evaluation (README, bench/). The price is that the process keeps
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


def move_weights_to_huge_pages(model: nn.Module) -> int:
    """Move the model's CPU parameters into one block of 2 MiB pages; returns the bytes moved (0: nothing done).

    Batch-1 decoding reads every weight once per token. With Linux's default 4 KiB pages that
    is ~120k pages (gpt2-small, float32) per token, and TLB misses cap the read speed: on the
    development VM a matrix-vector product read 23-26 GB/s from 4 KiB pages and 31-38 GB/s from
    2 MiB pages, the same code and bytes (bench/README.md). Values, shapes, strides and tied
    weights stay as they were; only where the bytes live changes. Parameters that are not dense
    (views with gaps) stay where they are.
    """
    params = []
    for p in model.parameters():  # a tied weight comes once
        dense = p.is_contiguous() or (p.dim() == 2 and p.t().is_contiguous())
        if p.device.type == "cpu" and not p.is_meta and dense and p.numel():
            params.append(p)
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in params]  # 64-byte aligned slots
    block = huge_page_buffer(sum(sizes))
    if block is None:
        return 0
    offset = 0
    with torch.no_grad():
        for p, size in zip(params, sizes, strict=True):
            nbytes = p.numel() * p.element_size()
            slot = block[offset : offset + nbytes].view(p.dtype).as_strided(p.shape, p.stride())
            slot.copy_(p.data)
            p.data = slot
            offset += size
    return offset
