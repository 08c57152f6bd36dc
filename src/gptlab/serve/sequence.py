"""One request's jobs and choices inside the scheduler: sampling, text, stop conditions, logprobs, explain.

A Job is one prompt with n choices; each choice is a Sequence that owns a KV-cache slot while it runs.
After every step a Sequence hands its caller a Delta (the new token, the text it completed, and what
was asked for besides), through the job's `emit` callback.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation.generate import TokenTextDecoder
from ..generation.sampling import sample_next
from ..tokenizer import Tokenizer
from .protocol import Sampling
from .tokens import StopText, TokenLogprob, explain, logprobs_at, token_info


@dataclass
class Delta:
    """What one step added to choice `index` (the text may be '' while a character or a stop is pending)."""

    index: int
    token_id: int | None = None
    text: str = ""
    logprob: TokenLogprob | None = None
    explain: dict | None = None
    finish_reason: str | None = None  # "stop", "length"; set on the choice's last delta
    text_offset: int = 0  # where this token's text starts in the choice's generated text


@dataclass
class PromptScores:
    """echo + logprobs: the prompt's own tokens scored (the first has no logprob), for choices `indices`."""

    indices: range
    logprobs: list[TokenLogprob]


@dataclass
class Failure:
    """The job failed while running (an error the server could not avoid); the client gets a 500."""

    message: str


@dataclass
class Job:
    """One prompt and its n choices, as the scheduler runs them."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # called from the scheduler thread with Delta, PromptScores or Failure
    first_index: int = 0  # the response's choice index of this job's first choice
    name: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the client went away
    done: int = 0  # choices finished
    failed: bool = False


class Sequence:
    """One choice: its slot in the KV cache, its generator, the tokens it drew and its text."""

    def __init__(self, job: Job, choice: int, eos_id: int | None, device: torch.device, tokenizer: Tokenizer) -> None:
        s = job.sampling
        self.job, self.index, self.slot = job, job.first_index + choice, -1
        self.tokenizer = tokenizer
        self.eos_id = None if s.ignore_eos else eos_id
        self.tokens: list[int] = []
        self.finished = False
        self.generator = None
        if s.temperature > 0:
            # Choice i draws from its own generator seeded seed + i: the same draws as
            # `gptlab generate --seed (seed + i)`, whatever else the server runs beside it.
            seed = s.seed + self.index if s.seed is not None else secrets.randbits(62)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.decoder = TokenTextDecoder(tokenizer)
        self.stop = StopText(s.stop)
        self.text_length = 0  # characters decoded so far (text offsets)

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def advance(self, logits: Tensor) -> Delta:
        """Draw the next token from this choice's logits (1, V) and account for it."""
        s = self.job.sampling
        tid = int(sample_next(logits, s.temperature, s.top_k, s.top_p, self.generator)[0])
        self.tokens.append(tid)
        delta = Delta(self.index, tid, text_offset=self.text_length)
        if s.logprobs is not None:
            delta.logprob = logprobs_at(logits, [tid], s.logprobs)[0]
        if s.explain:
            delta.explain = {"step": len(self.tokens) - 1, "token": token_info(tid, self.tokenizer),
                             **explain(logits[0], s.temperature, s.top_k, s.top_p, s.explain, self.tokenizer)}
        ended = tid == self.eos_id
        piece = "" if ended else self.decoder.push(tid)  # the end-of-text token adds no text
        if ended or len(self.tokens) >= s.max_tokens:
            piece += self.decoder.flush()
        self.text_length += len(piece)
        delta.text, hit = self.stop.push(piece)
        if hit or ended:
            delta.finish_reason = "stop"
        elif len(self.tokens) >= s.max_tokens:
            delta.finish_reason = "length"
            delta.text += self.stop.flush()
        self.finished = delta.finish_reason is not None
        return delta
