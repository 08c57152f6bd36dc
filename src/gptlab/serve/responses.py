"""OpenAI's response objects, built from the scheduler's deltas: completions and chat, whole or streamed."""

from __future__ import annotations

import json
import time
import uuid

from ..generation.generate import TokenTextDecoder
from ..tokenizer import Tokenizer
from .sequence import Delta
from .tokens import TokenLogprob, logprob_token, token_bytes


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: {...}` and a blank line."""
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"


def completion_logprobs(entries: list[TokenLogprob], offsets: list[int], tokenizer: Tokenizer) -> dict:
    """The completions API's logprobs object (the prompt's first token, with echo, has no logprob: null)."""
    return {"tokens": [logprob_token(e.token_id, tokenizer) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {logprob_token(t, tokenizer): lp for t, lp in e.top}
                             for e in entries],
            "text_offset": list(offsets)}


def chat_logprob(entry: TokenLogprob, tokenizer: Tokenizer) -> dict:
    """One token of the chat API's logprobs.content, with its bytes as OpenAI gives them."""

    def item(tid: int, logprob: float) -> dict:
        data = token_bytes(tid, tokenizer)
        return {"token": logprob_token(tid, tokenizer), "logprob": logprob,
                "bytes": list(data) if data is not None else None}

    return {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}


def prompt_offsets(prompt: list[int], tokenizer: Tokenizer) -> tuple[str, list[int]]:
    """The prompt's text and where each of its tokens starts in it (echo with logprobs)."""
    decoder, offsets = TokenTextDecoder(tokenizer), []
    for tid in prompt:
        offsets.append(len(decoder.text))
        decoder.push(tid)
    decoder.flush()
    return decoder.text, offsets


class Choice:
    """One choice's deltas gathered into the non-streamed answer."""

    def __init__(self, index: int, tokenizer: Tokenizer) -> None:
        self.index, self.tokenizer = index, tokenizer
        self.parts: list[str] = []
        self.entries: list[TokenLogprob] = []
        self.offsets: list[int] = []
        self.token_ids: list[int] = []
        self.explains: list[dict] = []
        self.finish_reason: str | None = None
        self.prefix, self.prefix_entries, self.prefix_offsets = "", [], []  # echo

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        if delta.token_id is not None:
            self.token_ids.append(delta.token_id)
        if delta.logprob is not None:
            self.entries.append(delta.logprob)
            self.offsets.append(delta.text_offset)
        if delta.explain is not None:
            self.explains.append(delta.explain)
        self.finish_reason = delta.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def completion(self, logprobs: bool, token_ids: bool) -> dict:
        out = {"index": self.index, "text": self.prefix + self.text, "logprobs": None,
               "finish_reason": self.finish_reason}
        if logprobs:
            shift = len(self.prefix)
            out["logprobs"] = completion_logprobs(self.prefix_entries + self.entries,
                                                  self.prefix_offsets + [o + shift for o in self.offsets],
                                                  self.tokenizer)
        if token_ids:
            out["token_ids"] = self.token_ids
        if self.explains:
            out["explain"] = self.explains
        return out

    def chat(self, logprobs: bool) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                "logprobs": {"content": [chat_logprob(e, self.tokenizer) for e in self.entries]} if logprobs else None,
                "finish_reason": self.finish_reason}


class Envelope:
    """The fields every object of one response shares (id, object, created, model)."""

    def __init__(self, kind: str, model: str) -> None:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        self.fields = {"id": new_id(prefix), "object": kind, "created": int(time.time()), "model": model}

    def __call__(self, **rest) -> dict:
        return {**self.fields, **rest}


def completion_chunk_choice(delta: Delta, logprobs: bool, token_ids: bool, tokenizer: Tokenizer) -> dict:
    choice = {"index": delta.index, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}
    if logprobs and delta.logprob is not None:
        choice["logprobs"] = completion_logprobs([delta.logprob], [delta.text_offset], tokenizer)
    if token_ids:
        choice["token_ids"] = [] if delta.token_id is None else [delta.token_id]
    if delta.explain is not None:
        choice["explain"] = delta.explain
    return choice


def chat_chunk_choice(delta: Delta, logprobs: bool, tokenizer: Tokenizer) -> dict:
    choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {}, "logprobs": None,
              "finish_reason": delta.finish_reason}
    if logprobs and delta.logprob is not None:
        choice["logprobs"] = {"content": [chat_logprob(delta.logprob, tokenizer)]}
    return choice
