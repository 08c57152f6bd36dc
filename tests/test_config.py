import json

import pytest

from gptlab import GPTConfig, UsageError, get_preset
from gptlab.config import PRESETS


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(emb_dim=100, n_heads=12), "divisible"),
        (dict(n_layers=0), "positive"),
        (dict(vocab_size=-5), "positive"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(drop_rate=-0.1), "drop_rate"),
        (dict(emb_dim=7.5), "integer"),
        (dict(qkv_bias="yes"), "true or false"),
    ],
)
def test_invalid_config_is_rejected(overrides, message):
    with pytest.raises(UsageError, match=message):
        GPTConfig(**overrides)


def test_presets_match_gpt2_hyperparameters():
    expected = {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
                "gpt2-xl": (1600, 48, 25)}
    for name, (emb, layers, heads) in expected.items():
        cfg = PRESETS[name]
        assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb, layers, heads)
        assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias, cfg.tie_embeddings) == (50257, 1024, True, True)


def test_preset_override_and_alias():
    cfg = get_preset("124M", context_length=256, drop_rate=0.0)
    assert cfg.emb_dim == 768 and cfg.context_length == 256 and cfg.drop_rate == 0.0
    assert PRESETS["gpt2-small"].context_length == 1024  # presets are not mutated
    with pytest.raises(UsageError, match="unknown model preset"):
        get_preset("gpt5")
    with pytest.raises(UsageError, match="unknown GPTConfig field"):
        get_preset("gpt2-small", n_embd=3)


def test_json_round_trip(tmp_path):
    cfg = get_preset("gpt-nano", n_layers=3)
    cfg.save(tmp_path / "c.json")
    assert GPTConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        GPTConfig.load(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text(json.dumps({**cfg.to_dict(), "n_embd": 5}))
    with pytest.raises(UsageError, match="n_embd"):
        GPTConfig.load(tmp_path / "extra.json")
