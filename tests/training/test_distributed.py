"""DDP and FSDP under a real `torchrun --nproc_per_node 2` on CPU (gloo), against one process.

The loop itself lives in tests/training/dist_worker.py (run by torchrun, imported here for the reference).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import load_model
from gptlab.data.tokenfile import TokenFileDataset, WindowBatchSampler, iter_batches
from gptlab.hardware import compile_model, lookup_peak_tflops, mfu, peak_tflops
from gptlab.model import flops_per_token, unwrap_model
from gptlab.training import distributed as D
from tests.helpers import SRC
from tests.training import dist_worker as W

WORKER = str(Path(__file__).with_name("dist_worker.py"))
GLOBAL_BATCH = W.MICRO * W.ACCUM * 2  # 2 ranks


@functools.lru_cache(maxsize=2)
def reference(token_file: str, steps: int):
    """Single-process losses and final weights (computed once per step count)."""
    losses, model, _ = W.reference_run(token_file, steps, GLOBAL_BATCH)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def torchrun(mode: str, tokens: str, out: Path, timeout: float = 120, env: dict | None = None):
    full_env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKER, mode, tokens, str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "train.bin"
    np.random.default_rng(0).integers(0, W.CONFIG.vocab_size, 3000).astype("<u2").tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, token_file) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc, _ = torchrun("train", token_file, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(trained, token_file, strategy):
    results = json.loads((trained / "results.json").read_text())[strategy]
    losses, expected = reference(token_file, W.STEPS)
    assert np.allclose(results["losses"], losses, atol=1e-4, rtol=0), (results["losses"], losses)
    # Full weights gathered on rank 0 carry plain names and equal the single-process weights.
    state = torch.load(trained / f"{strategy}.pt", weights_only=True)["model"]
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(state[name], tensor, atol=1e-5), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_save_model_distributed_writes_a_plain_model(trained, token_file, strategy):
    loaded = load_model(trained / f"{strategy}_model")
    _, expected = reference(token_file, W.STEPS)
    for name, tensor in expected.items():
        assert torch.allclose(loaded.state_dict()[name], tensor, atol=1e-5), name


def test_resume_across_strategies_under_torchrun(trained, token_file):
    """Each strategy resumed (on 2 ranks, checkpoint broadcast from rank 0) from the other's checkpoint."""
    results = json.loads((trained / "results.json").read_text())
    losses, _ = reference(token_file, W.STEPS + 1)
    for key in ("ddp_resumed_from_fsdp", "fsdp_resumed_from_ddp"):
        assert results[key][0] == pytest.approx(losses[-1], abs=1e-4), key


def test_gradient_sync_is_skipped_on_accumulation_micro_steps(trained):
    ddp = json.loads((trained / "results.json").read_text())["ddp"]
    for a, b in ddp["unsynced"]:  # local gradients of different data
        assert abs(a - b) > 1e-6
    for a, b in ddp["synced"]:  # all-reduced on the last micro-step
        assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_on_a_different_number_of_ranks(trained, token_file, strategy):
    """A 2-rank checkpoint (model + AdamW state, full form) continues exactly in one process."""
    saved = torch.load(trained / f"{strategy}.pt", weights_only=True)
    model = W.make_model()
    torch.nn.init.zeros_(model.pos_emb.weight)  # proves the load overwrites it
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR)
    D.load_model_state_dict(model, saved["model"])
    D.load_optimizer_state_dict(model, opt, saved["optim"])
    data = TokenFileDataset(token_file, W.CONFIG.context_length)
    sampler = WindowBatchSampler(len(data), GLOBAL_BATCH, seed=7, start=W.STEPS * GLOBAL_BATCH)
    x, y = next(iter_batches(data, sampler))
    loss = W.loss_of(model, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses, expected = reference(token_file, W.STEPS + 1)
    assert loss.item() == pytest.approx(losses[-1], abs=1e-4)
    for name, tensor in expected.items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-5), name


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    proc, elapsed = torchrun("fail", "unused", tmp_path, timeout=90)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr
    assert elapsed < 60


