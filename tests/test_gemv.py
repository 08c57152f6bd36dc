"""prepare_for_decoding(compile=True): compiled batch-1 matrix-vector products (gptlab.gemv)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gptlab import GPTModel
from gptlab import gemv as gemv_module
from gptlab.checkpoint import save_model
from gptlab.gemv import DecodeLinear, use_compiled_gemv
from gptlab.generate import generate, prepare_for_decoding

from .conftest import run_cli, tiny_config


def pair(dtype=torch.float32, seed=0) -> tuple[GPTModel, GPTModel]:
    torch.manual_seed(seed)
    eager = GPTModel(tiny_config()).to(dtype).eval()
    compiled = GPTModel(tiny_config()).to(dtype).eval()
    compiled.load_state_dict(eager.state_dict())
    if not use_compiled_gemv(compiled):
        pytest.skip("torch.compile does not work on this machine")
    return eager, compiled


def test_compiled_decoding_matches_eager():
    eager, compiled = pair()
    assert all(type(m) is DecodeLinear for m in compiled.modules() if isinstance(m, torch.nn.Linear))
    assert compiled.out_head.weight is compiled.tok_emb.weight  # still tied
    prompt = torch.tensor([[5, 17, 300, 2, 9]])
    cache_e, cache_c = eager.make_kv_cache(1), compiled.make_kv_cache(1)
    with torch.inference_mode():
        for ids in (prompt, torch.tensor([[42]]), torch.tensor([[7]])):  # prefill, then single-token steps
            a = eager(ids, kv_cache=cache_e, last_only=True)
            b = compiled(ids, kv_cache=cache_c, last_only=True)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert torch.equal(generate(compiled, prompt, 40), generate(eager, prompt, 40))  # crosses the 32-token window


def test_compiled_bfloat16_decoding_is_close():
    eager, compiled = pair(torch.bfloat16, seed=1)
    ids = torch.tensor([[3]])
    with torch.inference_mode():
        a, b = eager(ids).float(), compiled(ids).float()
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.05, rtol=0.05), (a - b).abs().max()


def test_training_and_batches_keep_the_eager_path():
    eager, compiled = pair(seed=2)
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    eager.train(), compiled.train()
    loss_e, loss_c = eager.loss(ids, ids), compiled.loss(ids, ids)
    loss_e.backward(), loss_c.backward()
    assert torch.equal(loss_e, loss_c)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    with torch.inference_mode():
        assert torch.equal(eager.eval()(ids), compiled.eval()(ids))  # several rows: F.linear as before


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken():
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(gemv_module, "compiled_gemv", broken)
    model = GPTModel(tiny_config()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_for_decoding(model, compile=True) is model
    assert any("no C++ compiler" in str(w.message) for w in caught)
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())
    assert model.trf_blocks[0].att.qkv.weight.stride() == (1, 96)  # the eager layout instead


def test_cli_compile_gives_the_same_greedy_tokens(tmp_path):
    torch.manual_seed(3)
    save_model(GPTModel(tiny_config()), tmp_path / "m")
    args = ("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12",
            "--temperature", "0", "--json", "--device", "cpu")
    plain, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr
    tokens = [json.loads(p.stdout)["completions"][0]["token_ids"] for p in (plain, compiled)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12
