"""Hugging Face GPT-2 folders: import equals transformers, export loads back in transformers."""

import json

import pytest
import torch

from gptlab import GptlabError, UsageError, load_pretrained, save_model
from gptlab.pretrained.hf import save_hf
from tests.gpt2_refs import assert_same_model, random_hf_model, transformers
from tests.helpers import assert_clean_error, run_cli

SHAPES = [
    dict(vocab_size=101, n_positions=24, n_embd=32, n_layer=3, n_head=4),
    dict(vocab_size=67, n_positions=20, n_embd=48, n_layer=2, n_head=6),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_folder_matches_transformers(tmp_path, shape):
    hf = random_hf_model(1, **shape)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    assert model.config.emb_dim == shape["n_embd"] and model.config.n_heads == shape["n_head"]
    assert not model.training and model.out_head.weight is model.tok_emb.weight
    assert_same_model(model, hf, shape["vocab_size"])


def test_pytorch_model_bin_and_bare_gpt2model_names(tmp_path):
    hf = random_hf_model(2, **SHAPES[1])
    folder = tmp_path / "bin"
    folder.mkdir()
    hf.config.to_json_file(folder / "config.json")
    # GPT2Model's names (no "transformer." prefix), as in the original gpt2 repository, in a .bin
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    assert_same_model(load_pretrained(folder), hf, SHAPES[1]["vocab_size"])


def test_sharded_safetensors(tmp_path):
    hf = random_hf_model(8, **SHAPES[0])
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_model(load_pretrained(tmp_path / "hf"), hf, SHAPES[0]["vocab_size"])


def test_export_round_trip_gptlab_hf_transformers(tmp_path):
    hf = random_hf_model(3, **SHAPES[0])
    hf.save_pretrained(tmp_path / "src")
    model = load_pretrained(tmp_path / "src")
    save_model(model, tmp_path / "gptlab")  # gptlab's own format ...
    again = load_pretrained(tmp_path / "gptlab")
    save_hf(again, tmp_path / "out")  # ... then back to Hugging Face
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert_same_model(again, reloaded, SHAPES[0]["vocab_size"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # tied: stored once


def test_export_untied_padded_no_qkv_bias(tmp_path, tiny):
    from gptlab import GPTModel

    torch.manual_seed(0)
    model = GPTModel(tiny.replace(vocab_size=90, tie_embeddings=False, vocab_multiple=64, qkv_bias=False)).eval()
    with pytest.warns(UserWarning, match="no tokenizer files"):  # not GPT-2's vocabulary
        save_hf(model, tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reloaded(ids).logits, atol=1e-5, rtol=0)


EXPORT_TEXTS = [
    "The lighthouse keeper watched the storm roll in from the sea.",
    "   spaces  at\tthe start,\t\ttabs, and  double  spaces   \n\n\r\n trailing   ",
    "Café naïve coöperate — Ærøskøbing, São Paulo, Zürich.",
    "今天天气很好，我们去公园散步。你好世界",
    "First document.<|endoftext|>Second document<|endoftext|>",
]


def test_hf_export_works_offline_in_transformers(tmp_path, tiny, monkeypatch):
    """AutoTokenizer gives exactly gptlab's ids, and pipeline("text-generation") gptlab's greedy text."""
    from gptlab import GPTModel, encode, generate, text_to_token_ids, token_ids_to_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(7)
    model = GPTModel(tiny).eval()
    save_hf(model, tmp_path / "hf")
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == sorted(["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in EXPORT_TEXTS:
        assert tok(text)["input_ids"] == encode(text), text
        assert tok.decode(encode(text)) == text
    assert tok.eos_token_id == 50256 and tok.bos_token_id == 50256
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    prompt = "The lighthouse keeper"
    theirs = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ours = token_ids_to_text(generate(model, text_to_token_ids(prompt), 12, eos_id=50256))
    assert theirs == ours


def test_cli_convert_to_hf(tmp_path):
    hf = random_hf_model(4, **SHAPES[1])
    hf.save_pretrained(tmp_path / "hf")
    save_model(load_pretrained(tmp_path / "hf"), tmp_path / "g")
    proc = run_cli("convert", str(tmp_path / "g"), "--to", "hf", str(tmp_path / "h2"))
    assert proc.returncode == 0, proc.stderr
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "h2").eval()
    assert_same_model(load_pretrained(tmp_path / "g"), reloaded, SHAPES[1]["vocab_size"])
    with pytest.raises(UsageError, match="no model"):
        load_pretrained(tmp_path / "nothing")


def test_rejects_other_architectures_and_variants(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="not GPT-2"):
        load_pretrained(folder)
    hf = random_hf_model(5, **SHAPES[0])
    hf.save_pretrained(tmp_path / "relu")
    cfg = json.loads((tmp_path / "relu" / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "relu" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="activation_function"):
        load_pretrained(tmp_path / "relu")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    hf = random_hf_model(6, **SHAPES[0])
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_positions"] = 30  # the config no longer describes the weights
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptlabError) as err:
        load_pretrained(tmp_path / "hf")
    msg = str(err.value)
    assert "wpe.weight" in msg and "(24, 32)" in msg and "(30, 32)" in msg and "context length" in msg
    proc = run_cli("convert", str(tmp_path / "hf"), "--to", "gptlab", str(tmp_path / "g"))
    assert_clean_error(proc, 1, "wpe.weight", "(24, 32)", "(30, 32)")
    assert not (tmp_path / "g").exists()
