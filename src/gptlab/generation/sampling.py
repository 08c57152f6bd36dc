"""Next-token sampling (temperature, top-k, top-p) and the sampling explainer figure.

Order of operations, for last-position logits (B, V), the same in `generate` and in the figure:

1. temperature 0 means greedy: the argmax is taken and nothing else below applies;
2. the logits are divided by the temperature (in float32, whatever the model's dtype);
3. top-k: all but the k largest logits are set to -inf (k is clamped to the vocabulary size);
4. softmax;
5. top-p (nucleus): the smallest set of most likely tokens whose probability reaches p is kept,
   the rest set to 0, and the kept probabilities renormalised;
6. one id per row is drawn with `torch.multinomial` (from `generator` when given, so the global RNG
   is left alone).

Top-k before or after the temperature gives the same set (dividing by a positive number keeps the
order); top-p depends on the temperature, so it comes after it, as in most libraries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UsageError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise UsageError for a temperature, top-k or top-p that has no meaning."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise UsageError(f"temperature must be a finite number, got {temperature!r}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise UsageError(f"top_k must be a whole number, got {top_k!r}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be at least 1 (or None to keep every token), got {top_k}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))):
        raise UsageError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits with all but the k largest per row set to -inf (k clamped to the vocabulary).

    Exactly k stay: among equal logits at the boundary, torch.topk's choice is kept.
    """
    if k >= logits.shape[-1]:
        return logits
    values, ids = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)


def apply_top_p(probs: Tensor, p: float) -> Tensor:
    """Probabilities restricted to the smallest most-likely set whose mass reaches p, renormalised."""
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # A token is kept while the mass strictly before it is below p, so the most likely token is
    # always kept and the kept set is the smallest one that reaches p.
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def next_token_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The distribution (float32, same shape as `logits`) that sampling draws from (steps 2-5).

    Temperature 0 gives a one-hot distribution on the argmax.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(
            -1, logits.argmax(dim=-1, keepdim=True), 1.0
        )
    scaled = logits.float() / temperature
    if top_k is not None:
        scaled = apply_top_k(scaled, top_k)
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None:
        probs = apply_top_p(probs, top_p)
    return probs


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next-token ids (B,) from last-position logits (B, V): greedy, or sampled as documented above.

    Draws from the same distribution as `next_token_probs`, but works on the sorted candidates
    only (the k best with top-k, all tokens sorted once with top-p) instead of the whole vocabulary
    several times: this runs at every generated token.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is None and (top_p is None or top_p >= 1.0):
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)
    if top_k is not None and top_k < scaled.shape[-1]:
        scaled, ids = torch.topk(scaled, top_k, dim=-1)  # sorted, largest first
    else:
        scaled, ids = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        # keep a candidate while the mass before it is below p; multinomial renormalises the rest
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)
