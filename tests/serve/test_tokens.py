"""Token display, logprobs, the explain numbers and stop strings."""

from __future__ import annotations

import re

import pytest
import torch

from gptlab.generation.sampling import next_token_probs
from gptlab.serve.tokens import StopText, display, explain, logprob_token, logprobs_at, token_info
from gptlab.tokenizer import EOT_ID, encode, get_tokenizer

GPT2 = get_tokenizer()


def split_character_tokens() -> list[int]:
    """GPT-2's ids for 你 (E4 BD A0), which its BPE splits into a two-byte and a one-byte token."""
    ids = encode("你")
    assert len(ids) == 2
    return ids


def test_partial_utf8_tokens_show_as_uppercase_hex_bytes():
    first, second = split_character_tokens()
    assert display(first, GPT2) == "<E4 BD>" and display(second, GPT2) == "<A0>"
    assert re.fullmatch(r"<[0-9A-F]{2}( [0-9A-F]{2})*>", display(first, GPT2))
    info = token_info(first, GPT2)
    assert info["partial"] and info["bytes"] == "E4 BD" and info["text"] == "\ufffd"
    assert logprob_token(first, GPT2) == "bytes:\\xe4\\xbd"


def test_whole_tokens_keep_their_spaces_and_escape_invisible_characters():
    (hello,) = encode(" hello")
    assert display(hello, GPT2) == " hello" and token_info(hello, GPT2) == {
        "id": hello, "text": " hello", "display": " hello", "bytes": "20 68 65 6C 6C 6F", "partial": False}
    assert [display(t, GPT2) for t in encode("\n")] == ["\\n"]
    assert display(encode("\t")[0], GPT2) == "\\t"
    assert display(EOT_ID, GPT2) == "<|endoftext|>"
    assert token_info(EOT_ID, GPT2) == {"id": EOT_ID, "text": "", "display": "<|endoftext|>", "bytes": "",
                                        "partial": False}
    assert display(60_000, GPT2) == "<unknown id 60000>"  # a model with a bigger vocabulary than GPT-2's


def test_explain_uses_the_sampling_distributions():
    torch.manual_seed(0)
    logits = torch.randn(GPT2.n_vocab) * 3
    ex = explain(logits, 0.7, 5, 0.9, candidates=8, tokenizer=GPT2)
    ids = [c["id"] for c in ex["candidates"]]
    assert ids == torch.topk(logits, 8).indices.tolist()
    final = next_token_probs(logits[None], 0.7, 5, 0.9)[0]
    assert [c["p_final"] for c in ex["candidates"]] == pytest.approx(final[ids].tolist())
    assert sum(c["kept"] for c in ex["candidates"]) == int((final > 0).sum()) <= 5
    for column in ("p_base", "p_temp", "p_final"):
        assert sum(c[column] for c in ex["candidates"]) + ex["others"][column] == pytest.approx(1.0, abs=1e-5)
    assert ex["others"]["p_final"] == 0.0 and not ex["greedy"]
    greedy = explain(logits, 0.0, None, None, candidates=3, tokenizer=GPT2)
    assert greedy["greedy"] and [c["p_final"] for c in greedy["candidates"]] == [1.0, 0.0, 0.0]


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = logprobs_at(logits, [1, 0], top=2)
    logp = torch.log_softmax(logits, -1)
    assert out[0].logprob == pytest.approx(float(logp[0, 1]))
    assert [t for t, _ in out[0].top] == [2, 1] and out[1].top[0][0] == 0


@pytest.mark.parametrize("pieces,stops,released,hit", [
    (["Hello", " wor", "ld"], ["world"], "Hello ", True),
    (["ab", "c", "d"], ["cx"], "abcd", False),  # "c" was held back, then released
    (["a\nus", "er: x"], ["\nuser:"], "a", True),
    (["xy"], [], "xy", False),
])
def test_stop_text_holds_back_what_could_become_a_stop(pieces, stops, released, hit):
    stop = StopText(stops)
    out, found = "", False
    for piece in pieces:
        text, found = stop.push(piece)
        out += text
        if found:
            break
    if not found:
        out += stop.flush()
    assert (out, found) == (released, hit)
