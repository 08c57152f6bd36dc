"""CRC-32C (Castagnoli), the checksum TensorFlow stores for every tensor of a checkpoint.

Pure numpy and fast enough for gigabytes: the data is cut into many equal lanes whose CRCs are
computed side by side (per 4 bytes, one vectorised step of two 16-bit table lookups across all
lanes), then the lane CRCs are merged with CRC's linearity: crc(A || B) = shift_len(B)(crc(A))
xor crc(B), where the shift is a 32x32 matrix over GF(2). If the optional `google_crc32c` or `crc32c` package is installed, its
native code is used instead.
"""

from __future__ import annotations

import functools

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8  # LevelDB/TensorFlow store CRCs "masked" so a CRC of CRCs stays well mixed


def _make_tables() -> np.ndarray:
    """Four 256-entry tables for slicing-by-4: T[k][b] is the CRC of byte b followed by k zero bytes."""
    t = np.zeros((4, 256), dtype=np.uint32)
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        t[0, b] = c
    for k in range(1, 4):
        prev = t[k - 1]
        t[k] = (prev >> 8) ^ t[0][prev & 0xFF]
    return t


_T = _make_tables()
_T0_LIST = [int(x) for x in _T[0]]


def _bytes_raw(state: int, data: bytes | memoryview) -> int:
    """Byte-at-a-time update of the raw CRC register (used for short pieces only)."""
    t = _T0_LIST
    for b in bytes(data):
        state = t[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


# --- GF(2) 32x32 matrices, stored as the images of the 32 unit vectors (column i = image of bit i).


def _apply(mat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Multiply the GF(2) matrix `mat` by every uint32 in `x`."""
    out = np.zeros_like(x)
    for i in range(32):
        out ^= np.where((x >> np.uint32(i)) & np.uint32(1), mat[i], np.uint32(0))
    return out


@functools.cache
def _pow2_matrix(log2_bytes: int) -> np.ndarray:
    """The linear map that feeds 2**log2_bytes zero bytes through the CRC register."""
    if log2_bytes == 0:
        units = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
        return (_T[0][units & 0xFF] ^ (units >> np.uint32(8))).astype(np.uint32)
    half = _pow2_matrix(log2_bytes - 1)
    return _apply(half, half)


def _make_wide_tables() -> tuple[np.ndarray, np.ndarray]:
    """Slicing-by-4 folded into two 65536-entry tables: one lookup per 16 bits of the register."""
    x = np.arange(1 << 16, dtype=np.uint32)
    lo = _T[3][x & 0xFF] ^ _T[2][x >> np.uint32(8)]
    hi = _T[1][x & 0xFF] ^ _T[0][x >> np.uint32(8)]
    return lo.astype(np.uint32), hi.astype(np.uint32)


_LO, _HI = _make_wide_tables()


def _lanes(state: int, words: np.ndarray) -> np.ndarray:
    """Raw CRC register of each row of a (lanes, steps) little-endian uint32 array; row 0 starts at `state`."""
    crc = np.zeros(words.shape[0], dtype=np.uint32)
    crc[0] = state
    lo, hi, tmp = np.empty_like(crc), np.empty_like(crc), np.empty_like(crc)
    mask16, s16 = np.uint32(0xFFFF), np.uint32(16)
    for step in np.ascontiguousarray(words.T):  # one contiguous row per step: fast vector loads
        crc ^= step
        np.bitwise_and(crc, mask16, out=lo)
        np.right_shift(crc, s16, out=hi)
        np.take(_LO, lo, out=crc)  # preallocated outputs: no allocation per step
        np.take(_HI, hi, out=tmp)
        crc ^= tmp
    return crc


def _raw(state: int, buf: np.ndarray) -> int:
    """The CRC register after feeding the uint8 array `buf` into a register holding `state`."""
    while buf.size >= 4096:
        log2_p = buf.size.bit_length() - 1  # the largest power of two that fits
        log2_lane = max(6, (log2_p + 1) // 2)  # ~sqrt(P) bytes per lane: balances steps and lanes
        lane = 1 << log2_lane
        n_lanes = 1 << (log2_p - log2_lane)
        body = np.ascontiguousarray(buf[: lane * n_lanes])
        crcs = _lanes(state, body.view("<u4").reshape(n_lanes, lane // 4))
        level = log2_lane
        while crcs.size > 1:  # merge neighbours pairwise: log2(lanes) vectorised levels
            crcs = _apply(_pow2_matrix(level), crcs[0::2]) ^ crcs[1::2]
            level += 1
        state = int(crcs[0])
        buf = buf[lane * n_lanes :]
    return _bytes_raw(state, buf.tobytes())


def _native():
    try:
        import google_crc32c

        return lambda buf: google_crc32c.value(buf.tobytes())
    except ImportError:
        pass
    try:
        import crc32c as _crc32c_pkg

        return lambda buf: _crc32c_pkg.crc32c(buf.tobytes())
    except ImportError:
        return None


_NATIVE = _native()


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, use_native: bool = True) -> int:
    """CRC-32C of `data` (init 0xFFFFFFFF, final xor 0xFFFFFFFF, as in iSCSI, LevelDB and TensorFlow)."""
    if isinstance(data, np.ndarray):
        buf = data.reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    if use_native and _NATIVE is not None:
        return _NATIVE(buf)
    return _raw(0xFFFFFFFF, buf) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB's masked CRC: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
