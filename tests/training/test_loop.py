import math
import signal
import subprocess
import sys

import pytest
import torch

from gptlab import GPTModel, TrainConfig, create_dataloader, load_checkpoint, save_checkpoint, train
from gptlab.errors import GptlabError, UsageError
from gptlab.evaluate import calc_loss_batch, calc_loss_loader
from gptlab.training.checkpoint import CHECKPOINT_NAME, capture_rng_state, restore_rng_state
from gptlab.training.optim import build_optimizer, lr_at
from tests.helpers import SRC, tiny_config

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared machine: one thread is faster and avoids spin-waiting on busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pattern_tokens(n: int = 1200, seed: int = 0) -> torch.Tensor:
    """A learnable stream: short random 'words' repeated in random order."""
    g = torch.Generator().manual_seed(seed)
    words = [torch.randint(0, VOCAB, (int(k),), generator=g) for k in torch.randint(2, 6, (12,), generator=g)]
    out = []
    while sum(map(len, out)) < n:
        out.append(words[int(torch.randint(0, len(words), (1,), generator=g))])
    return torch.cat(out)[:n]


def loaders(batch_size=2, seed=3, n=1200, ctx=16):
    ids = pattern_tokens(n)
    cut = int(len(ids) * 0.9)
    train_loader = create_dataloader(ids[:cut], batch_size=batch_size, max_length=ctx, stride=ctx, seed=seed)
    val_loader = create_dataloader(ids[cut:], batch_size=batch_size, max_length=ctx, stride=ctx, shuffle=False,
                                   drop_last=False, seed=seed)
    return train_loader, val_loader


def small_model(seed=0, drop_rate=0.1):
    torch.manual_seed(seed)
    return GPTModel(tiny_config(vocab_size=VOCAB, context_length=16, drop_rate=drop_rate))


QUIET = dict(quiet=True, device="cpu", sample_prompt=None, eval_iters=2)


def test_few_steps_reduce_the_loss():
    model = small_model()
    train_loader, val_loader = loaders()
    result = train(model, train_loader, val_loader, TrainConfig(epochs=3, lr=1e-2, warmup_steps=5, eval_every=10,
                                                               **QUIET))
    assert result.steps[0] == 0 and result.steps[-1] == result.state.step == 3 * len(train_loader)
    assert result.train_losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert result.train_losses[-1] < result.train_losses[0] - 1.0
    assert result.val_losses[-1] < result.val_losses[0] - 1.0
    assert result.tokens_seen[-1] == result.state.step * 2 * 16


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(100, cfg, 14) == pytest.approx(0.1)
    const = TrainConfig(lr=0.5, lr_schedule="constant", warmup_steps=0)
    assert {lr_at(s, const, 10) for s in range(20)} == {0.5}
    assert TrainConfig(lr=1.0).peak_min_lr == pytest.approx(0.1)
    with pytest.raises(UsageError, match="learning rate"):
        TrainConfig(lr=-1.0)


def test_weight_decay_only_on_2d_weights():
    model = small_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.tok_emb.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"] or opt.defaults["foreach"]


