"""Read TensorFlow checkpoints (the tensor-bundle format OpenAI published GPT-2 in) without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` plus `PREFIX.data-00000-of-0000N` shards:
- the index is an SSTable (LevelDB's table format): data blocks of prefix-compressed key/value
  entries with restart points, an index block pointing at them, and a 48-byte footer ending in a
  magic number. Every block carries a masked CRC-32C. Key "" holds a BundleHeaderProto; every other
  key is a tensor name whose value is a BundleEntryProto (dtype, shape, shard_id, offset, size, crc32c);
- each data shard holds the raw little-endian tensor bytes at those offsets.

Tensors are read from a memory map, one at a time, and checked against their CRC-32C, so even
GPT-2 XL (6.2 GB) loads without a second full copy in memory.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GptlabError, UsageError
from .crc32c import crc32c, unmask

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5  # 1 byte compression type + 4 bytes masked crc32c

# TensorFlow's DataType enum values (types.proto) -> numpy little-endian dtypes.
_DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
}
_DT_BFLOAT16 = 14


class CheckpointError(GptlabError):
    """A damaged or unsupported TensorFlow checkpoint."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: the fields of a BundleEntryProto."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored
    sliced: bool = False


# --- protobuf wire format, by hand -------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError("truncated varint in checkpoint index; the .index file is damaged")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError("malformed varint in checkpoint index; the .index file is damaged")


