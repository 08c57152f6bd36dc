"""TokenFileDataset windows, the seeded rank-aware batch order, and loading prepared folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptlab.data.tokenfile import (
    TokenFileDataset,
    WindowBatchSampler,
    eval_batches,
    is_prepared_dir,
    iter_batches,
    load_prepared,
)
from gptlab.errors import GptlabError, UsageError


def write_tokens(path, tokens) -> str:
    np.asarray(tokens, dtype="<u2").tofile(path)
    return str(path)


def test_windows_are_shifted_by_one_and_strided(tmp_path):
    path = write_tokens(tmp_path / "t.bin", range(100, 123))  # 23 tokens
    data = TokenFileDataset(path, context_length=5)
    assert len(data) == (23 - 5 - 1) // 5 + 1 == 4
    x, y = data[3]
    assert x.dtype == torch.long
    assert x.tolist() == [115, 116, 117, 118, 119] and y.tolist() == [116, 117, 118, 119, 120]
    overlapping = TokenFileDataset(path, context_length=5, stride=2)
    assert len(overlapping) == 9
    assert overlapping[8][1].tolist() == list(range(117, 122))
    with pytest.raises(IndexError):
        data[4]
    # Values above 32767 survive (uint16, not int16).
    big = TokenFileDataset(write_tokens(tmp_path / "b.bin", [50256, 40000, 1]), context_length=2)
    assert big[0][0].tolist() == [50256, 40000]


def test_too_short_or_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="fewer than one window"):
        TokenFileDataset(write_tokens(tmp_path / "s.bin", [1, 2, 3]), context_length=3)
    with pytest.raises(UsageError, match="not found"):
        TokenFileDataset(tmp_path / "nope.bin", context_length=3)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises((UsageError, GptlabError)):
        TokenFileDataset(tmp_path / "empty.bin", context_length=3)


def stream(n, batch, take=6, **kw):
    """The first `take` batches of an endless sampler."""
    it = iter(WindowBatchSampler(n, batch, **kw))
    return [next(it) for _ in range(take)]


def test_order_is_seeded_per_epoch_and_covers_every_window_once():
    batches = stream(10, 5, seed=3)
    epoch0 = batches[0] + batches[1]
    epoch1 = batches[2] + batches[3]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # a new permutation each epoch
    assert stream(10, 5, seed=3) == batches  # same seed, same order
    assert stream(10, 5, seed=4) != batches
    assert stream(10, 5, seed=3, shuffle=False)[:2] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_ranks_read_distinct_blocks_of_one_global_stream():
    single = [i for b in stream(50, 4, seed=1) for i in b]  # 24 positions in one process
    r0 = stream(50, 2, seed=1, rank=0, world_size=2)
    r1 = stream(50, 2, seed=1, rank=1, world_size=2)
    for k in range(6):
        assert r0[k] == single[4 * k : 4 * k + 2] and r1[k] == single[4 * k + 2 : 4 * k + 4]
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_resume_from_start_continues_the_stream_on_any_number_of_ranks():
    full = [i for b in stream(30, 6, seed=9, take=8) for i in b]
    assert [i for b in stream(30, 6, seed=9, start=18, take=3) for i in b] == full[18:36]
    # Resumed on 3 ranks of 2 windows each: the same global batches.
    parts = [stream(30, 2, seed=9, start=18, rank=r, world_size=3, take=3) for r in range(3)]
    rebuilt = [i for k in range(3) for r in range(3) for i in parts[r][k]]
    assert rebuilt == full[18:36]


def test_finite_epochs_give_every_window_once_across_ranks():
    samplers = [WindowBatchSampler(11, 2, shuffle=False, rank=r, world_size=2, epochs=1) for r in range(2)]
    seen = [i for s in samplers for b in s for i in b]
    assert sorted(seen) == list(range(11))
    assert [len(s) for s in samplers] == [3, 3] and len(list(samplers[1])) == 3
    with pytest.raises(TypeError):
        len(WindowBatchSampler(11, 2))
    with pytest.raises(UsageError, match="rank"):
        WindowBatchSampler(11, 2, rank=2, world_size=2)


def test_iter_batches_stacks_windows(tmp_path):
    path = write_tokens(tmp_path / "t.bin", np.arange(1000) % 50257)
    data = TokenFileDataset(path, context_length=8)
    sampler = WindowBatchSampler(len(data), 4, seed=0)
    x, y = next(iter_batches(data, sampler, device="cpu"))
    assert x.shape == y.shape == (4, 8)
    first = next(iter(sampler))
    for row, index in enumerate(first):
        assert torch.equal(x[row], data[index][0]) and torch.equal(y[row], data[index][1])


def test_load_prepared_checks_meta_against_files(tmp_path):
    write_tokens(tmp_path / "train.bin", range(50))
    write_tokens(tmp_path / "val.bin", range(20))
    assert not is_prepared_dir(tmp_path)
    meta = {"tokenizer": "gpt2", "dtype": "uint16", "train_tokens": 50, "val_tokens": 20}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert is_prepared_dir(tmp_path)
    train, val = load_prepared(tmp_path, context_length=4)
    assert (len(train), len(val)) == (12, 4)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "val_tokens": 21}))
    with pytest.raises(GptlabError, match="val.bin"):
        load_prepared(tmp_path, context_length=4)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base"}))
    with pytest.raises(UsageError, match="cl100k_base"):
        load_prepared(tmp_path, context_length=4)
    with pytest.raises(UsageError, match="not a prepared dataset"):
        load_prepared(tmp_path / "missing", context_length=4)


def test_eval_batches_cover_every_window_once_with_equal_batch_counts(tmp_path):
    data = TokenFileDataset(write_tokens(tmp_path / "t.bin", range(1, 80)), context_length=3)  # 26 windows
    firsts = {w[0].item(): i for i, w in enumerate(data[i][0] for i in range(len(data)))}
    for world_size, limit in ((1, None), (2, None), (3, 20)):
        per_rank = [list(eval_batches(data, 4, rank=r, world_size=world_size, max_windows=limit))
                    for r in range(world_size)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of batches on every rank
        real = [firsts[x[i, 0].item()] for batches in per_rank for x, y, n in batches for i in range(n)]
        assert sorted(real) == list(range(limit or len(data)))
        for batches in per_rank:
            for x, y, _ in batches:
                assert x.shape == (4, 3) and torch.equal(x[:, 1:], y[:, :-1])


def test_prefetched_batches_are_the_same_and_the_reader_stops_when_abandoned(tmp_path):
    import threading

    data = TokenFileDataset(write_tokens(tmp_path / "t.bin", np.arange(500) % 50257), context_length=8)
    plain = list(iter_batches(data, WindowBatchSampler(len(data), 4, seed=3, epochs=2)))
    ahead = list(iter_batches(data, WindowBatchSampler(len(data), 4, seed=3, epochs=2), prefetch=2))
    assert len(plain) == len(ahead) > 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, ahead, strict=True))
    endless = iter_batches(data, WindowBatchSampler(len(data), 4, seed=3), prefetch=2)  # a training stream
    next(endless)
    endless.close()  # the loop stopped early: the reading thread must end too
    for _ in range(50):
        if not any(t.name == "gptlab-prefetch" for t in threading.enumerate()):
            break
        threading.Event().wait(0.05)
    assert not any(t.name == "gptlab-prefetch" for t in threading.enumerate())
