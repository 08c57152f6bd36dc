"""Cross-entropy of the LM head computed in row chunks, never materialising the full logits.

For a batch of N tokens the plain path builds N x V logits, their log-softmax and (in training) their
gradient: three N x V float32 tensors (205 MB each for 4 x 256 tokens of GPT-2), freshly allocated and
page-faulted on every step. Here each chunk of rows computes its logits, its share of the loss and,
when gradients are needed, the gradients of the hidden states and of the head weight right away, so
only one small chunk of logits ever exists. The FLOPs are the same as the plain path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# 256 rows x 50257 float32 = 51 MB per chunk. A/B on gpt2-small training (bench/ab.py, shared CPU):
# page faults per step 334k (full logits) -> 233k (256 rows); 128 rows faulted less but spent more
# user time on the many small rank-k updates of the head's gradient, 512 rows gained nothing more.
CHUNK_ROWS = 256


def _compute_dtype(weight: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") and weight.device.type == "cpu":
        return torch.get_autocast_dtype("cpu")
    if weight.device.type != "cpu" and torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def _chunks(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, ignore_index: int,
            want_grad: bool, chunk_rows: int):
    """Sum of token losses, number of counted tokens, and (if wanted) unscaled grads of hidden and weight."""
    dtype = _compute_dtype(weight)
    h_all, w = hidden.to(dtype), weight[:vocab_size].to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    count = (targets != ignore_index).sum()
    grad_h = torch.empty_like(hidden) if want_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
    # float32: accumulate the head's gradient chunk by chunk in place. Lower precision: keep the
    # (N, V) low-precision softmax grads and do one matmul at the end, so grad_w is rounded once.
    in_place = dtype == torch.float32
    probs_all = None if in_place or not want_grad else torch.empty(hidden.shape[0], vocab_size, dtype=dtype,
                                                                   device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t = h_all[rows], targets[rows]
        keep = t != ignore_index
        safe_t = torch.where(keep, t, 0)[:, None]
        logits = (h @ w.t()).float()
        if not want_grad:
            total += F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
            continue
        # one fused log-softmax pass; its exp (in place) is the softmax the gradient needs
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        total -= (logp.gather(1, safe_t).squeeze(1) * keep).sum()
        # d loss / d logits = softmax - one_hot(target), zero for ignored rows
        probs = logp.exp_()
        probs.scatter_add_(1, safe_t, torch.full(safe_t.shape, -1.0, device=probs.device))
        probs.mul_(keep[:, None])
        p = probs.to(dtype)
        if grad_h.dtype == dtype:
            torch.mm(p, w, out=grad_h[rows])
        else:
            grad_h[rows] = p @ w
        if in_place:
            grad_w[:vocab_size].addmm_(p.t(), h)
        else:
            probs_all[rows] = p
    if probs_all is not None:
        grad_w[:vocab_size] = probs_all.t() @ h_all
    return total, count, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, ignore_index, chunk_rows):
        total, count, grad_h, grad_w = _chunks(hidden, weight, targets, vocab_size, ignore_index, True, chunk_rows)
        denom = count.clamp(min=1).to(torch.float32)
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = grad_out / denom
        return (grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int | None = None,
                          ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """Mean cross-entropy of `hidden` (N, C) @ `weight[:vocab_size]`.T against `targets` (N,).

    Equal to F.cross_entropy(hidden @ weight[:vocab_size].T, targets, ignore_index=...) up to float
    rounding, with the same gradients, at a fraction of the memory.
    """
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, vocab_size, ignore_index, chunk_rows)
    total, count, _, _ = _chunks(hidden, weight, targets, vocab_size, ignore_index, False, chunk_rows)
    return total / count.clamp(min=1)