def _fields(msg: bytes):
    """Yield (field number, wire type, value) for each field of a protobuf message."""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
        elif wire == 1:
            value, pos = msg[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(msg, pos)
            value, pos = msg[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = msg[pos : pos + 4], pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire} in checkpoint index")
        if pos > len(msg):
            raise CheckpointError("truncated protobuf message in checkpoint index")
        yield field, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_shape(msg: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1); bool unknown_rank = 3."""
    dims = []
    for field, _, value in _fields(msg):
        if field == 2:
            size = 0
            for f, _, v in _fields(value):
                if f == 1:
                    size = _signed64(v)
            dims.append(size)
        elif field == 3 and value:
            raise CheckpointError("tensor of unknown rank in checkpoint")
    return tuple(dims)


def parse_entry(name: str, msg: bytes) -> TensorEntry:
    """BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 (fixed32), slices=7."""
    dtype, shape, shard_id, offset, size, crc, sliced = 0, (), 0, 0, 0, None, False
    for field, _, value in _fields(msg):
        if field == 1:
            dtype = value
        elif field == 2:
            shape = _parse_shape(value)
        elif field == 3:
            shard_id = value
        elif field == 4:
            offset = _signed64(value)
        elif field == 5:
            size = _signed64(value)
        elif field == 6:
            crc = struct.unpack("<I", value)[0]
        elif field == 7:
            sliced = True
    return TensorEntry(name, dtype, shape, shard_id, offset, size, crc, sliced)


def _parse_header(msg: bytes) -> tuple[int, int]:
    """BundleHeaderProto: num_shards=1, endianness=2 (0 little, 1 big)."""
    num_shards, endianness = 1, 0
    for field, _, value in _fields(msg):
        if field == 1:
            num_shards = value
        elif field == 2:
            endianness = value
    return num_shards, endianness


# --- SSTable ------------------------------------------------------------------------------------


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    """A block's contents, after checking its trailer (compression type and masked CRC-32C)."""
    end = offset + size
    if end + _BLOCK_TRAILER_LEN > len(data):
        raise CheckpointError(f"{what} block runs past the end of the file; the .index file is truncated")
    contents = data[offset:end]
    ctype = data[end]
    (stored,) = struct.unpack("<I", data[end + 1 : end + 5])
    if unmask(stored) != crc32c(data[offset : end + 1]):
        raise CheckpointError(f"checksum mismatch in a {what} block of the .index file; the file is damaged")
    if ctype != 0:
        raise CheckpointError(f"compressed index block (type {ctype}) is not supported")
    return contents


def _block_entries(block: bytes):
    """Yield (key, value) of a table block, undoing the prefix compression."""
    if len(block) < 4:
        raise CheckpointError("index block too short; the .index file is damaged")
    (n_restarts,) = struct.unpack("<I", block[-4:])
    limit = len(block) - 4 - 4 * n_restarts
    if limit < 0:
        raise CheckpointError("bad restart count in an index block; the .index file is damaged")
    restarts = set(struct.unpack(f"<{n_restarts}I", block[limit:-4]))
    pos, key = 0, b""
    while pos < limit:
        start = pos
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if start in restarts and shared:
            raise CheckpointError("restart point with a shared key prefix; the .index file is damaged")
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise CheckpointError("corrupt entry in an index block; the .index file is damaged")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _block_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def read_index(path: str | os.PathLike) -> tuple[int, dict[str, TensorEntry]]:
    """(number of shards, entries by tensor name) from a checkpoint's .index file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"checkpoint index not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) < _FOOTER_LEN or struct.unpack("<Q", data[-8:])[0] != _TABLE_MAGIC:
        raise CheckpointError(f"{path} is not a TensorFlow checkpoint index (bad magic number); it may be truncated")
    footer = data[-_FOOTER_LEN:]
    _, _, pos = _block_handle(footer)  # metaindex block: unused by tensor bundles
    index_offset, index_size, _ = _block_handle(footer, pos)
    num_shards, entries = 1, {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, "table index")):
        offset, size, _ = _block_handle(handle)
        for key, value in _block_entries(_read_block(data, offset, size, "data")):
            if key == b"":
                num_shards, endianness = _parse_header(value)
                if endianness != 0:
                    raise CheckpointError(f"{path} holds big-endian tensors, which are not supported")
            else:
                name = key.decode("utf-8")
                entries[name] = parse_entry(name, value)
    return num_shards, entries


class TFCheckpoint:
    """A TensorFlow checkpoint opened for lazy reading: `names`, `shape(name)`, `read(name)`."""

    def __init__(self, prefix: str | os.PathLike, verify: bool = True) -> None:
        self.prefix = Path(prefix)
        self.verify = verify
        self.num_shards, self.entries = read_index(f"{self.prefix}.index")
        self._maps: dict[int, np.memmap] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def is_bfloat16(self, name: str) -> bool:
        """True when `read(name)` returns bfloat16 bit patterns as uint16 (numpy has no bfloat16)."""
        return self._entry(name).dtype == _DT_BFLOAT16

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.prefix}: no tensor named {name!r} in the checkpoint") from None

    def _shard(self, shard_id: int) -> np.memmap:
        if shard_id not in self._maps:
            path = Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")
            if not path.is_file():
                raise UsageError(f"checkpoint data file missing: {path}")
            if path.stat().st_size == 0:
                self._maps[shard_id] = np.zeros(0, dtype=np.uint8)  # mmap refuses empty files
            else:
                self._maps[shard_id] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[shard_id]

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only numpy array backed by the memory map (no copy)."""
        entry = self._entry(name)
        if entry.sliced:
            raise CheckpointError(f"tensor {name} is stored in slices (a partitioned variable); not supported")
        if entry.dtype == _DT_BFLOAT16:
            dtype = np.dtype("<u2")  # raw bits: see is_bfloat16
        elif entry.dtype in _DTYPES:
            dtype = _DTYPES[entry.dtype]
        else:
            raise CheckpointError(f"tensor {name} has TensorFlow dtype {entry.dtype}, which is not supported")
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * dtype.itemsize != entry.size:
            raise CheckpointError(
                f"tensor {name}: shape {entry.shape} needs {count * dtype.itemsize} bytes but the index says "
                f"{entry.size}; the .index file is damaged"
            )
        shard = self._shard(entry.shard_id)
        if entry.offset < 0 or entry.offset + entry.size > shard.size:
            raise CheckpointError(
                f"tensor {name} lies past the end of the data file ({shard.size} bytes); the .data file is "
                "truncated: download it again"
            )
        raw = shard[entry.offset : entry.offset + entry.size]
        if self.verify and entry.crc32c is not None and crc32c(raw) != unmask(entry.crc32c):
            raise CheckpointError(
                f"tensor {name} fails its CRC-32C check; the .data file is damaged: download it again"
            )
        return raw.view(dtype).reshape(entry.shape)


def find_prefix(folder: str | os.PathLike) -> Path:
    """The checkpoint prefix inside `folder`: from its `checkpoint` file if present, else the one .index."""
    folder = Path(folder)
    state = folder / "checkpoint"
    if state.is_file():
        for line in state.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model_checkpoint_path":
                name = Path(value.strip().strip('"'))
                prefix = name if name.is_absolute() else folder / name
                if Path(f"{prefix}.index").is_file():
                    return prefix
                prefix = folder / name.name  # the folder was moved since TF wrote the absolute path
                if Path(f"{prefix}.index").is_file():
                    return prefix
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) != 1:
        raise UsageError(f"{folder}: expected one TensorFlow checkpoint (*.index), found {len(indexes)}")
    return indexes[0].with_suffix("")
