"""Training and validation batches from a folder written by `gptlab prepare`, for `gptlab train --data DIR`.

The loaders behave like the DataLoaders of a text run as far as the training loop is concerned
(`len`, `iter`, a `generator` with get_state/set_state) but read windows straight from the
memory-mapped token files, in the seeded global order of tokenfile.WindowBatchSampler: epoch e is the
permutation drawn from (seed, e), cut into global micro-batches of batch_size * world_size windows,
and rank r takes block r of each. A run on 2 ranks with --batch-size B therefore sees exactly the
batches a single process sees with --batch-size 2B. The incomplete last global batch of an epoch is
dropped, so every rank gets the same number of batches (FSDP's forward is a collective).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import UsageError
from ..tokenizer import Tokenizer
from .text import DataSplit
from .tokenfile import (
    META_NAME,
    TokenFileDataset,
    WindowBatchSampler,
    is_prepared_dir,
    iter_batches,
    load_prepared,
    read_meta,
)


class EpochCounter:
    """The loader's "generator": the index of the next epoch's permutation, as a tensor state."""

    def __init__(self) -> None:
        self.epoch = 0

    def get_state(self) -> torch.Tensor:
        return torch.tensor([self.epoch], dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> None:
        self.epoch = int(state.reshape(-1)[0])


class PreparedLoader:
    """This rank's (x, y) batches of a token file; each `iter()` takes the next epoch's permutation."""

    def __init__(
        self,
        dataset: TokenFileDataset,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        name: str = "train.bin",
    ) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.generator = EpochCounter()
        global_batch = batch_size * world_size
        if len(dataset) < global_batch:
            raise UsageError(
                f"{name} holds {len(dataset)} windows, fewer than one global batch of {global_batch} "
                f"(--batch-size {batch_size} x {world_size} rank(s)); lower --batch-size or --context-length"
            )

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches after the first `skip` ones (a resumed run), without reading those."""
        epoch = self.generator.epoch if self.shuffle else 0
        self.generator.epoch += 1  # drawn when the iteration starts, as a DataLoader's sampler does
        n = len(self.dataset)
        start = epoch * n + skip * self.batch_size * self.world_size
        sampler = WindowBatchSampler(n, self.batch_size, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                                     world_size=self.world_size, start=start)
        cuda = self.device is not None and self.device.type == "cuda"
        # On a GPU, pinned batches read two ahead: the copies and reads overlap the model's work.
        batches = iter_batches(self.dataset, sampler, device=self.device, pin_memory=cuda, prefetch=2 if cuda else 0)
        return (next(batches) for _ in range(max(0, len(self) - skip)))


def prepared_fingerprint(folder: str | os.PathLike) -> str:
    """Identifies the prepared data (its meta.json: token counts, sources and their hashes)."""
    return hashlib.sha256((Path(folder) / META_NAME).read_bytes()).hexdigest()[:16]


def prepared_split(
    folder: str | os.PathLike,
    *,
    context_length: int,
    stride: int | None,
    batch_size: int,
    seed: int,
    vocab_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    tokenizer: Tokenizer | None = None,
):
    """A DataSplit (train and validation loaders for this rank) over a prepared folder, whose tokens must
    come from `tokenizer` (the model's; GPT-2's by default)."""
    meta = read_meta(folder, tokenizer)
    if int(meta.get("vocab_size", 0)) > vocab_size:
        raise UsageError(f"{folder} was tokenized with a vocabulary of {meta['vocab_size']} but the model has "
                         f"{vocab_size}; use vocab_size {meta['vocab_size']}")
    train_set, val_set = load_prepared(folder, context_length, stride, tokenizer)
    common = dict(seed=seed, rank=rank, world_size=world_size, device=device)
    train_loader = PreparedLoader(train_set, batch_size, **common)
    val_loader = PreparedLoader(val_set, batch_size, shuffle=False, name="val.bin", **common)
    train_tokens, val_tokens = int(meta["train_tokens"]), int(meta["val_tokens"])
    return DataSplit(train_loader, val_loader, train_tokens + val_tokens, train_tokens, val_tokens,  # type: ignore[arg-type]
                     prepared_fingerprint(folder))


def prepared_folder(data: list[str] | None) -> Path | None:
    """The folder if `--data` names exactly one prepared folder, else None (text files or corpora)."""
    if data and len(data) == 1 and is_prepared_dir(data[0]):
        return Path(data[0])
    if data and len(data) > 1 and any(is_prepared_dir(p) for p in data):
        raise UsageError("a prepared folder must be the only --data path; prepare all the text into one folder")
    return None
