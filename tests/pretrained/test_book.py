"""State dicts saved by the book's GPTModel load into gptlab with the same function."""

import json

import pytest
import torch

from gptlab import GptlabError, GPTModel, UsageError, load_pretrained
from tests.helpers import tiny_config


def book_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """gptlab weights under the book's names and shapes (separate W_query/W_key/W_value, scale/shift)."""
    cfg, ours = model.config, model.state_dict()
    d = cfg.emb_dim
    state = {"tok_emb.weight": ours["tok_emb.weight"], "pos_emb.weight": ours["pos_emb.weight"],
             "final_norm.scale": ours["final_norm.weight"], "final_norm.shift": ours["final_norm.bias"],
             "out_head.weight": ours["out_head.weight"].clone()}
    for i in range(cfg.n_layers):
        b = f"trf_blocks.{i}."
        w = ours[f"{b}att.qkv.weight"]
        for j, part in enumerate(("query", "key", "value")):
            state[f"{b}att.W_{part}.weight"] = w[j * d : (j + 1) * d].clone()
            if cfg.qkv_bias:
                state[f"{b}att.W_{part}.bias"] = ours[f"{b}att.qkv.bias"][j * d : (j + 1) * d].clone()
        state[f"{b}att.out_proj.weight"] = ours[f"{b}att.out_proj.weight"]
        state[f"{b}att.out_proj.bias"] = ours[f"{b}att.out_proj.bias"]
        state[f"{b}att.mask"] = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
        for ours_name, book_name in (("ff.fc", "ff.layers.0"), ("ff.proj", "ff.layers.2")):
            state[f"{b}{book_name}.weight"] = ours[f"{b}{ours_name}.weight"]
            state[f"{b}{book_name}.bias"] = ours[f"{b}{ours_name}.bias"]
        for norm in ("norm1", "norm2"):
            state[f"{b}{norm}.scale"] = ours[f"{b}{norm}.weight"]
            state[f"{b}{norm}.shift"] = ours[f"{b}{norm}.bias"]
    return state


def randomised(config) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if p.dim() == 1 and p.shape[0] == config.emb_dim else 0.0))
    return model


def book_dict(config) -> dict:
    return {k: getattr(config, k) for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                             "drop_rate", "qkv_bias")}


def assert_same_logits(a: GPTModel, b: GPTModel) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, a.config.context_length))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-6, rtol=0)


def test_book_model_pth_with_config(tmp_path):
    config = tiny_config(vocab_size=211, emb_dim=48, n_heads=6, qkv_bias=False, tie_embeddings=False)
    original = randomised(config)
    torch.save(book_state(original), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(book_dict(config)))
    loaded = load_pretrained(tmp_path / "model.pth")
    assert loaded.config.n_heads == 6 and not loaded.config.qkv_bias and not loaded.config.tie_embeddings
    assert_same_logits(original, loaded)
    assert_same_logits(original, load_pretrained(tmp_path))  # the folder works too


def test_book_model_and_optimizer_gpt2_width_infers_heads(tmp_path):
    config = tiny_config(vocab_size=50, context_length=8, emb_dim=768, n_heads=12, n_layers=1, tie_embeddings=False)
    original = randomised(config)
    opt = torch.optim.AdamW(original.parameters())
    torch.save({"model_state_dict": book_state(original), "optimizer_state_dict": opt.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    loaded = load_pretrained(tmp_path / "model_and_optimizer.pth")
    assert loaded.config.n_heads == 12 and loaded.config.qkv_bias
    assert_same_logits(original, loaded)


def test_book_errors(tmp_path):
    config = tiny_config(vocab_size=64, emb_dim=40, n_heads=5, tie_embeddings=False)
    torch.save(book_state(randomised(config)), tmp_path / "model.pth")
    with pytest.raises(UsageError, match="n_heads"):  # width 40 is no GPT-2 width: heads unknown
        load_pretrained(tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps({**book_dict(config), "emb_dim": 80, "n_heads": 5}))
    with pytest.raises(GptlabError) as err:
        load_pretrained(tmp_path / "model.pth")
    assert "tok_emb.weight" in str(err.value) and "(64, 40)" in str(err.value) and "(64, 80)" in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({**book_dict(config), "n_layers": 3}))
    with pytest.raises(GptlabError, match="trf_blocks.2"):
        load_pretrained(tmp_path / "model.pth")
