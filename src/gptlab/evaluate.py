"""Loss, perplexity and bits per byte: per batch, over a loader, and over a long text with sliding windows.

Bits per byte compares models whose tokenizers differ: the summed cross-entropy, in bits, divided by
the UTF-8 bytes of the text the scored tokens stand for. Loss and perplexity are per token, so a
tokenizer that cuts the same text into fewer tokens has a higher loss for the same model quality;
bits per byte does not depend on the tokenizer. Special tokens (`<|endoftext|>`) count 0 bytes: they
mark document boundaries and are not text, but predicting them is part of the loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UsageError
from .model import GPTModel
from .tokenizer import as_tokenizer, count_bytes, tokenizer_of


def calc_loss_batch(input_batch: Tensor, target_batch: Tensor, model: torch.nn.Module, device) -> Tensor:
    """Mean cross-entropy of one batch (a scalar tensor that can be backpropagated).

    A language model's (B, T, V) logits are scored against (B, T) next-token targets, a classifier's
    (B, K) logits against (B,) class ids. Targets of -100 are left out (prompt and padding tokens).
    """
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    if type(model) is GPTModel:
        # The LM head's loss in row chunks: the (B, T, V) logits are never allocated (gptlab.loss).
        # Wrapped models (DDP, FSDP, torch.compile) take the plain path: their hooks run on forward().
        return model.loss(input_batch, target_batch)
    logits = model(input_batch)
    # float32 for the softmax even under autocast: low-precision log-sum-exp over 50k logits is lossy.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target_batch.reshape(-1))


def calc_loss_loader(
    data_loader: Iterable, model: torch.nn.Module, device, num_batches: int | None = None
) -> float:
    """Mean of the per-batch losses over the first `num_batches` batches (all when None).

    An empty loader gives NaN (as in the book) rather than an error, so a training log can still
    print a line when, say, a validation set is empty; `math.isnan` tells the caller. The model's
    train/eval mode is left as it is (call `model.eval()` first to disable dropout).
    """
    n_available = len(data_loader)  # type: ignore[arg-type]
    if n_available == 0:
        return float("nan")
    num_batches = n_available if num_batches is None else min(num_batches, n_available)
    total = 0.0
    with torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def perplexity(loss: float | Tensor) -> float:
    """exp(loss): the effective number of equally likely next tokens (inf when it overflows)."""
    value = float(loss)
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


@dataclass(frozen=True)
class EvalResult:
    """Mean loss (nats per token), perplexity, bits per byte, scored tokens and the bytes they stand for."""

    loss: float
    perplexity: float
    tokens: int
    bytes: int = 0
    bits_per_byte: float = float("nan")

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """Summed cross-entropy in bits over `n_bytes` bytes: loss (mean nats per token) * tokens / (bytes * ln 2)."""
    return loss * tokens / (n_bytes * math.log(2)) if n_bytes > 0 else float("nan")


def bytes_per_token(loader: Iterable, tokenizer) -> float | None:
    """UTF-8 bytes per token of the whole token stream behind a loader (a GPTDataset's `token_ids` or a
    token file's `tokens`), or None when the loader does not expose it or the tokenizer does not fit."""
    dataset = getattr(loader, "dataset", None)
    ids = getattr(dataset, "token_ids", None)
    if ids is None:
        ids = getattr(dataset, "tokens", None)
    if ids is None or len(ids) == 0:
        return None
    try:
        n_bytes = count_bytes(ids, as_tokenizer(tokenizer))
    except ValueError:
        return None
    return n_bytes / len(ids) if n_bytes else None


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int]]:
    """(start, n_new) windows that score tokens 1..n_tokens-1 exactly once.

    Each window feeds ids[start:start+L] and predicts ids[start+1:start+L+1] (L = min(context,
    n_tokens - 1)); only its last `n_new` predictions are scored. The first window scores all of its
    L targets; each later one moves the end on by `stride` tokens, so every newly scored token sees at
    least L - stride tokens of context. All windows have the same length, so they batch together.
    """
    if n_tokens < 2:
        raise UsageError(f"need at least 2 tokens to score a text, got {n_tokens}; give a longer text")
    if context_length < 1 or stride < 1:
        raise UsageError(f"context length and stride must be positive, got {context_length} and {stride}")
    length = min(context_length, n_tokens - 1)
    stride = min(stride, length)
    windows = [(0, length)]
    end = length  # targets 1..end are scored
    while end < n_tokens - 1:
        new_end = min(end + stride, n_tokens - 1)
        windows.append((new_end - length, new_end - end))
        end = new_end
    return windows


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    token_ids: Tensor,
    device=None,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    tokenizer=None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of a token stream, every token after the first scored exactly once.

    A stream that fits in one window gives the mean cross-entropy over all its positions (the same
    number as Hugging Face's `labels=input_ids` loss); a longer one uses `sliding_windows`. The
    default stride is half the context: each token then sees at least half a window of context.
    Bytes are those of the scored tokens under `tokenizer` (default: the model's, see
    gptlab.tokenizer.tokenizer_of).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    max_context = model.config.context_length  # type: ignore[attr-defined]
    context_length = context_length or max_context
    if context_length > max_context:
        raise UsageError(
            f"--context-length {context_length} is above the model's maximum of {max_context}; lower it"
        )
    stride = stride or max(1, context_length // 2)
    if device is None:
        device = next(model.parameters()).device
    windows = sliding_windows(len(ids), context_length, stride)
    length = min(context_length, len(ids) - 1)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    scored = 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        inputs = torch.stack([ids[s : s + length] for s, _ in chunk]).to(device)
        targets = torch.stack([ids[s + 1 : s + length + 1] for s, _ in chunk]).to(device)
        nll = F.cross_entropy(model(inputs).float().transpose(1, 2), targets, reduction="none")  # (B, L)
        for row, (_, n_new) in enumerate(chunk):
            total_nll += nll[row, length - n_new :].double().sum().item()
            scored += n_new
    model.train(was_training)
    loss = total_nll / scored
    try:
        n_bytes = count_bytes(ids[1:], as_tokenizer(tokenizer) if tokenizer is not None else tokenizer_of(model))
    except ValueError:  # ids the tokenizer does not have (a model with a larger vocabulary): no bytes known
        n_bytes = 0
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=scored, bytes=n_bytes,
                      bits_per_byte=bits_per_byte(loss, scored, n_bytes))
