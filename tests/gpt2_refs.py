"""Reference models from transformers for the pretrained-weights tests (test-only dependency)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

transformers = __import__("pytest").importorskip("transformers")


def random_hf_model(seed: int, **shape) -> transformers.GPT2LMHeadModel:
    """A tiny GPT2LMHeadModel with non-trivial weights everywhere (LayerNorm gains/biases, all biases)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0, **shape)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return model


def hf_from_openai_values(values: dict[str, np.ndarray], hparams: dict) -> transformers.GPT2LMHeadModel:
    """The same weights as an OpenAI checkpoint, placed into transformers' GPT-2 by hand."""
    config = transformers.GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"],
                                     n_embd=hparams["n_embd"], n_head=hparams["n_head"],
                                     n_layer=hparams["n_layer"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    state = {"transformer.wte.weight": values["model/wte"], "transformer.wpe.weight": values["model/wpe"],
             "transformer.ln_f.weight": values["model/ln_f/g"], "transformer.ln_f.bias": values["model/ln_f/b"]}
    for i in range(hparams["n_layer"]):
        for module in ("ln_1", "ln_2"):
            state[f"transformer.h.{i}.{module}.weight"] = values[f"model/h{i}/{module}/g"]
            state[f"transformer.h.{i}.{module}.bias"] = values[f"model/h{i}/{module}/b"]
        for module in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            name = module.replace("/", ".")
            state[f"transformer.h.{i}.{name}.weight"] = values[f"model/h{i}/{module}/w"][0]  # HF Conv1D: (in, out)
            state[f"transformer.h.{i}.{name}.bias"] = values[f"model/h{i}/{module}/b"]
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    return model


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def assert_same_model(ours, hf_model, vocab: int, seq: int = 10, new_tokens: int = 8) -> None:
    """Equal logits (1e-5), equal loss, identical greedy generation."""
    from gptlab.generation.generate import generate

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, seq), generator=g)
    with torch.no_grad():
        theirs = hf_model(ids, labels=ids)
        mine = ours(ids)
    torch.testing.assert_close(mine, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_of(mine, ids), theirs.loss, atol=1e-5, rtol=0)
    prompt = ids[:1, :4]
    out_ours = generate(ours, prompt, max_new_tokens=new_tokens, temperature=0.0)
    out_hf = hf_model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert out_ours.tolist() == out_hf.tolist()
