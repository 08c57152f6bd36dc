"""gptlab.hardware memory helpers: keep_freed_memory (glibc keeps freed blocks) and huge-page weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import SRC

# A 30 MiB block, allocated with libc's own malloc: by default glibc maps it with mmap() (returned to
# the kernel on free, faulted in again next time); with the setting it comes from the heap.
PROBE = """
import ctypes, ctypes.util
from gptlab.hardware import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(30 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(applied, keep_freed_memory(), mapped >> 20)
"""


def probe(**env: str) -> tuple[str, str, int]:
    full_env = dict(os.environ, PYTHONPATH=SRC, **env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full_env, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("this libc has no mallinfo2 (not glibc >= 2.33)")
    assert out.returncode == 0, out.stderr
    applied, again, mapped_mib = out.stdout.split()
    return applied, again, int(mapped_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_serves_big_blocks_from_the_heap():
    assert probe(GPTLAB_KEEP_FREED_MEMORY="0") == ("False", "False", 30)  # glibc's default: mmap
    assert probe() == ("True", "True", 0)  # kept in the heap, reused without page faults


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _anon_huge_kb(address: int) -> int | None:
    """AnonHugePages of the mapping that holds `address` (from /proc/self/smaps), None if unreadable."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages on this machine")
def test_huge_page_buffer_is_backed_by_2mib_pages():
    import torch

    from gptlab.hardware import HUGE_PAGE, huge_page_buffer

    block = huge_page_buffer(8 << 20)
    assert block is not None and block.numel() == 8 << 20 and block.dtype == torch.uint8
    assert block.data_ptr() % HUGE_PAGE == 0
    block.fill_(1)  # first touch: the kernel picks the page size now
    assert int(block.sum()) == 8 << 20
    huge = _anon_huge_kb(block.data_ptr())
    if huge is None:
        pytest.skip("/proc/self/smaps is not readable")
    assert huge >= 2048, f"AnonHugePages {huge} kB"


def test_moving_weights_keeps_values_ties_strides_and_results(tmp_path):
    import torch

    from gptlab import GPTModel, generate
    from gptlab.generation.decoding import move_weights_to_huge_pages
    from gptlab.pretrained.native import load_model, save_model
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = GPTModel(tiny_config()).eval()
    w = model.trf_blocks[0].ff.fc.weight
    w.data = w.data.t().contiguous().t()  # a column-major weight, as prepare_for_decoding makes them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: v.stride() for k, v in model.state_dict().items()}
    want = generate(model, [5, 6, 7], 8)
    moved = move_weights_to_huge_pages(model)
    if moved == 0:
        pytest.skip("no huge-page memory on this platform")
    params = list(model.parameters())  # the tied head counts once
    assert moved >= sum(p.numel() * p.element_size() for p in params)
    assert model.out_head.weight is model.tok_emb.weight
    starts = [p.data_ptr() for p in params]
    assert max(starts) - min(starts) < moved  # one block
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.stride() == strides[k], k
    assert torch.equal(generate(model, [5, 6, 7], 8), want)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bfloat16_on_a_cpu_without_it_warns_and_auto_stays_float32(monkeypatch):
    import warnings

    import gptlab.hardware as hardware
    from gptlab.training.optim import make_precision

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not hardware.cpu_has_native_bfloat16()
    with pytest.warns(UserWarning, match="no native bfloat16.*--dtype float32"):
        make_precision("bfloat16", torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert make_precision("auto", torch.device("cpu")).dtype == torch.float32
    assert caught == []
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not hardware.warn_if_slow_bfloat16("cpu")
