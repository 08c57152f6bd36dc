"""Training windows read from memory-mapped token files written by `gptlab prepare`.

Windows. Window i starts at token i * stride and is `context_length + 1` tokens long: the input x is
its first `context_length` tokens, the target y the same shifted by one. A file of N tokens gives
(N - context_length - 1) // stride + 1 windows; stride defaults to context_length (windows touch but
do not overlap, and only the < stride final tokens are never a window's start).

Order. All ranks share one global stream of window positions 0, 1, 2, ...: position p belongs to
epoch p // num_windows and is window perm(seed, epoch)[p % num_windows] (a permutation drawn from
numpy's generator seeded with (seed, epoch); the identity when shuffle is off). The stream is cut
into global micro-batches of world_size * batch_size positions; rank r takes the r-th block of
batch_size of each. Resuming is exact from `start` = windows already consumed by all ranks
together (e.g. step * batch_size * world_size * accumulation), and because the stream does not
depend on world_size, the order only depends on the global batch (`gptlab train` therefore resumes on
the same number of ranks, with the same per-rank batch).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import GptlabError, UsageError
from ..tokenizer import Tokenizer, as_tokenizer

# --- the format, in one place ------------------------------------------------------------------
# A prepared folder: train.bin and val.bin hold token ids, little-endian, no header, in the unsigned
# integer type named by meta.json's "dtype" (uint16 while the vocabulary fits, else uint32);
# meta.json also records the tokenizer (name and sha256), the counts and the sources.
FORMAT_VERSION = 1
META_NAME = "meta.json"
TRAIN_NAME = "train.bin"
VAL_NAME = "val.bin"
SPLIT_FILES = {"train": TRAIN_NAME, "val": VAL_NAME}
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype_for(vocab_size: int) -> str:
    """The smallest token type that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def numpy_dtype(name: str) -> np.dtype:
    try:
        return TOKEN_DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown token type {name!r}; prepared folders hold {' or '.join(TOKEN_DTYPES)}") from None


def token_bytes(tokens: np.ndarray, dtype: str) -> bytes:
    """Token ids as the bytes a token file stores."""
    return tokens.astype(numpy_dtype(dtype), copy=False).tobytes()


def map_tokens(path: str | os.PathLike, dtype: str = "uint16") -> np.memmap:
    """A read-only memory map of a token file."""
    path = Path(path)
    try:
        return np.memmap(path, dtype=numpy_dtype(dtype), mode="r")
    except FileNotFoundError:
        raise UsageError(f"token file not found: {path}; run gptlab prepare first") from None
    except (OSError, ValueError) as exc:
        raise GptlabError(f"cannot map {path} ({exc}); is it an empty or unreadable file?") from None