def book_train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter):
    """The book's chapter 5 loop, restated here as the reference."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for _ in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_losses.append(calc_loss_loader(train_loader, model, device, num_batches=eval_iter))
                    val_losses.append(calc_loss_loader(val_loader, model, device, num_batches=eval_iter))
                model.train()
                track_tokens_seen.append(tokens_seen)
    return train_losses, val_losses, track_tokens_seen


def test_constant_schedule_is_the_books_loop():
    train_loader, val_loader = loaders(n=1200, ctx=16)
    assert len(train_loader) == 33  # 2 epochs = 66 steps: the last step is an evaluation step (1, 6, ..., 66)
    ref_model = small_model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=4e-4, weight_decay=0.1)
    torch.manual_seed(42)
    expected = book_train_model_simple(ref_model, train_loader, val_loader, ref_opt, "cpu", 2, 5, 2)

    train_loader, val_loader = loaders(n=1200, ctx=16)
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    torch.manual_seed(42)
    result = train(model, train_loader, val_loader, optimizer=opt, epochs=2, lr=4e-4, lr_schedule="constant",
                   warmup_steps=0, grad_clip=0, eval_every=5, eval_at_start=False, book_eval_steps=True, **QUIET)
    assert (result.train_losses, result.val_losses, result.tokens_seen) == expected
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_grad_accumulation_matches_a_bigger_batch():
    results = []
    for batch_size, accum in [(4, 1), (2, 2)]:
        train_loader, val_loader = loaders(batch_size=batch_size)
        model = small_model(drop_rate=0.0)
        # SGD: the update is linear in the gradient, so equal gradients give equal weights (Adam would
        # magnify rounding differences in near-zero gradients).
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train(model, train_loader, val_loader, optimizer=opt, max_steps=6, grad_accum=accum, grad_clip=0,
              warmup_steps=0, eval_every=100, lr=0.5, lr_schedule="constant", **QUIET)
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], atol=2e-5, rtol=1e-4)


def run_interrupted(out, stop_at):
    """Train like the full run, sending ourselves Ctrl-C at the given steps and resuming each time."""
    stops = list(stop_at)
    resume = False
    while True:
        # Resumed sessions start from another init and RNG state: the checkpoint must restore everything.
        model = small_model(seed=99 if resume else 0)
        train_loader, val_loader = loaders()
        torch.manual_seed(1234 if resume else 7)

        def on_step(state):
            if stops and state.step == stops[0]:
                stops.pop(0)
                signal.raise_signal(signal.SIGINT)

        result = train(model, train_loader, val_loader, out_dir=out, resume=resume, on_step=on_step, **SETTINGS)
        if not result.interrupted:
            return model, result
        resume = True


SETTINGS = dict(epochs=3, lr=5e-3, warmup_steps=4, grad_accum=2, grad_clip=0.5, eval_every=4, save_every=5, **QUIET)


def test_resume_is_bit_exact(tmp_path):
    model = small_model()
    train_loader, val_loader = loaders()
    torch.manual_seed(7)
    full = train(model, train_loader, val_loader, out_dir=tmp_path / "full", **SETTINGS)
    steps_per_epoch = math.ceil(len(train_loader) / 2)
    assert full.state.step == 3 * steps_per_epoch and not full.interrupted

    # Ctrl-C mid-epoch, then exactly at an epoch boundary, then mid-epoch again.
    resumed_model, resumed = run_interrupted(tmp_path / "cut", [7, steps_per_epoch, steps_per_epoch + 3])
    strip = [{k: v for k, v in m.items() if k != "elapsed_s"} for m in full.metrics]
    assert [{k: v for k, v in m.items() if k != "elapsed_s"} for m in resumed.metrics] == strip
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_stopped_by_max_steps_then_extended_equals_one_run(tmp_path):
    """The evaluation a run makes where --max-steps stops it must not shift a later resume's data order."""
    model = small_model()
    train_loader, val_loader = loaders()
    torch.manual_seed(7)
    full = train(model, train_loader, val_loader, **SETTINGS)
    total = full.state.step
    stop = 7  # not an evaluation step (1, 5, 9, ...), mid first epoch; the resume crosses two epoch ends
    assert (stop - 1) % SETTINGS["eval_every"] and stop < math.ceil(len(train_loader) / 2)

    first = small_model()
    train_loader, val_loader = loaders()
    torch.manual_seed(7)
    train(first, train_loader, val_loader, out_dir=tmp_path, max_steps=stop, decay_steps=total, **SETTINGS)
    resumed_model = small_model(seed=99)
    train_loader, val_loader = loaders()
    resumed = train(resumed_model, train_loader, val_loader, out_dir=tmp_path, resume=True, **SETTINGS)

    def strip(records):
        return [{k: v for k, v in m.items() if k != "elapsed_s"} for m in records if m["step"] != stop]

    assert strip(resumed.metrics) == strip(full.metrics)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = small_model()
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    train_loader, val_loader = loaders()
    train(model, train_loader, val_loader, optimizer=opt, max_steps=2, eval_every=100, **QUIET)
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, model, opt, step=2, epoch=0, batches_done=2, tokens_seen=64, extra={"note": "x"})

    other = small_model(seed=5)
    other_opt = build_optimizer(other, TrainConfig(), torch.device("cpu"))
    state = load_checkpoint(path, other, other_opt)
    assert (state["step"], state["batches_done"], state["tokens_seen"], state["extra"]) == (2, 2, 64, {"note": "x"})
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])

    with pytest.raises(UsageError, match="another model.*emb_dim 32 vs 64"):
        load_checkpoint(path, GPTModel(tiny_config(vocab_size=VOCAB, context_length=16, emb_dim=64)))
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.pt", other)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04not a checkpoint at all")
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_model_round_trip(tmp_path, tied):
    from gptlab.pretrained.native import load_model, save_model

    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=VOCAB, context_length=16, tie_embeddings=tied))
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    assert (loaded.out_head.weight is loaded.tok_emb.weight) == tied
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(model.eval()(ids), loaded.eval()(ids))


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, model, step=1)
    import gptlab.training.checkpoint as ckpt_module

    def dying_save(obj, f):  # writes half a file, then the "disk" fails
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(1000)
        raise OSError(28, "No space left on device")

    real_save = torch.save
    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(GptlabError, match="No space left.*previous file.*intact"):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path, model)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left behind


def test_process_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    model = small_model()
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, model, step=1)
    # A second process is killed (os._exit: no cleanup at all) just before the rename of its new checkpoint.
    script = f"""
import os, sys, torch
sys.path.insert(0, {SRC!r}); sys.path.insert(0, {str(tmp_path.parent)!r})
from gptlab import GPTModel, GPTConfig, save_checkpoint
import gptlab.storage.files as fileio
model = GPTModel(GPTConfig(**{small_model().config.to_dict()!r}))
fileio.os.replace = lambda *a: os._exit(9)
save_checkpoint({str(path)!r}, model, step=2)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_NAME, ".gptlab-tmp"])
    leftovers = [p.name for p in (tmp_path / ".gptlab-tmp").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the half-done temp file, never renamed
    assert load_checkpoint(path, model)["step"] == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_dtypes_train(dtype):
    model = small_model()
    train_loader, val_loader = loaders()
    result = train(model, train_loader, val_loader, max_steps=12, lr=1e-2, eval_every=100, dtype=dtype, **QUIET)
    assert all(math.isfinite(x) for x in result.train_losses)
    assert result.train_losses[-1] < result.train_losses[0]
    assert next(model.parameters()).dtype == torch.float32  # autocast: weights stay float32


def test_diverged_loss_stops_with_a_clear_error(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")
    train_loader, val_loader = loaders()
    with pytest.raises(GptlabError, match="diverged.*lower --lr"):
        train(model, train_loader, val_loader, max_steps=3, eval_at_start=False, out_dir=tmp_path, **QUIET)
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # a NaN model is never saved
