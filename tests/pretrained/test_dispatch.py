"""load_pretrained on gptlab's own files, and what `--model` means on the command line."""

import json
import warnings

import pytest
import torch

from gptlab import GptlabError, GPTModel, UsageError, load_pretrained, save_model
from gptlab.pretrained.native import save_weights
from gptlab.pretrained.resolve import load_model_arg
from tests.helpers import SRC, run_cli, tiny_config


def _model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=300, **overrides)).eval()


def _same(a: GPTModel, b: GPTModel) -> None:
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "vocab_multiple": 64, "qkv_bias": False}])
def test_gptlab_folder_and_bare_weights_file(tmp_path, overrides):
    model = _model(**overrides)
    save_model(model, tmp_path / "run")
    loaded = load_pretrained(tmp_path / "run")
    assert loaded.config == model.config and not loaded.training
    assert (loaded.out_head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings
    _same(model, loaded)
    save_weights(model, tmp_path / "bare" / "weights.safetensors")  # config travels in the metadata
    _same(model, load_pretrained(tmp_path / "bare" / "weights.safetensors", dtype=torch.float32))


def test_gptlab_config_mismatch_and_unknown_paths(tmp_path):
    save_model(_model(), tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["emb_dim"] = 64
    cfg["n_heads"] = 4
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptlabError) as err:
        load_pretrained(tmp_path / "run")
    assert "tok_emb.weight" in str(err.value) and "(300, 32)" in str(err.value) and "(300, 64)" in str(err.value)
    with pytest.raises(UsageError, match="no model at"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no model"):
        load_pretrained(tmp_path / "empty")


def test_model_arg_random_choices(tmp_path):
    with pytest.warns(UserWarning, match="random weights"):
        nano = load_model_arg("gpt-nano")  # small presets stay random, with a warning
    assert nano.config.emb_dim == 128
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model_arg(f"random:{cfg}")  # explicit: no warning
    assert model.config == tiny_config() and caught == []


def test_no_tensorflow_anywhere_in_gptlab():
    from pathlib import Path

    src = Path(SRC)
    offenders = [p for p in src.rglob("*.py") if "import tensorflow" in p.read_text() or "from tensorflow" in p.read_text()]
    assert offenders == []


def test_damaged_or_lonely_files_give_clear_errors(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"junk")
    with pytest.raises(GptlabError, match="cannot read .*model.pth as a PyTorch checkpoint"):
        load_pretrained(tmp_path / "model.pth")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(UsageError, match="config.json"):
        load_pretrained(tmp_path / "lonely" / "pytorch_model.bin")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(GptlabError, match="not a readable safetensors"):
        load_pretrained(tmp_path / "w.safetensors")


def test_model_means_the_same_in_every_verb():
    """One --model help text everywhere, naming GPT-2 names as trained weights and presets as random."""
    helps = {}
    for verb in ("generate", "eval", "sampling-plot", "info"):
        proc = run_cli(verb, "--help")
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())
        helps[verb] = text[text.rindex("--model MODEL") + len("--model MODEL"):].split(" --")[0].strip()
    assert len(set(helps.values())) == 1, helps
    assert "trained weights" in helps["info"] and "random weights" in helps["info"]


def test_info_takes_whatever_load_pretrained_takes(tmp_path):
    from tests.helpers import FIXTURES

    openai = run_cli("info", "--model", str(FIXTURES / "openai_tiny"), "--json")
    assert openai.returncode == 0, openai.stderr
    assert json.loads(openai.stdout)["config"]["vocab_size"] == 97
    save_model(GPTModel(tiny_config()), tmp_path / "m")
    text = run_cli("info", "--model", str(tmp_path / "m"))
    assert text.returncode == 0 and "saved weights" in text.stdout and "n_layers: 2" in text.stdout
    preset = run_cli("info", "--model", "gpt2-small")
    assert "OpenAI's trained weights" in preset.stdout and "124,439,808" in preset.stdout