def read_split(folder: str | os.PathLike, split: str = "val", tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """All token ids (int64) of one split of a prepared folder, checked against its meta.json and against
    the tokenizer that will read them (GPT-2's by default)."""
    meta = read_meta(folder, tokenizer)
    tokens = map_tokens(Path(folder) / SPLIT_FILES[split], meta["dtype"])
    return torch.from_numpy(tokens.astype(np.int64))


class TokenFileDataset(Dataset):
    """(x, y) windows of a token file (uint16 or uint32), memory-mapped (the file is never read whole)."""

    def __init__(self, path: str | os.PathLike, context_length: int, stride: int | None = None,
                 dtype: str = "uint16") -> None:
        self.path = Path(path)
        self.context_length = int(context_length)
        self.stride = int(stride or context_length)
        if self.context_length < 1 or self.stride < 1:
            raise UsageError("context_length and stride must be at least 1")
        self.tokens = map_tokens(self.path, dtype)
        need = self.context_length + 1
        if len(self.tokens) < need:
            raise UsageError(
                f"{self.path} holds {len(self.tokens)} tokens, fewer than one window of {need} "
                "(context_length + 1); use a shorter context or more text"
            )
        self._offsets = np.arange(need)

    def __len__(self) -> int:
        return (len(self.tokens) - self.context_length - 1) // self.stride + 1

    def window(self, indices) -> np.ndarray:
        """The (len(indices), context_length + 1) int64 token windows at these window indices."""
        starts = np.asarray(indices, dtype=np.int64) * self.stride
        return self.tokens[starts[:, None] + self._offsets].astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        chunk = torch.from_numpy(self.window([index % len(self)])[0])
        return chunk[:-1], chunk[1:]


@functools.lru_cache(maxsize=2)  # the current epoch and the next (a batch may straddle them)
def _permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


class WindowBatchSampler(Sampler[list[int]]):
    """This rank's batches of window indices from the global stream described in the module docstring.

    `start`: windows of the global stream consumed already (all ranks together).
    `epochs`: None for an endless stream (training: every rank gets the same number of batches);
    a number to stop after that many passes (evaluation: the last batches may be short, and ranks
    may get one batch fewer than others, so use it only where no per-batch collective runs).
    """

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        epochs: int | None = None,
    ) -> None:
        if num_windows < 1 or batch_size < 1 or world_size < 1 or start < 0:
            raise UsageError("num_windows, batch_size and world_size must be positive and start >= 0")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_windows, self.batch_size = num_windows, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.start, self.epochs = start, epochs

    def window_at(self, positions: np.ndarray) -> np.ndarray:
        """Window indices at global stream positions."""
        epochs, offsets = np.divmod(positions, self.num_windows)
        if not self.shuffle:
            return offsets
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = _permutation(self.num_windows, self.seed, int(epoch))[offsets[sel]]
        return out

    def _end(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.num_windows

    def __iter__(self) -> Iterator[list[int]]:
        B, end = self.batch_size, self._end()
        base = self.start + self.rank * B
        while end is None or base < end:
            positions = np.arange(base, base + B if end is None else min(base + B, end), dtype=np.int64)
            yield self.window_at(positions).tolist()
            base += self.world_size * B

    def __len__(self) -> int:
        end = self._end()
        if end is None:
            raise TypeError("an endless WindowBatchSampler has no length; pass epochs=")
        first = self.start + self.rank * self.batch_size
        return max(0, -(-(end - first) // (self.world_size * self.batch_size)))


def iter_batches(
    dataset: TokenFileDataset,
    sampler: WindowBatchSampler,
    device: torch.device | str | None = None,
    pin_memory: bool = False,
    prefetch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) int64 batches of shape (B, context_length) in the sampler's order, without a DataLoader.

    Each batch is one vectorised read from the memory map; `pin_memory` + a CUDA device gives an
    asynchronous (non-blocking) copy. `prefetch` > 0 reads (and pins) that many batches ahead in a
    background thread, so the reads overlap the model's work on the device.
    """
    chunks = (_read_chunk(dataset, indices, pin_memory) for indices in sampler)
    if prefetch > 0:
        chunks = _ahead(chunks, prefetch)
    for chunk in chunks:
        if device is not None:
            chunk = chunk.to(device, non_blocking=pin_memory)
        yield chunk[:, :-1], chunk[:, 1:]


def _read_chunk(dataset: TokenFileDataset, indices: list[int], pin_memory: bool) -> torch.Tensor:
    chunk = torch.from_numpy(dataset.window(indices))
    return chunk.pin_memory() if pin_memory and torch.cuda.is_available() else chunk


def _ahead(items: Iterator, depth: int) -> Iterator:
    """`items` produced up to `depth` ahead by a background thread; stops that thread when abandoned."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # hand the reader's error to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="gptlab-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def eval_batches(
    dataset: TokenFileDataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(x, y, n_real) batches covering windows 0..N-1 in order once across all ranks (for evaluation).

    N = len(dataset), or `max_windows` if smaller. Every rank yields the SAME number of full-size
    batches (FSDP's forward is a collective, so no rank may stop early); rows past N repeat window 0
    and only the first `n_real` rows of a batch count. Sum the loss of those rows and their token
    count on each rank, then all-reduce both sums for the exact mean.
    """
    total = len(dataset) if max_windows is None else min(len(dataset), max_windows)
    per_round = world_size * batch_size
    for base in range(rank * batch_size, -(-total // per_round) * per_round, per_round):
        positions = np.arange(base, base + batch_size)
        n_real = int(max(0, min(batch_size, total - base)))
        chunk = torch.from_numpy(dataset.window(np.where(positions < total, positions, 0)))
        if device is not None:
            chunk = chunk.to(device)
        yield chunk[:, :-1], chunk[:, 1:], n_real


def read_meta(folder: str | os.PathLike, tokenizer: Tokenizer | None = None) -> dict:
    """meta.json of a prepared folder, validated against the token files' sizes and `tokenizer` (the one the
    model uses, GPT-2's by default)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a prepared dataset ({META_NAME} missing); run gptlab prepare") from None
    except (OSError, ValueError) as exc:
        raise GptlabError(f"{folder / META_NAME} is unreadable ({exc}); run gptlab prepare --force again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), str) or meta.get("dtype") not in TOKEN_DTYPES:
        raise UsageError(f"{folder / META_NAME} does not describe token files gptlab reads (a tokenizer name and "
                         f"a token type of {' or '.join(TOKEN_DTYPES)}); prepare it again")
    check_tokenizer(meta, folder, tokenizer)
    itemsize = TOKEN_DTYPES[meta["dtype"]].itemsize
    for name, key in ((TRAIN_NAME, "train_tokens"), (VAL_NAME, "val_tokens")):
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != meta.get(key, -1) * itemsize:
            raise GptlabError(
                f"{path} has {size} bytes but {META_NAME} expects {meta.get(key)} tokens; "
                "the folder is incomplete or mixed: run gptlab prepare --force again"
            )
    return meta


def check_tokenizer(meta: dict, folder: Path, tokenizer: Tokenizer | None) -> None:
    """Refuse token files that `tokenizer` (the model's) did not write, naming both tokenizers."""
    tok = as_tokenizer(tokenizer)
    if meta["dtype"] == "uint16" and token_dtype_for(tok.n_vocab) == "uint32":
        raise UsageError(f"{folder} holds uint16 token ids (tokenizer {meta['tokenizer']}), but the model's "
                         f"vocabulary of {tok.n_vocab:,} tokens ({tok.name}) needs uint32; prepare the text again "
                         "with the model's tokenizer (gptlab prepare --tokenizer)")
    sha = meta.get("tokenizer_sha256")
    if meta["tokenizer"] != tok.name or (sha and tok.sha256 and sha != tok.sha256):
        raise UsageError(f"{folder} was prepared with tokenizer {meta['tokenizer']}, but the model uses {tok.name}; "
                         "prepare the text again with the model's tokenizer (gptlab prepare --tokenizer), or use "
                         "a model of that tokenizer")


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `gptlab prepare` (meta.json next to train.bin and val.bin)."""
    path = Path(path)
    return path.is_dir() and all((path / n).is_file() for n in (META_NAME, TRAIN_NAME, VAL_NAME))


def load_prepared(
    folder: str | os.PathLike, context_length: int, stride: int | None = None, tokenizer: Tokenizer | None = None
) -> tuple[TokenFileDataset, TokenFileDataset]:
    """The (train, val) datasets of a prepared folder, after checking meta.json against the files and the
    tokenizer (the model's, GPT-2's by default)."""
    dtype = read_meta(folder, tokenizer)["dtype"]
    folder = Path(folder)
    return (
        TokenFileDataset(folder / TRAIN_NAME, context_length, stride, dtype),
        TokenFileDataset(folder / VAL_NAME, context_length, stride, dtype),
    )