def test_a_hung_rank_times_out_with_a_clear_message(tmp_path):
    proc, elapsed = torchrun("hang", "unused", tmp_path, timeout=90, env={"GPTLAB_DIST_TIMEOUT": "3"})
    assert proc.returncode != 0
    assert "rank 0: lost contact with another rank" in proc.stderr
    assert "GPTLAB_DIST_TIMEOUT" in proc.stderr
    assert elapsed < 60  # rank 1 sleeps 120 s: the timeout, not rank 1, ended the job


def test_single_process_fallbacks(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed("cpu")
    assert not info.enabled and info.is_main and D.is_main_process()
    model = W.make_model()
    assert D.wrap_model(model, "fsdp", "cpu") is model
    with D.gradient_sync(model, enabled=False):
        pass
    assert D.all_reduce_mean(torch.tensor(2.5)) == 2.5
    with pytest.raises(D.UsageError, match="strategy"):
        D.wrap_model(model, "zero3", "cpu")
    monkeypatch.setenv("GPTLAB_DIST_TIMEOUT", "soon")
    with pytest.raises(D.UsageError, match="GPTLAB_DIST_TIMEOUT"):
        D.timeout_seconds()


def test_compiled_model_checkpoint_loads_uncompiled(tmp_path):
    """torch.compile's `_orig_mod.` prefix never reaches the file. The eager backend runs dynamo's
    tracing without inductor's C++ build (which works here too but takes over a minute on CPU)."""
    model = W.make_model()
    compiled = compile_model(model, backend="eager")
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(compiled) is model
    opt = torch.optim.AdamW(compiled.parameters(), lr=W.LR)
    x = torch.randint(0, W.CONFIG.vocab_size, (2, 8))
    W.loss_of(compiled, x[:, :-1], x[:, 1:]).backward()
    opt.step()
    D.save_model_distributed(compiled, tmp_path / "m")  # single process: the plain full state
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    from gptlab import save_model

    save_model(compiled, tmp_path / "m2")
    assert torch.equal(load_model(tmp_path / "m2").pos_emb.weight, model.pos_emb.weight)


def test_flops_per_token_counts_every_matmul(tiny):
    # Count directly from the model: 2-D Linear weights (the tied head counted once) do 6 FLOPs per token.
    from gptlab import GPTModel

    model = GPTModel(tiny)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    T = tiny.context_length
    expected = 6 * n + 12 * tiny.n_layers * tiny.emb_dim * T
    assert flops_per_token(tiny) == expected
    assert flops_per_token(tiny, seq_len=8) == expected - 12 * tiny.n_layers * tiny.emb_dim * (T - 8)


def test_peak_tflops_lookup_and_mfu():
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert lookup_peak_tflops("NVIDIA A10", "bfloat16") == 125.0
    assert lookup_peak_tflops("NVIDIA L40S", "bfloat16") == 362.05
    assert lookup_peak_tflops("Tesla V100-SXM2-16GB", "bfloat16") is None
    assert lookup_peak_tflops("Some Future GPU", "bfloat16") is None
    assert peak_tflops("cpu", "float32") is None
    assert peak_tflops("cpu", "float32", override=100.0) == 100.0
    # 1e6 tokens/s at 1e8 FLOPs each = 1e14 FLOP/s = 50% of 2 devices at 100 TFLOPS.
    assert mfu(1e6, 1e8, 100.0, num_devices=2) == pytest.approx(0.5)
    assert mfu(1e6, 1e8, None) is None


def test_translate_errors_names_lost_ranks_and_passes_other_errors():
    with pytest.raises(D.GptlabError, match=r"rank 3: lost contact with another rank \(Connection closed by peer"):
        with D.translate_errors(rank=3):
            raise RuntimeError("[/src/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:4242. Check logs")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with D.translate_errors():
            raise RuntimeError("shape mismatch")
