"""prepare_for_decoding(compile=True): batch-1 decoding steps as one compiled graph (gptlab.decode_step)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gptlab import GPTModel
from gptlab import decode_step as decode_module
from gptlab.checkpoint import save_model
from gptlab.decode_step import use_compiled_decoding
from gptlab.generate import generate, prepare_for_decoding

from .conftest import run_cli, tiny_config


def pair(dtype=torch.float32, seed=0, **overrides) -> tuple[GPTModel, GPTModel]:
    torch.manual_seed(seed)
    eager = GPTModel(tiny_config(**overrides)).to(dtype).eval()
    compiled = GPTModel(tiny_config(**overrides)).to(dtype).eval()
    compiled.load_state_dict(eager.state_dict())
    if not use_compiled_decoding(compiled):
        pytest.skip("torch.compile does not work on this machine")
    return eager, compiled


def count_steps(model: GPTModel) -> list[int]:
    """Count the calls that reach the compiled graph."""
    calls = []
    fn = model.compiled_decoder.fn

    def counted(*args):
        calls.append(1)
        return fn(*args)

    model.compiled_decoder.fn = counted
    return calls


def test_compiled_steps_match_eager_logits_and_cache():
    eager, compiled = pair()
    assert compiled.out_head.weight is compiled.tok_emb.weight  # still tied
    calls = count_steps(compiled)
    prompt = torch.tensor([[5, 17, 300, 2, 9]])
    cache_e, cache_c = eager.make_kv_cache(1, 12), compiled.make_kv_cache(1, 12)
    with torch.inference_mode():
        for ids in (prompt, torch.tensor([[42]]), torch.tensor([[7]]), torch.tensor([[50256]])):
            a = eager(ids, kv_cache=cache_e, last_only=True)
            b = compiled(ids, kv_cache=cache_c, last_only=True)
            assert b.shape == a.shape == (1, 1, 50257) and b.dtype == a.dtype
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert len(calls) == 3  # the prompt went through the eager forward, each single token through the graph
    assert cache_c.length == cache_e.length == 8
    torch.testing.assert_close(cache_c.k, cache_e.k, atol=1e-5, rtol=1e-4)  # only the 8 filled slots are non-zero
    torch.testing.assert_close(cache_c.v, cache_e.v, atol=1e-5, rtol=1e-4)


def test_compiled_generate_equals_eager_across_the_window():
    eager, compiled = pair(seed=4)
    calls = count_steps(compiled)
    prompt = torch.tensor([[5, 17, 300, 2, 9]])
    assert torch.equal(generate(compiled, prompt, 60), generate(eager, prompt, 60))  # re-prefills at 32 tokens
    assert len(calls) > 40  # one graph served every cache length (no per-length eager fallback)
    gen = torch.Generator().manual_seed(1)
    sampled = generate(compiled, prompt, 20, temperature=1.0, top_k=50, generator=gen)
    gen.manual_seed(1)
    assert torch.equal(sampled, generate(eager, prompt, 20, temperature=1.0, top_k=50, generator=gen))


def test_compiled_bfloat16_decoding_is_close():
    eager, compiled = pair(torch.bfloat16, seed=1)
    reference = GPTModel(tiny_config()).eval()
    reference.load_state_dict(eager.state_dict())  # the same bf16 values, computed in float32
    ids = torch.tensor([[3, 99, 1000]])
    with torch.inference_mode():
        want = reference(ids, last_only=True)
        cache = compiled.make_kv_cache(1)
        compiled(ids[:, :2], kv_cache=cache)
        got = compiled(ids[:, 2:], kv_cache=cache)
    assert got.dtype == torch.bfloat16
    # activations stay float32 in the graph: as close to float32 as the cached bf16 keys allow
    torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.02)


def test_padded_vocabulary_and_no_qkv_bias():
    eager, compiled = pair(seed=5, vocab_multiple=64, qkv_bias=False)
    assert compiled.config.padded_vocab_size > compiled.config.vocab_size
    cache_e, cache_c = eager.make_kv_cache(1), compiled.make_kv_cache(1)
    with torch.inference_mode():
        for ids in (torch.tensor([[1, 2]]), torch.tensor([[3]])):
            a, b = eager(ids, kv_cache=cache_e, last_only=True), compiled(ids, kv_cache=cache_c, last_only=True)
    assert b.shape == (1, 1, 50257)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_training_batches_and_grad_keep_the_eager_path():
    eager, compiled = pair(seed=2)
    calls = count_steps(compiled)
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    eager.train(), compiled.train()
    loss_e, loss_c = eager.loss(ids, ids), compiled.loss(ids, ids)
    loss_e.backward(), loss_c.backward()
    assert torch.equal(loss_e, loss_c)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    eager.eval(), compiled.eval()
    with torch.inference_mode():
        assert torch.equal(eager(ids), compiled(ids))
        cache_e, cache_c = eager.make_kv_cache(2), compiled.make_kv_cache(2)
        eager(ids, kv_cache=cache_e), compiled(ids, kv_cache=cache_c)
        assert torch.equal(eager(ids[:, :1], kv_cache=cache_e), compiled(ids[:, :1], kv_cache=cache_c))  # 2 rows
    cache = compiled.make_kv_cache(1)
    compiled(ids[:1, :3], kv_cache=cache)
    out = compiled(ids[:1, 3:4], kv_cache=cache)  # gradients on: the eager path, so backward works
    assert out.requires_grad
    assert calls == []


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        def fail(*a):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(decode_module.torch, "compile", broken)
    model = GPTModel(tiny_config()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_for_decoding(model, compile=True) is model
    assert any("no C++ compiler" in str(w.message) for w in caught)
    assert model.compiled_decoder is None and not model.training
    assert model.trf_blocks[0].att.qkv.weight.stride() == (1, 96)  # the eager layout instead
    assert generate(model, [1, 2, 3], 4).shape == (1, 7)


def test_cli_compile_gives_the_same_greedy_tokens(tmp_path):
    torch.manual_seed(3)
    save_model(GPTModel(tiny_config()), tmp_path / "m")
    args = ("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12",
            "--temperature", "0", "--json", "--device", "cpu")
    plain, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr
    tokens = [json.loads(p.stdout)["completions"][0]["token_ids"] for p in (plain, compiled)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12
    batch = run_cli(*args, "--compile", "--num-samples", "2")  # batches decode eagerly: no compile for nothing
    assert batch.returncode == 0 and "--compile speeds up one sample" in batch.stderr
    assert len(json.loads(batch.stdout)["completions"]) == 2


def test_each_model_keeps_its_own_graph_and_dtype_changes_go_eager():
    """Guards on the model are skipped (CompiledDecoder): graphs must never be shared between models."""
    eager2, compiled2 = pair(seed=6)
    eager3 = GPTModel(tiny_config(qkv_bias=False, vocab_multiple=64)).eval()  # same cache shapes, other weights
    compiled3 = GPTModel(eager3.config).eval()
    compiled3.load_state_dict(eager3.state_dict())
    assert use_compiled_decoding(compiled3)  # compiling works here (pair did): this one must too
    caches = {id(m): m.make_kv_cache(1) for m in (eager2, compiled2, eager3, compiled3)}
    with torch.inference_mode():
        for ids in (torch.tensor([[1, 2]]), torch.tensor([[3]]), torch.tensor([[4]])):
            for eager, compiled in ((eager2, compiled2), (eager3, compiled3)):  # alternate models
                a = eager(ids, kv_cache=caches[id(eager)])
                b = compiled(ids, kv_cache=caches[id(compiled)])
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        calls = count_steps(compiled2)
        eager2.to(torch.bfloat16), compiled2.to(torch.bfloat16)
        cache_e, cache_c = eager2.make_kv_cache(1), compiled2.make_kv_cache(1)
        eager2(torch.tensor([[1, 2]]), kv_cache=cache_e), compiled2(torch.tensor([[1, 2]]), kv_cache=cache_c)
        a = eager2(torch.tensor([[3]]), kv_cache=cache_e)
        b = compiled2(torch.tensor([[3]]), kv_cache=cache_c)
    assert calls == [] and torch.equal(a, b)  # bfloat16 now: the float32 graph stays out of it
