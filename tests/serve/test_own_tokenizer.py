"""Serving a model that carries its own trained tokenizer: prompts, text, logprobs, the end-of-text stop and
id checks all use that tokenizer, never GPT-2's (whose ids mean other tokens, and whose <|endoftext|> is 50256)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from gptlab.cli.main import main
from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from gptlab.serve.protocol import ApiError, Limits, parse_completion
from gptlab.serve.tokens import logprob_token
from gptlab.tokenizer import get_tokenizer
from gptlab.tokenizer.train import train_tokenizer
from tests.helpers import tiny_config, write_mixed_corpus

testclient = pytest.importorskip("fastapi.testclient")

# Characters the corpus never shows (split into byte tokens) and some it does (merged), emoji included.
PROMPT = "春风又绿江南岸，我们今天去图书馆 😀👍🏽 naïve"
TRANSCRIPT = f"user: {PROMPT}\nassistant:"  # PROMPT as a chat message to a base model
EMOJI = "😀".encode()  # F0 9F 98 80: four byte tokens, one character


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-tok")
    return train_tokenizer([write_mixed_corpus(root / "corpus", n_files=2, n_words=2000)], 400, root / "tok",
                           progress=False)


def byte_token(tok, value: int) -> int:
    return next(i for i in range(tok.n_vocab) if tok.decode_single_token_bytes(i) == bytes([value]))


@pytest.fixture(scope="module")
def random_dir(tok, tmp_path_factory) -> str:
    """A random model with weights scaled up, so its greedy and sampled choices are varied."""
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=tok.n_vocab, context_length=64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    model.tokenizer = tok
    return str(save_model(model, tmp_path_factory.mktemp("own-tok-random") / "random"))


@pytest.fixture(scope="module")
def emoji_dir(tok, tmp_path_factory) -> str:
    """A model whose greedy continuation of PROMPT (and TRANSCRIPT) is known: 😀 as its four byte tokens, then
    <|endoftext|>, then 😀 again. The blocks are zeroed, so each position's logits depend on its own token
    alone, and each token of the chain gets its own embedding direction, which the LM head maps to the next."""
    f0, b9f, b98, b80 = (byte_token(tok, b) for b in EMOJI)
    successor = {tok.encode(PROMPT)[-1]: f0, tok.encode(TRANSCRIPT)[-1]: f0, f0: b9f, b9f: b98, b98: b80,
                 b80: tok.eot_id, tok.eot_id: f0}
    assert len(successor) == 7
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=tok.n_vocab, context_length=64, tie_embeddings=False))
    with torch.no_grad():
        for p in model.trf_blocks.parameters():
            p.zero_()
        model.pos_emb.weight.zero_()
        model.out_head.weight.zero_()
        for i, (token, following) in enumerate(successor.items()):
            model.tok_emb.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), model.config.emb_dim)
            model.out_head.weight[following] += 10 * model.final_norm(model.tok_emb.weight[token])
    model.tokenizer = tok
    return str(save_model(model, tmp_path_factory.mktemp("own-tok-emoji") / "emoji"))


@contextlib.contextmanager
def serving(folder: str):
    from gptlab.serve.app import create_app
    from gptlab.serve.server import load_served

    served = load_served(folder, None, "cpu", torch.float32, "off", {})
    with testclient.TestClient(create_app(served)) as client:
        yield client


@pytest.fixture(scope="module")
def random_app(random_dir):
    with serving(random_dir) as client:
        yield client


@pytest.fixture(scope="module")
def emoji_app(emoji_dir):
    with serving(emoji_dir) as client:
        yield client


def generate_json(capsys, folder: str, *options: str) -> dict:
    """`gptlab generate --json` on PROMPT, run in this process."""
    capsys.readouterr()
    assert main(["generate", "--model", folder, "--prompt", PROMPT, "--json", "--cpu-kernel", "off", "--device",
                 "cpu", *options]) == 0
    return json.loads(capsys.readouterr().out)


def stream_chunks(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_text_prompts_are_encoded_with_the_models_tokenizer(random_app, tok):
    ids = tok.encode(PROMPT)
    assert ids != get_tokenizer().encode(PROMPT)
    r = random_app.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                 "return_prompt_ids": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prompt_token_ids"] == ids and out["usage"]["prompt_tokens"] == len(ids)
    choice = out["choices"][0]
    assert choice["text"] == PROMPT  # echo decodes the prompt with the same tokenizer
    names = [logprob_token(t, tok) for t in ids]
    assert choice["logprobs"]["tokens"] == names
    assert any(n.startswith("bytes:") for n in names) and "春" not in "".join(names)  # split characters
    empty = random_app.post("/v1/completions", json={"prompt": "", "max_tokens": 1, "return_prompt_ids": True})
    assert empty.json()["prompt_token_ids"] == [tok.eot_id] == [0]
    messages = [{"role": "user", "content": PROMPT}]
    chat = random_app.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == len(tok.encode(TRANSCRIPT))


def test_greedy_and_seeded_completions_equal_gptlab_generate(random_app, random_dir, tok, capsys):
    for options, settings in ((["--temperature", "0"], {"temperature": 0}),
                              (["--temperature", "0.9", "--seed", "5"], {"temperature": 0.9, "seed": 5})):
        want = generate_json(capsys, random_dir, "--max-new-tokens", "12", *options)
        assert want["prompt_ids"] == tok.encode(PROMPT)
        want = want["completions"][0]
        stopped = want["token_ids"][-1] == tok.eot_id
        text = want["text"].removesuffix(tok.eot_token) if stopped else want["text"]  # the server omits it
        body = {"prompt": PROMPT, "max_tokens": 12, "return_token_ids": True, **settings}
        got = random_app.post("/v1/completions", json=body).json()["choices"][0]
        assert got["token_ids"] == want["token_ids"] and got["text"] == text
        assert got["finish_reason"] == ("stop" if stopped else "length")
        chunks = stream_chunks(random_app, "/v1/completions", {**body, "stream": True})
        assert "".join(c["choices"][0]["text"] for c in chunks) == text
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want["token_ids"]


def test_the_stream_never_splits_a_character_and_stops_at_the_tokenizers_eot(emoji_app, emoji_dir, tok, capsys):
    chain = [byte_token(tok, b) for b in EMOJI] + [tok.eot_id]
    want = generate_json(capsys, emoji_dir, "--max-new-tokens", "10", "--temperature", "0")["completions"][0]
    assert want == {"text": "😀<|endoftext|>", "token_ids": chain}
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 1, "return_token_ids": True}
    whole = emoji_app.post("/v1/completions", json=body).json()
    choice = whole["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["token_ids"]) == ("😀", "stop", chain)
    assert whole["usage"]["completion_tokens"] == 5
    assert choice["logprobs"]["tokens"] == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98", "bytes:\\x80",
                                            "<|endoftext|>"]
    chunks = stream_chunks(emoji_app, "/v1/completions", {**body, "stream": True, "explain": 3})
    assert [c["choices"][0]["text"] for c in chunks] == ["", "", "", "😀", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    tokens = [c["choices"][0]["explain"]["token"] for c in chunks]
    assert tokens[0] == {"id": chain[0], "text": "\ufffd", "display": "<F0>", "bytes": "F0", "partial": True}
    assert tokens[-1] == {"id": 0, "text": "", "display": "<|endoftext|>", "bytes": "", "partial": False}
    # without the stop, <|endoftext|> is text, as with gptlab generate --no-eos-stop
    going = emoji_app.post("/v1/completions", json={**body, "ignore_eos": True}).json()["choices"][0]
    assert (going["text"], going["finish_reason"]) == ("😀<|endoftext|>😀<|endoftext|>", "length")
    chat = stream_chunks(emoji_app, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0, "stream": True,
        "logprobs": True})
    deltas = [c["choices"][0] for c in chat[1:]]
    assert [d["delta"].get("content", "") for d in deltas] == ["", "", "", "😀", ""]
    assert deltas[-1]["finish_reason"] == "stop"
    assert [d["logprobs"]["content"][0]["bytes"] for d in deltas] == [[b] for b in EMOJI] + [list(b"<|endoftext|>")]


def test_explain_encodes_and_shows_with_the_models_tokenizer(emoji_app, tok):
    r = emoji_app.post("/v1/explain", json={"prompt": PROMPT, "temperature": 0, "candidates": 2})
    assert r.status_code == 200, r.text
    top = r.json()["candidates"][0]
    assert (top["id"], top["display"], top["p_final"]) == (byte_token(tok, 0xF0), "<F0>", 1.0)


def test_token_ids_outside_the_tokenizers_vocabulary_are_refused(emoji_app, tok):
    n = tok.n_vocab
    for path in ("/v1/completions", "/v1/explain"):
        r = emoji_app.post(path, json={"prompt": [5, n], "max_tokens": 1})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["param"] == "prompt" and error["type"] == "invalid_request_error"
        assert f"token id {n} in prompt is outside the vocabulary (0..{n - 1})" in error["message"]
    assert emoji_app.post("/v1/completions", json={"prompt": [n - 1], "max_tokens": 1}).status_code == 200
    # a model whose vocabulary is padded past its tokenizer's: the padding ids are no tokens either
    with pytest.raises(ApiError, match=f"token id {n} in prompt is outside the vocabulary"):
        parse_completion({"prompt": [n]}, Limits(context_length=64, vocab_size=n + 12), "m", tok)
