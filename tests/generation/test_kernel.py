"""prepare_for_decoding: batch-1 decoding steps in the C kernel (gptlab.generation.kernel)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from gptlab import GPTModel
from gptlab.generation import kernel
from gptlab.generation.decoding import prepare_for_decoding
from gptlab.generation.generate import generate
from gptlab.pretrained.native import save_model
from tests.helpers import run_cli, tiny_config


def pair(dtype=torch.float32, seed=0, **overrides) -> tuple[GPTModel, GPTModel]:
    """The same weights twice: eager, and with the kernel."""
    torch.manual_seed(seed)
    eager = GPTModel(tiny_config(**overrides)).to(dtype).eval()
    fast = GPTModel(tiny_config(**overrides)).to(dtype).eval()
    fast.load_state_dict(eager.state_dict())
    if not kernel.use_kernel_decoding(fast):
        pytest.skip("no C compiler with OpenMP on this machine")
    return eager, fast


def count_steps(model: GPTModel) -> list[int]:
    """Count the calls that reach the C step."""
    calls, step = [], model.cpu_decoder.step

    def counted(*args):
        calls.append(1)
        return step(*args)

    model.cpu_decoder.step = counted
    return calls


def run_both(eager: GPTModel, fast: GPTModel, chunks: list[list[int]], max_len: int | None = None):
    """Feed the same token chunks to both through KV caches; returns the last logits and the caches."""
    cache_e, cache_f = eager.make_kv_cache(1, max_len), fast.make_kv_cache(1, max_len)
    with torch.inference_mode():
        for ids in chunks:
            a = eager(torch.tensor([ids]), kv_cache=cache_e, last_only=True)
            b = fast(torch.tensor([ids]), kv_cache=cache_f, last_only=True)
    return a, b, cache_e, cache_f


def test_kernel_steps_match_eager_logits_and_cache():
    eager, fast = pair()
    assert fast.out_head.weight is fast.tok_emb.weight  # the model itself is untouched: still tied
    calls = count_steps(fast)
    a, b, cache_e, cache_f = run_both(eager, fast, [[5, 17, 300, 2, 9], [42], [7], [50256]], max_len=12)
    assert b.shape == a.shape == (1, 1, 50257) and b.dtype == a.dtype
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert len(calls) == 4  # the prompt and each single token went through the kernel
    assert cache_f.length == cache_e.length == 8
    torch.testing.assert_close(cache_f.k, cache_e.k, atol=1e-5, rtol=1e-4)  # only the 8 filled slots are non-zero
    torch.testing.assert_close(cache_f.v, cache_e.v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_through_the_kernel(dtype, monkeypatch):
    """Several tokens per call (a prompt, or a chunk after cached ones), causal within the call."""
    eager, fast = pair(dtype, seed=11)
    calls = count_steps(fast)
    chunks = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]  # groups of 4 and tails
    a, b, cache_e, cache_f = run_both(eager, fast, chunks)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(b.float(), a.float(), **tol)
    torch.testing.assert_close(cache_f.k.float(), cache_e.k.float(), **tol)
    torch.testing.assert_close(cache_f.v.float(), cache_e.v.float(), **tol)
    assert len(calls) == 4 and cache_f.length == 20
    with torch.inference_mode():  # all positions' logits asked for: the eager forward
        full = fast(torch.tensor([[1, 2, 3]]), kv_cache=fast.make_kv_cache(1))
    assert full.shape == (1, 3, 50257) and len(calls) == 4
    monkeypatch.setattr(kernel, "MAX_TOKENS", 4)  # longer prompts than this take the eager GEMMs
    run_both(eager, fast, [[1, 2, 3, 4, 5], [6, 7, 8, 9]])
    assert len(calls) == 5


def test_kernel_generate_equals_eager_across_the_window():
    eager, fast = pair(seed=4)
    calls = count_steps(fast)
    prompt = torch.tensor([[5, 17, 300, 2, 9]])
    assert torch.equal(generate(fast, prompt, 60), generate(eager, prompt, 60))  # re-prefills at 32 tokens
    assert len(calls) > 40
    gen = torch.Generator().manual_seed(1)
    sampled = generate(fast, prompt, 20, temperature=1.0, top_k=50, generator=gen)
    gen.manual_seed(1)
    assert torch.equal(sampled, generate(eager, prompt, 20, temperature=1.0, top_k=50, generator=gen))


@pytest.mark.parametrize("overrides", [
    dict(vocab_multiple=64, qkv_bias=False),  # padded LM head rows, no qkv bias
    dict(emb_dim=24, n_heads=3, vocab_size=1000),  # rows and widths that are not multiples of 16 or 64
    dict(emb_dim=21, n_heads=3, vocab_size=777, tie_embeddings=False),  # odd widths, an untied head
])
def test_other_shapes(overrides):
    eager, fast = pair(seed=5, **overrides)
    a, b, cache_e, cache_f = run_both(eager, fast, [[1, 2], [3], [4]])
    assert b.shape == (1, 1, fast.config.vocab_size)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache_f.k, cache_e.k, atol=1e-5, rtol=1e-4)


def test_bfloat16_kernel_is_close_to_float32():
    eager, fast = pair(torch.bfloat16, seed=1)
    reference = GPTModel(tiny_config()).eval()
    reference.load_state_dict(eager.state_dict())  # the same bf16 values, computed in float32
    calls = count_steps(fast)
    ids = torch.tensor([[3, 99, 1000, 7]])
    with torch.inference_mode():
        want = reference(ids, last_only=True)
        cache = fast.make_kv_cache(1)
        fast(ids[:, :2], kv_cache=cache)
        fast(ids[:, 2:3], kv_cache=cache)
        got = fast(ids[:, 3:], kv_cache=cache)
        eager_bf16 = eager(ids, last_only=True)
    assert got.dtype == torch.bfloat16 and len(calls) == 2
    # float32 activations, bfloat16 weights, cache and product inputs: closer to float32 than eager bf16
    err_kernel = (got.float() - want).abs().max()
    assert err_kernel < 0.02
    assert err_kernel <= (eager_bf16.float() - want).abs().max()


def test_training_batches_and_grad_keep_the_eager_path():
    eager, fast = pair(seed=2)
    calls = count_steps(fast)
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    eager.train(), fast.train()
    loss_e, loss_f = eager.loss(ids, ids), fast.loss(ids, ids)
    loss_e.backward(), loss_f.backward()
    assert torch.equal(loss_e, loss_f)
    for (name, p), q in zip(eager.named_parameters(), fast.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    eager.eval(), fast.eval()
    with torch.inference_mode():
        assert torch.equal(eager(ids), fast(ids))
        cache_e, cache_f = eager.make_kv_cache(2), fast.make_kv_cache(2)
        eager(ids, kv_cache=cache_e), fast(ids, kv_cache=cache_f)
        assert torch.equal(eager(ids[:, :1], kv_cache=cache_e), fast(ids[:, :1], kv_cache=cache_f))  # 2 rows
    cache = fast.make_kv_cache(1)
    fast(ids[:1, :3], kv_cache=cache)
    out = fast(ids[:1, 3:4], kv_cache=cache)  # gradients on: the eager path, so backward works
    assert out.requires_grad
    assert calls == []


def test_weights_changed_after_preparing_are_used():
    """An optimizer step or load_state_dict after prepare_for_decoding: the packed copy follows."""
    eager, fast = pair(seed=7)
    torch.manual_seed(8)
    other = GPTModel(tiny_config()).eval()
    for model in (eager, fast):
        model.load_state_dict(other.state_dict())
    a, b, _, _ = run_both(eager, fast, [[1, 2], [3]])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for model in (eager, fast):
            model.trf_blocks[1].ff.proj.bias.add_(0.5)  # in place, as optimizers do
            model.final_norm.weight.mul_(2.0)
    a2, b2, _, _ = run_both(eager, fast, [[1, 2], [3]])
    assert not torch.allclose(a2, a)
    torch.testing.assert_close(b2, a2, atol=1e-5, rtol=1e-4)


def test_thread_count_and_bad_token():
    eager, fast = pair(seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, b, _, _ = run_both(eager, fast, [[1, 2], [3]])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    cache = fast.make_kv_cache(1)
    with torch.inference_mode():
        fast(torch.tensor([[1]]), kv_cache=cache)
        with pytest.raises(IndexError, match="outside the vocabulary"):
            fast(torch.tensor([[60000]]), kv_cache=cache)
    assert cache.length == 1  # nothing written


def test_pack_layouts():
    w = torch.arange(70 * 6, dtype=torch.float32).view(70, 6)  # 70 rows: two blocks, the second padded
    p = kernel.pack(w, torch.float32)
    assert p.shape == (2, 6, 64)
    assert p[1, 4, 3] == w[67, 4] and p[0, 0, 63] == w[63, 0] and torch.all(p[1, :, 6:] == 0)
    q = kernel.pack(w, torch.bfloat16)
    assert q.shape == (2, 3, 64, 2)  # column pairs: a row's weights for columns 2c and 2c+1 side by side
    assert q[1, 2, 3, 1] == w[67, 5].bfloat16() and q[0, 1, 10, 0] == w[10, 2].bfloat16()


def test_build_is_cached_and_a_failed_build_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "home"))
    if kernel.build("f32") is None:  # pragma: no cover - build raises instead
        pytest.fail("build returned nothing")
    built = kernel.build("f32")
    stamp = built.stat().st_mtime_ns
    assert kernel.build("f32") == built and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert os.listdir(built.parent) == [built.name]  # no temporary files left behind
    monkeypatch.setenv("CC", "false")  # a compiler that fails, and no cached kernel for it
    model = GPTModel(tiny_config()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_for_decoding(model, kernel="on") is model
    assert any("false failed" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert model.cpu_decoder is None and not model.training
    assert model.trf_blocks[0].att.qkv.weight.stride() == (1, 96)  # the eager layout instead
    assert generate(model, [1, 2, 3], 4).shape == (1, 7)


def test_dtype_change_goes_eager():
    eager, fast = pair(seed=6)
    calls = count_steps(fast)
    eager.to(torch.bfloat16), fast.to(torch.bfloat16)
    a, b, _, _ = run_both(eager, fast, [[1, 2], [3]])
    assert calls == [] and torch.equal(a, b)  # bfloat16 now: the float32 kernel stays out of it


def test_cli_kernel_gives_the_same_greedy_tokens(tmp_path):
    torch.manual_seed(3)
    save_model(GPTModel(tiny_config()), tmp_path / "m")
    args = ("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12",
            "--temperature", "0", "--json", "--device", "cpu")
    plain, fast = run_cli(*args, "--cpu-kernel", "off"), run_cli(*args, "--cpu-kernel", "on")
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    tokens = [json.loads(p.stdout)["completions"][0]["token_ids"] for p in (plain, fast)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12
    batch = run_cli(*args, "--cpu-kernel", "on", "--num-samples", "2")  # batches decode eagerly
    assert batch.returncode == 0 and "--cpu-kernel speeds up one sample" in batch.stderr
    assert len(json.loads(batch.stdout)["completions"]) == 2


def test_speed_check_keeps_or_drops_the_kernel(monkeypatch):
    """A kernel that is not faster than eager decoding by the check's measure is not used; the check is cheap."""
    import time

    torch.manual_seed(0)
    model = GPTModel(tiny_config()).eval()
    start = time.perf_counter()
    ratio, pairs = kernel.speed_check(model, kernel.KernelDecoder(model))
    assert ratio > 0 and 5 <= pairs <= 12 and time.perf_counter() - start < 10
    monkeypatch.setattr(kernel, "SPEED_MARGIN", 0.0)  # nothing is that fast: eager decoding instead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernel.use_kernel_decoding(model, check_speed=True)
    assert model.cpu_decoder is None and any("eager step" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setenv("GPTLAB_KERNEL_SPEED_CHECK", "1")
        assert prepare_for_decoding(model, kernel="auto") is model  # "auto": silently eager
    assert model.cpu_decoder is None and caught == []
    assert model.trf_blocks[0].att.qkv.weight.stride() == (1, 96)  # ... in the eager layout
    assert kernel.use_kernel_decoding(model, check_speed=False)  # the check off: kept


def test_the_avx2_build_matches_eager(monkeypatch, tmp_path):
    """The kernel built for an AVX2-only CPU (8-wide vectors, prefetching) gives the eager logits too."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " not in flags or " fma " not in flags:
        pytest.skip("this CPU cannot run AVX2 code")
    monkeypatch.setenv("GPTLAB_KERNEL_MARCH", "x86-64-v3")
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path))
    for dtype in (torch.float32, torch.bfloat16):
        eager, fast = pair(dtype, seed=11)
        a, b, cache_e, cache_f = run_both(eager, fast, [[5, 17, 300, 2, 9, 11, 12, 13], [42], [7], [50256]], 16)
        tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(b.float(), a.float(), **tolerance)
        torch.testing.assert_close(cache_f.k.float(), cache_e.k.float(), **tolerance)
    assert any("decode-f32" in p.name for p in (tmp_path / "kernels").iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_continuous_batching_rows_match_eager_slots(dtype):
    """GPTModel.forward_slots' single-token steps run every row in one pass of the kernel, each row at its
    own position in its own slot, with the eager slots' logits and caches."""
    eager, fast = pair(dtype, context_length=40)
    calls = []
    rows = fast.cpu_decoder.rows_step
    fast.cpu_decoder.rows_step = lambda *args: calls.append(1) or rows(*args)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19]]
    ids = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    got = {}
    with torch.inference_mode():
        for name, model in (("eager", eager), ("fast", fast)):
            cache = model.make_slot_cache(4)
            logits = [model.forward_slots(ids, cache, 0, [len(p) for p in prompts])]  # a padded prefill: eager
            for t in range(4):
                logits.append(model.forward_slots(torch.tensor([[3 + t], [4 + t], [5 + t]]), cache, 0))
            logits.append(model.forward_slots(torch.tensor([[1], [2]]), cache, 1))  # slots 1 and 2 only
            got[name] = (logits, cache)
    assert len(calls) == 5
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(got["eager"][0], got["fast"][0], strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b.float(), a.float(), **tol)
    (_, ce), (_, cf) = got["eager"], got["fast"]
    assert ce.lengths == cf.lengths == [9, 7, 12, 0]
    torch.testing.assert_close(cf.k.float(), ce.k.float(), **tol)
    torch.testing.assert_close(cf.v.float(), ce.v.float(), **tol)
