"""Request validation: defaults, prompt forms and the context limit (the HTTP matrix is in test_errors)."""

from __future__ import annotations

import pytest

from gptlab.finetune.templates import ALPACA
from gptlab.serve.chat import ChatFormat, TemplateChat
from gptlab.serve.protocol import ApiError, Limits, parse_body, parse_chat, parse_completion, parse_explain
from gptlab.tokenizer import EOT_ID, encode, get_tokenizer

LIMITS = Limits(context_length=64, vocab_size=50257, max_batch=8)
GPT2 = get_tokenizer()


def completion(**body):
    return parse_completion(body, LIMITS, "m", GPT2)


def test_defaults_follow_openai():
    req = completion(prompt="Hello")
    s = req.sampling
    assert (s.temperature, s.top_k, s.top_p, s.n, s.stop, s.seed, s.logprobs) == (1.0, None, None, 1, [], None, None)
    assert req.max_tokens == [16] and not req.stream and not req.echo


def test_prompt_forms():
    assert completion(prompt="").prompts == [[EOT_ID]]  # as `gptlab generate --prompt ""`
    assert completion(prompt=["a b", "c"]).prompts == [encode("a b"), encode("c")]
    assert completion(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompts == [[1, 2], [3]]


def test_max_tokens_and_the_context():
    ids = list(range(60))
    assert completion(prompt=ids).max_tokens == [4]  # the default 16, cut to what the context has left
    assert completion(prompt=ids, max_tokens=4).max_tokens == [4]
    with pytest.raises(ApiError) as caught:
        completion(prompt=ids, max_tokens=5)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "max_tokens"
    assert "64 tokens, however you requested 65 tokens (60 in your prompt; 5 for the completion)" in str(caught.value)
    with pytest.raises(ApiError) as caught:
        completion(prompt=list(range(64)))  # prompts are never cut: no room left is an error
    assert caught.value.param == "prompt"


def test_n_times_prompts_must_fit_the_batch():
    with pytest.raises(ApiError, match="more than this server's --max-batch 8"):
        completion(prompt=["a", "b", "c"], n=3)


def test_chat_defaults_to_the_rest_of_the_context_and_adds_the_transcript_stop():
    req, ids = parse_chat({"messages": [{"role": "user", "content": "Hi"}], "stop": "END"}, LIMITS, "m",
                          ChatFormat(), GPT2)
    assert ids == encode("user: Hi\nassistant:")
    assert req.sampling.max_tokens == 64 - len(ids)
    assert req.sampling.stop == ["END", "\nuser:"]
    req, _ = parse_chat({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3}, LIMITS, "m",
                        ChatFormat(), GPT2)
    assert req.sampling.max_tokens == 3


def test_chat_prompts_are_encoded_as_gptlab_generate_encodes_them():
    messages = [{"role": "user", "content": "a<|endoftext|>b"}]
    _, ids = parse_chat({"messages": messages}, LIMITS, "m", ChatFormat(), GPT2)
    assert EOT_ID in ids  # a transcript is a --prompt: the special token
    chat = TemplateChat(ALPACA)
    _, ids = parse_chat({"messages": messages}, LIMITS, "m", chat, GPT2)
    # a template's prompt is an --instruction, tokenized as in fine-tuning: the text stays text
    assert EOT_ID not in ids and ids == GPT2.encode_ordinary(chat.render(messages)[0])


def test_explain_request():
    req = parse_explain({"prompt": [1, 2], "temperature": 0, "candidates": 3}, LIMITS, "m", GPT2)
    assert (req.prompt, req.temperature, req.candidates) == ([1, 2], 0.0, 3)
    with pytest.raises(ApiError, match="does not exist"):
        parse_explain({"model": "other", "prompt": "x"}, LIMITS, "m", GPT2)


@pytest.mark.parametrize("raw", [b"", b"  ", b"nul", b"3", b'"text"'])
def test_body_must_be_a_json_object(raw):
    with pytest.raises(ApiError):
        parse_body(raw)
