"""Request validation: a JSON body becomes plain settings, or an OpenAI-style error (ApiError).

Every field is checked here, before anything reaches the model, with a message naming the field and
the value; an unknown field is ignored (as most OpenAI-compatible servers do), but a known OpenAI
option this server cannot honour (penalties, logit_bias, best_of, suffix, tools) is refused rather
than silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer

MAX_LOGPROBS = 20  # top-N logprobs per token (OpenAI: 5 for completions, 20 for chat)
MAX_CANDIDATES = 100  # explain candidates per step
MAX_STOPS = 4  # stop strings per request, as OpenAI
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """A request the server answers with `status` and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What the server accepts (`gptlab serve` options)."""

    context_length: int
    vocab_size: int
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1 << 20


@dataclass
class Sampling:
    """How to generate one prompt's choices (the scheduler's input besides the prompt)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # top-N logprobs per generated token; 0 = only the drawn token's
    explain: int | None = None  # candidates per step for the playground's `explain` extension
    ignore_eos: bool = False
    prompt_logprobs: int | None = None  # echo + logprobs: the prompt's tokens scored too


@dataclass
class CompletionRequest:
    prompts: list[list[int]]
    sampling: Sampling  # sampling.max_tokens is the first prompt's; max_tokens[i] is prompt i's
    max_tokens: list[int]
    stream: bool = False
    echo: bool = False
    include_usage: bool = False
    return_prompt_ids: bool = False
    return_token_ids: bool = False


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def parse_body(data: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why not."""
    if not data.strip():
        raise ApiError("the request body is empty; send a JSON object")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(f"the request body is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    return json.dumps(v)[:60] if isinstance(v, (str, list, dict)) else repr(v)


def integer(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise ApiError(f"{name} must be a whole number, got {_show(v)}", name)
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ApiError(f"{name} must be {bounds}, got {v}", name)
    return v


def number(body: dict, name: str, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"{name} must be a finite number, got {_show(v)}", name)
    return float(v)


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"{name} must be true or false, got {_show(v)}", name)
    return v


def check_model(body: dict, served: str) -> None:
    name = body.get("model")
    if name is not None and name != served:
        raise ApiError(f"The model {_show(name)} does not exist; this server serves {served!r}", "model",
                       status=404, code="model_not_found")


def _refuse_unsupported(body: dict, fields: dict) -> None:
    """400 for an OpenAI option given a value this server would otherwise silently ignore."""
    for name, neutral in fields.items():
        v = body.get(name)
        if v is not None and v not in neutral:
            raise ApiError(f"{name} is not supported by this server (got {_show(v)})", name)


UNSUPPORTED = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",)}


def sampling_args(body: dict) -> tuple[float, int | None, float | None]:
    """temperature (default 1; 0 = greedy), top_k (extension) and top_p, checked as gptlab.sampling does."""
    temperature = number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(f"temperature must be >= 0 (0 means greedy), got {temperature:g}", "temperature")
    top_k = integer(body, "top_k", None)
    if top_k is not None and top_k < 1:
        raise ApiError(f"top_k must be a whole number >= 1 (or null to keep every token), got {top_k}", "top_k")
    top_p = number(body, "top_p", None)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ApiError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p:g}", "top_p")
    return temperature, top_k, top_p


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(f"stop must be a string or a list of strings, got {_show(stop)}", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def prompt_ids(body: dict, limits: Limits, tokenizer: Tokenizer) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of lists of ids.

    Text is encoded with the model's tokenizer as `gptlab generate --prompt` encodes it (`<|endoftext|>`
    written in it is the special token); an empty string starts from <|endoftext|>, as `--prompt ""` does.
    """
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError("prompt is required: a string, a list of strings or a list of token ids", "prompt")
    prompt = body["prompt"]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text) if text else [tokenizer.eot_id]

    if isinstance(prompt, str):
        return [encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(f"prompt must be a string, a list of strings or a non-empty list of token ids, "
                       f"got {_show(prompt)}", "prompt")
    # A padded vocabulary has ids past the tokenizer's: the model takes them, but they are no token.
    known = min(limits.vocab_size, tokenizer.n_vocab)
    if all(_is_int(t) for t in prompt):
        return [_check_ids(prompt, known)]
    if all(isinstance(p, str) for p in prompt):
        return [encode(p) for p in prompt]
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        return [_check_ids(p, known) for p in prompt]
    raise ApiError("prompt must be a string, a list of strings, a list of token ids or a list of non-empty lists "
                   "of token ids (not a mix)", "prompt")


def _check_ids(ids: list[int], known: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < known]
    if bad:
        raise ApiError(f"token id {bad[0]} in prompt is outside the vocabulary (0..{known - 1})", "prompt")
    return ids


def check_context(prompt_len: int, max_tokens: int | None, limits: Limits, param: str, default: int) -> int:
    """max_tokens within the context: the prompt and every new token must fit; prompts are never cut."""
    ctx = limits.context_length
    if prompt_len >= ctx or (max_tokens is not None and prompt_len + max_tokens > ctx):
        wanted = prompt_len + (max_tokens if max_tokens is not None else default)
        raise ApiError(f"This model's maximum context length is {ctx} tokens, however you requested {wanted} "
                       f"tokens ({prompt_len} in your prompt; {wanted - prompt_len} for the completion). "
                       "Please reduce your prompt or max_tokens.", param if prompt_len >= ctx else "max_tokens",
                       code="context_length_exceeded")
    return max_tokens if max_tokens is not None else min(default, ctx - prompt_len)


def common_sampling(body: dict, limits: Limits) -> Sampling:
    """The fields completions and chat share (max_tokens is set later, once the prompt's length is known)."""
    temperature, top_k, top_p = sampling_args(body)
    n = integer(body, "n", 1, low=1, high=limits.max_batch)
    seed = integer(body, "seed", None, low=0, high=MAX_SEED - n)
    return Sampling(max_tokens=0, temperature=temperature, top_k=top_k, top_p=top_p, n=n, stop=stop_strings(body),
                    seed=seed, ignore_eos=boolean(body, "ignore_eos"))


def stream_options(body: dict) -> bool:
    """include_usage from stream_options (a final chunk with the usage and no choices)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(f"stream_options must be an object, got {_show(opts)}", "stream_options")
    return boolean(opts, "include_usage")


def parse_completion(body: dict, limits: Limits, served: str, tokenizer: Tokenizer) -> CompletionRequest:
    check_model(body, served)
    _refuse_unsupported(body, UNSUPPORTED)
    sampling = common_sampling(body, limits)
    best_of = integer(body, "best_of", None, low=1)
    if best_of is not None and best_of != sampling.n:
        raise ApiError("best_of is not supported by this server (only best_of = n)", "best_of")
    prompts = prompt_ids(body, limits, tokenizer)
    if len(prompts) * sampling.n > limits.max_batch:
        raise ApiError(f"{len(prompts)} prompts x n={sampling.n} choices is more than this server's "
                       f"--max-batch {limits.max_batch}", "n")
    asked = integer(body, "max_tokens", None, low=0)
    max_tokens = [check_context(len(p), asked, limits, "prompt", 16) for p in prompts]  # OpenAI's default: 16
    sampling.max_tokens = max_tokens[0]
    logprobs = integer(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    echo = boolean(body, "echo")
    sampling.logprobs = logprobs
    sampling.prompt_logprobs = logprobs if echo else None
    explain = body.get("explain")
    if explain is not None and explain is not False:
        sampling.explain = 10 if explain is True else integer(body, "explain", None, low=1, high=MAX_CANDIDATES)
    stream = boolean(body, "stream")
    return CompletionRequest(prompts, sampling, max_tokens, stream, echo, stream and stream_options(body),
                             boolean(body, "return_prompt_ids"), boolean(body, "return_token_ids"))


def parse_chat(body: dict, limits: Limits, served: str, chat, tokenizer: Tokenizer) -> tuple[ChatRequest, list[int]]:
    """The chat request and its prompt ids: the messages rendered in the model's chat format (a chat.ChatFormat:
    `render(messages)` -> (prompt text, extra stop strings), `encode(text, tokenizer)` -> ids)."""
    check_model(body, served)
    _refuse_unsupported(body, {**UNSUPPORTED, "tools": ([],), "functions": ([],), "tool_choice": ("none",),
                               "response_format": ({"type": "text"},)})
    sampling = common_sampling(body, limits)
    messages = body.get("messages")
    if messages is None:
        raise ApiError("messages is required: a list of {\"role\", \"content\"} objects", "messages")
    text, stops = chat.render(messages)
    ids = chat.encode(text, tokenizer)
    max_tokens = integer(body, "max_completion_tokens", None, low=0)
    max_tokens = integer(body, "max_tokens", max_tokens, low=0)
    sampling.max_tokens = check_context(len(ids), max_tokens, limits, "messages", limits.context_length)
    sampling.stop = sampling.stop + [s for s in stops if s not in sampling.stop]
    logprobs = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, low=0, high=MAX_LOGPROBS)
    if top and not logprobs:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    sampling.logprobs = top if logprobs else None
    stream = boolean(body, "stream")
    return ChatRequest(messages, sampling, stream, stream and stream_options(body), logprobs, top), ids


@dataclass
class ExplainRequest:
    prompt: list[int]
    temperature: float
    top_k: int | None
    top_p: float | None
    candidates: int


def parse_explain(body: dict, limits: Limits, served: str, tokenizer: Tokenizer) -> ExplainRequest:
    """POST /v1/explain: one context (text or ids), sampling settings and the number of candidates."""
    check_model(body, served)
    temperature, top_k, top_p = sampling_args(body)
    (ids, *rest) = prompt_ids(body, limits, tokenizer)
    if rest:
        raise ApiError("explain takes one prompt", "prompt")
    if len(ids) > limits.context_length:
        raise ApiError(f"prompt has {len(ids)} tokens, more than the model's context of {limits.context_length}; "
                       "send its last tokens", "prompt", code="context_length_exceeded")
    return ExplainRequest(ids, temperature, top_k, top_p, integer(body, "candidates", 10, low=1, high=MAX_CANDIDATES))
