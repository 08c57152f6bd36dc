"""Continuous batching over HTTP: concurrent streams, a client that goes away, and a drain on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serve.conftest import ServerProcess


def stream(url: str, body: dict) -> tuple[list[int], str, str]:
    """A streamed completion read to its end: (token ids, text, finish reason)."""
    ids, text, finish = [], "", None
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True, "return_token_ids": True},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            ids += choice["token_ids"]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return ids, text, finish


def requests() -> list[dict]:
    """16 different requests: greedy and seeded sampling, prompts and lengths of all sizes."""
    out = []
    for i in range(16):
        prompt = " ".join(["Every effort moves you", "A function", "The river", "Hello"][i % 4] for _ in range(1 + i % 3))
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_k": 100, "seed": 100 + i}
        out.append({"model": "tiny", "prompt": prompt, "max_tokens": 20 + 7 * i, **sampling})
    return out


def test_sixteen_concurrent_streams_each_equal_their_answer_alone(server):
    bodies = requests()
    alone = [stream(server.url, b) for b in bodies]  # one at a time: nothing to batch with
    before = httpx.get(server.url + "/health").json()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: stream(server.url, b), bodies))
    after = httpx.get(server.url + "/health").json()
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert t == a, f"request {i} differs when batched"
    tokens = after["tokens"] - before["tokens"]
    steps = after["steps"] - before["steps"]
    assert tokens == sum(len(a[0]) for a in alone)
    assert steps < tokens / 3, (steps, tokens)  # decoding steps were shared between requests
    assert after["running"] == after["waiting"] == 0


def test_a_client_that_goes_away_is_dropped_at_the_next_step(server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    body = {"model": "tiny", "prompt": "Cancel me", "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            while not next(lines).startswith("data: "):
                pass
    # the connection is closed: the scheduler notices at its next step and counts the request cancelled
    deadline = time.monotonic() + 20
    while httpx.get(server.url + "/health").json()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(server.url + "/health").json()
    assert health["cancelled"] == before + 1 and health["running"] == 0
    time.sleep(0.3)  # the request's log line comes when its handler returns
    steps = [int(m) for m in re.findall(r"cancelled at step (\d+): the client went away", server.log)]
    assert steps and steps[-1] < 480
    tokens = [int(m) for m in re.findall(r"POST /v1/completions 200 \d+\+(\d+) tokens [\d.]+s \(client went away\)",
                                         server.log)]
    assert tokens and tokens[-1] < 480


def test_a_non_streamed_request_whose_client_leaves_is_dropped_too(server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    body = json.dumps({"model": "tiny", "prompt": "Wait for me", "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/health").json()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # until it runs
    deadline = time.monotonic() + 20
    while httpx.get(server.url + "/health").json()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["cancelled"] == before + 1
    time.sleep(0.3)
    assert re.search(r"POST /v1/completions 499 \d+\+\d+ tokens [\d.]+s \(client went away\)", server.log)


def test_sigterm_during_a_stream_finishes_it_and_exits_0(tmp_path, model_dir):
    srv = ServerProcess("--model", model_dir, cwd=tmp_path)
    body = {"model": "tiny", "prompt": "Drain me", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    chunks, done = 0, False
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks += 1
                if chunks == 3:
                    srv.proc.send_signal(signal.SIGTERM)
    assert done and chunks == 400  # the request in flight was finished, not cut
    assert srv.stop() == 0, srv.log
    assert "SIGTERM: finishing" in srv.log and "Traceback" not in srv.log
