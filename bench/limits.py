"""The machine's limits, measured in the same run as the jobs: matmul throughput and read bandwidth."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptlab.hardware import huge_page_buffer  # noqa: E402


def best_rate(fn, work: float, repeats: int) -> float:
    """Best (highest) work/second over `repeats` calls after one warm-up: the peak, not the typical."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return work / best


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return best_rate(lambda: torch.matmul(a, b, out=out), 2 * n**3, repeats) / 1e9


def read_probe(n_bytes: int, huge_pages: bool = True) -> torch.Tensor:
    """A float32 tensor of ones, about `n_bytes` large, to measure reading speed by summing it.

    huge_pages: in 2 MiB pages where Linux allows it. They read faster than 4 KiB pages here (up to
    ~1.4x), and gptlab's decoding keeps its weights there, so that is the machine's real limit.
    """
    block = huge_page_buffer(n_bytes // 4 * 4) if huge_pages else None
    x = block.view(torch.float32) if block is not None else torch.empty(n_bytes // 4)
    return x.fill_(1.0)


def read_bandwidth_gbs(mbytes: int, repeats: int) -> float:
    """GB/s of a full reduction over a float32 tensor much larger than the caches (pure streaming read)."""
    x = read_probe(mbytes * 2**20)
    return best_rate(lambda: x.sum(), x.numel() * 4, repeats) / 1e9


def gemv_bandwidth_gbs(mbytes: int, repeats: int) -> float:
    """GB/s of matrix-vector products over a weight matrix (what batch-1 decoding does)."""
    cols = 3072
    w = torch.randn(mbytes * 2**20 // 4 // cols, cols)
    v = torch.randn(cols)
    return best_rate(lambda: torch.mv(w, v), w.numel() * 4, repeats) / 1e9


def measure_limits(small: bool = False) -> dict:
    n, mb, reps = (256, 64, 2) if small else (2048, 1024, 5)
    return {
        "matmul_gflops_float32": matmul_gflops(torch.float32, n, reps),
        "matmul_gflops_bfloat16": matmul_gflops(torch.bfloat16, n, reps),
        "read_gbs": read_bandwidth_gbs(mb, reps),
        "gemv_gbs": gemv_bandwidth_gbs(mb // 2, reps),
        "matmul_n": n,
        "read_mbytes": mb,
    }
