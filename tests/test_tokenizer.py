import pytest
import torch

from gptlab import decode, encode, text_to_token_ids, token_ids_to_text
from gptlab.tokenizer import gpt2 as tokmod


def test_reference_ids():
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
    assert encode(text) == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert tokmod.gpt2_encoding().n_vocab == 50257


@pytest.mark.parametrize(
    "text",
    ["naïve café — ünïcödé ✓ 日本語のテキスト 🙂🚀", "  leading and trailing spaces\n\n\ttabs ", "someunknownPlace 12345"],
)
def test_round_trip(text):
    ids = text_to_token_ids(text)
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    assert token_ids_to_text(ids) == text
    assert decode(encode(text)) == text


def test_corrupted_vocab_file_is_detected(tmp_path, monkeypatch):
    enc, bpe = tokmod._data_files()
    bad = tmp_path / "encoder.json"
    bad.write_bytes(enc.read_bytes()[:-10] + b"}")
    monkeypatch.setattr(tokmod, "_data_files", lambda: (bad, bpe))
    tokmod.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(tokmod.GptlabError, match="sha256"):
            tokmod.gpt2_encoding()
    finally:
        tokmod.gpt2_encoding.cache_clear()


def test_no_network_access(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    tokmod.gpt2_encoding.cache_clear()
    assert encode("offline") == tokmod.gpt2_encoding().encode("offline")
