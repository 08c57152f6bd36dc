"""Batches of whole examples for fine-tuning, in one seeded order shared by every rank.

Each epoch draws a permutation of the training examples from the loader's own generator (so the
loop can checkpoint it and resume exactly, as for `gptlab train`), cuts it into global batches of
batch_size x ranks examples, and gives rank r the r-th block of each. Under torchrun every rank
thus sees its own examples; the incomplete last global batch is dropped so all ranks take the same
number of steps. Validation is not split: every rank scores the whole validation set, so the
losses and accuracies agree on all ranks without gathering anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UsageError


class ExampleBatchSampler(Sampler[list[int]]):
    """Index lists of `batch_size` examples: this rank's share of each global batch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.shuffle, self.drop_last = shuffle, drop_last or world_size > 1
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        return self.n // step if self.drop_last else math.ceil(self.n / step)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        else:
            order = list(range(self.n))
        step, mine = self.batch_size * self.world_size, slice(self.rank * self.batch_size,
                                                               (self.rank + 1) * self.batch_size)
        for start in range(0, len(self) * step, step):
            yield order[start : start + step][mine]


def example_loaders(train_set: Dataset, val_set: Dataset, collate: Callable, batch_size: int, seed: int,
                    num_workers: int = 0, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """A shuffled training loader (this rank's share) and an ordered validation loader (all of it)."""
    n_train = len(train_set)  # type: ignore[arg-type]
    if n_train < batch_size * world_size and world_size > 1:
        raise UsageError(f"{n_train} training examples cannot fill one batch of {batch_size} on each of "
                         f"{world_size} ranks; lower --batch-size or give more data")
    generator = torch.Generator().manual_seed(seed)
    # One process keeps a ragged last batch only when the data cannot fill a single batch.
    sampler = ExampleBatchSampler(n_train, batch_size, generator, drop_last=n_train >= batch_size,
                                  rank=rank, world_size=world_size)
    train_loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                              generator=generator)
    val_sampler = ExampleBatchSampler(len(val_set), batch_size, shuffle=False, drop_last=False)  # type: ignore[arg-type]
    # A generator of its own: without one, every pass over the loader draws its worker seed from torch's
    # global RNG, which dropout uses too, and an evaluation would change the training run.
    val_loader = DataLoader(val_set, batch_sampler=val_sampler, collate_fn=collate, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed))
    return train_loader, val_loader
