"""The official OpenAI client against a real `gptlab serve`: completions and chat, whole and streamed."""

from __future__ import annotations

import json
import math
import re
import time

import httpx
import pytest
import torch

from gptlab.generation.generate import generate
from gptlab.pretrained import load_pretrained
from gptlab.tokenizer import EOT_ID, decode, encode
from tests.helpers import run_cli

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def model(model_dir):
    return load_pretrained(model_dir)


def expected_ids(model, prompt: str, n: int, **options) -> list[int]:
    """What gptlab's own `generate` draws (the server's reference), new ids only, stopping at end-of-text."""
    ids = encode(prompt)
    out = generate(model, torch.tensor([ids]), n, eos_id=EOT_ID, **options)
    return out[0, len(ids):].tolist()


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.name] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["context_length"] == 512 and card["vocab_size"] == 50257


def test_greedy_completion_equals_generate_cli_token_for_token(client, model_dir):
    cli = run_cli("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", "24", "--temperature",
                  "0", "--json")
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)["completions"][0]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                    extra_body={"return_token_ids": True})
    choice = got.choices[0]
    assert choice.token_ids == want["token_ids"]
    assert choice.text == want["text"]
    assert choice.finish_reason == ("stop" if want["token_ids"][-1] == EOT_ID else "length")
    assert got.usage.prompt_tokens == len(encode(PROMPT))
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # streamed: the same text, piece by piece, then the usage chunk
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["token_ids"])


def test_seeded_sampling_repeats_and_choice_i_uses_seed_plus_i(client, model):
    kwargs = dict(model="tiny", prompt="Hello", max_tokens=16, temperature=0.9, top_k=50, top_p=0.95, n=3, seed=7)
    a = client.completions.create(**{k: v for k, v in kwargs.items() if k not in ("top_k",)},
                                  extra_body={"top_k": 50, "return_token_ids": True})
    b = client.completions.create(**{k: v for k, v in kwargs.items() if k not in ("top_k",)},
                                  extra_body={"top_k": 50, "return_token_ids": True})
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    for c in a.choices:
        assert c.token_ids == expected_ids(model, "Hello", 16, temperature=0.9, top_k=50, top_p=0.95, seed=7 + c.index)
    assert len({tuple(c.token_ids) for c in a.choices}) == 3  # different seeds, different draws


def test_several_prompts_and_token_id_prompts(client, model):
    got = client.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=5, temperature=0, n=2,
                                    extra_body={"return_token_ids": True})
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.choices[0].token_ids == got.choices[1].token_ids == expected_ids(model, "One", 5, temperature=0)
    assert got.choices[2].token_ids == expected_ids(model, "Two", 5, temperature=0)
    ids = encode(PROMPT)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stop_strings_end_the_text_before_them(client, model):
    ids = expected_ids(model, PROMPT, 30, temperature=0)
    text = decode(ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and len(text) > 10
    cut = text[: text.find(stop)]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < len(ids)  # generation stopped there, not at max_tokens
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_and_echo(client, model):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True)
    lp = got.choices[0].logprobs
    n_prompt = len(encode(PROMPT))
    assert got.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert "".join(lp.tokens[:n_prompt]) == PROMPT
    assert lp.text_offset[n_prompt] == len(PROMPT)
    # greedy: each drawn token is the most likely one, and its logprob is the model's log-softmax
    ids = encode(PROMPT) + expected_ids(model, PROMPT, 4, temperature=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], float(logp[i - 1, ids[i]]), abs_tol=1e-3)
        assert len(lp.top_logprobs[i]) == 3 and all(v <= 0 for v in lp.top_logprobs[i].values())
    for i in range(n_prompt, len(ids)):
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i])


def test_chat_completion_plain_and_streamed(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    transcript = "system: Be brief.\nuser: Hello there\nassistant:"
    assert got.usage.prompt_tokens == len(encode(transcript))
    same = client.completions.create(model="tiny", prompt=transcript, max_tokens=12, temperature=0, stop="\nuser:")
    message = got.choices[0].message
    assert message.role == "assistant" and message.content == same.choices[0].text
    assert got.choices[0].finish_reason == same.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert chunks[0].id == chunks[-1].id and chunks[0].object == "chat.completion.chunk"


def test_chat_logprobs_and_seed(client):
    messages = [{"role": "user", "content": "Tell me"}]
    a = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=3, logprobs=True,
                                       top_logprobs=2)
    b = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    content = a.choices[0].logprobs.content
    assert len(content) == a.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_explain_stream_and_route_agree(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0.7, "top_k": 40, "top_p": None,
            "seed": 1, "stream": True, "explain": 10, "return_prompt_ids": True}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["prompt_token_ids"] == encode(PROMPT) and "prompt_token_ids" not in chunks[1]
    drawn = []
    for step, chunk in enumerate(chunks):
        ex = chunk["choices"][0]["explain"]
        assert ex["step"] == step and len(ex["candidates"]) == 10 and ex["top_k"] == 40 and not ex["greedy"]
        for column in ("p_base", "p_temp", "p_final"):
            total = sum(c[column] for c in ex["candidates"]) + ex["others"][column]
            assert total == pytest.approx(1.0, abs=1e-4)
        assert [c["p_base"] for c in ex["candidates"]] == sorted((c["p_base"] for c in ex["candidates"]), reverse=True)
        assert all(c["kept"] == (c["p_final"] > 0) for c in ex["candidates"])
        drawn.append(ex["token"]["id"])
    # /v1/explain on step 2's context gives the distribution the stream reported for it
    again = httpx.post(server.url + "/v1/explain", json={"model": "tiny", "prompt": encode(PROMPT) + drawn[:2],
                                                         "temperature": 0.7, "top_k": 40, "candidates": 10}).json()
    reported = chunks[2]["choices"][0]["explain"]
    assert [c["id"] for c in again["candidates"]] == [c["id"] for c in reported["candidates"]]
    assert [c["p_final"] for c in again["candidates"]] == pytest.approx([c["p_final"] for c in reported["candidates"]],
                                                                         abs=1e-4)


def test_playground_files_are_served(server):
    for path, kind in (("/", "text/html"), ("/playground.css", "text/css"), ("/playground.js", "text/javascript")):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
    assert "img-src 'self' data:" in httpx.get(server.url + "/").headers["content-security-policy"]


def test_every_request_is_logged_on_one_line(server, client):
    client.completions.create(model="tiny", prompt="Log me please", max_tokens=3, temperature=0)
    pattern = re.compile(r"^\d\d:\d\d:\d\d POST /v1/completions 200 3\+3 tokens \d+\.\d{3}s$", re.M)
    deadline = time.monotonic() + 10  # the line is written once the handler has returned
    while not pattern.search(server.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pattern.search(server.log), server.log[-2000:]
    assert re.search(r"^\d\d:\d\d:\d\d GET /v1/models 200 \d+\.\d{3}s$", server.log, re.M)
