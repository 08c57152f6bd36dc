"""Text generation: greedy, temperature, top-k, top-p and end-of-text stop, with a KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import UsageError
from .model import GPTModel


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next-token ids (B, 1) from last-position logits (B, V).

    Order: temperature 0 -> argmax; else top-k masking (-inf), then divide by temperature, then top-p
    on the resulting distribution, then multinomial sampling.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if top_k is not None:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep a token when the mass before it is still below p (the top token is always kept)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPTModel,
    idx: Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Prompt ids (B, T) -> prompt + up to `max_new_tokens` new ids (B, T + n)."""
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    context_size = min(context_size or model.config.context_length, model.config.context_length)
    was_training = model.training
    model.eval()
    cache = model.make_kv_cache(idx.shape[0], context_size) if use_cache else None
    out = idx
    for _ in range(max_new_tokens):
        window = out[:, -context_size:]
        if cache is not None and cache.length and cache.length < context_size:
            logits = model(out[:, -1:], kv_cache=cache, last_only=True)
        else:
            if cache is not None:
                cache.reset()  # first step, or the window slid past the cache: prefill again
            logits = model(window, kv_cache=cache, last_only=True)
        next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        out = torch.cat([out, next_id], dim=1)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
    model.train(was_training)
    return out
