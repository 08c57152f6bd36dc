"""gptlab.speed.keep_freed_memory: glibc serves big blocks from its heap and keeps them when freed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import SRC

# A 30 MiB block, allocated with libc's own malloc: by default glibc maps it with mmap() (returned to
# the kernel on free, faulted in again next time); with the setting it comes from the heap.
PROBE = """
import ctypes, ctypes.util
from gptlab.speed import keep_freed_memory

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
