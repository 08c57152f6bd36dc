"""Bad requests by raw HTTP: each gets a 4xx with OpenAI's error object, and the server keeps serving."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.serve.conftest import ServerProcess

C, CHAT, EXPLAIN = "/v1/completions", "/v1/chat/completions", "/v1/explain"
USER = [{"role": "user", "content": "hi"}]


def body(**fields) -> bytes:
    return json.dumps({"model": "tiny", **fields}).encode()


# (method, path, raw body, status, param, words in the message)
CASES = [
    ("POST", C, b"{not json", 400, None, "not valid JSON"),
    ("POST", C, b"", 400, None, "empty"),
    ("POST", C, b"[1, 2]", 400, None, "JSON object"),
    ("POST", C, b"\xff\xfe{}", 400, None, "not valid JSON"),
    ("POST", C, b"[" * 100_000 + b"]" * 100_000, 400, None, "not valid JSON"),
    ("POST", C, b'{"prompt": "a", "x": "' + b"y" * 3_000_000 + b'"}', 413, None, "limit"),
    ("POST", C, body(), 400, "prompt", "prompt is required"),
    ("POST", C, body(prompt=42), 400, "prompt", "prompt must be"),
    ("POST", C, body(prompt=[]), 400, "prompt", "prompt must be"),
    ("POST", C, body(prompt=[1, "a"]), 400, "prompt", "not a mix"),
    ("POST", C, body(prompt=[50257]), 400, "prompt", "outside the vocabulary"),
    ("POST", C, body(prompt=[-1]), 400, "prompt", "outside the vocabulary"),
    ("POST", C, body(prompt=list(range(600))), 400, "prompt", "maximum context length is 512"),
    ("POST", C, body(prompt="hi", max_tokens=-1), 400, "max_tokens", ">= 0"),
    ("POST", C, body(prompt="hi", max_tokens=512), 400, "max_tokens", "maximum context length"),
    ("POST", C, body(prompt="hi", max_tokens="5"), 400, "max_tokens", "whole number"),
    ("POST", C, body(prompt="hi", temperature=-0.5), 400, "temperature", ">= 0"),
    ("POST", C, body(prompt="hi", temperature="hot"), 400, "temperature", "finite number"),
    ("POST", C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "finite number"),
    ("POST", C, body(prompt="hi", top_p=0), 400, "top_p", "(0, 1]"),
    ("POST", C, body(prompt="hi", top_p=1.5), 400, "top_p", "(0, 1]"),
    ("POST", C, body(prompt="hi", top_k=0), 400, "top_k", ">= 1"),
    ("POST", C, body(prompt="hi", n=0), 400, "n", "in 1..16"),
    ("POST", C, body(prompt="hi", n=17), 400, "n", "in 1..16"),
    ("POST", C, body(prompt="hi", seed=-1), 400, "seed", "seed"),
    ("POST", C, body(prompt="hi", stop=5), 400, "stop", "string"),
    ("POST", C, body(prompt="hi", stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ("POST", C, body(prompt="hi", logprobs=21), 400, "logprobs", "0..20"),
    ("POST", C, body(prompt="hi", stream="yes"), 400, "stream", "true or false"),
    ("POST", C, body(prompt="hi", presence_penalty=0.5), 400, "presence_penalty", "not supported"),
    ("POST", C, body(prompt="hi", best_of=3), 400, "best_of", "not supported"),
    ("POST", C, body(prompt="hi", explain=0), 400, "explain", "1..100"),
    ("POST", C, json.dumps({"model": "gpt-5", "prompt": "hi"}).encode(), 404, "model", "does not exist"),
    ("POST", CHAT, body(), 400, "messages", "messages is required"),
    ("POST", CHAT, body(messages="hi"), 400, "messages", "non-empty list"),
    ("POST", CHAT, body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role", "one of"),
    ("POST", CHAT, body(messages=[{"role": "user", "content": 3}]), 400, "messages[0].content", "string"),
    ("POST", CHAT, body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content", "text parts"),
    ("POST", CHAT, body(messages=USER, top_logprobs=2), 400, "top_logprobs", "logprobs: true"),
    ("POST", CHAT, body(messages=USER, tools=[{"type": "function"}]), 400, "tools", "not supported"),
    ("POST", CHAT, body(messages=USER, max_tokens=10_000), 400, "max_tokens", "maximum context length"),
    ("POST", EXPLAIN, body(prompt="hi", candidates=0), 400, "candidates", "1..100"),
    ("POST", EXPLAIN, body(prompt=list(range(513))), 400, "prompt", "context"),
    ("GET", "/v1/models/gpt-5", b"", 404, "model", "does not exist"),
    ("GET", "/nowhere", b"", 404, None, "no route"),
    ("GET", C, b"", 405, None, "not allowed"),
]


@pytest.mark.parametrize("method,path,raw,status,param,words", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, method, path, raw, status, param, words):
    r = httpx.request(method, server.url + path, content=raw or None, timeout=30)
    assert r.status_code == status, r.text[:300]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_context_errors_carry_openai_code(server):
    r = httpx.post(server.url + C, content=body(prompt="hi", max_tokens=600))
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(server.url + C, content=body(prompt="hi", max_tokens=3, temperature=0)).status_code == 200


def test_a_full_queue_is_answered_429(tmp_path, model_dir):
    """One slot, one waiting place: of four long requests at once, at least one is told to retry later."""
    srv = ServerProcess("--model", model_dir, "--max-batch", "1", "--max-queue", "1", cwd=tmp_path)
    try:
        codes, errors = [], []

        def ask() -> None:
            r = httpx.post(srv.url + C, content=body(prompt="hi", max_tokens=400, ignore_eos=True), timeout=60)
            codes.append(r.status_code)
            if r.status_code != 200:
                errors.append((r.json()["error"], r.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes, codes
        assert all(e["type"] == "rate_limit_error" and "--max-queue 1" in e["message"] and retry == "1"
                   for e, retry in errors)
        assert httpx.get(srv.url + "/health").json()["rejected"] == codes.count(429)
    finally:
        assert srv.stop() == 0, srv.log
