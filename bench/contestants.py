"""The three contestants, each behind the same small interface.

A contestant builds a model of given shapes with random weights and exposes:
  build(shape, dtype, for_training) -> model
  generate(model, idx, new_tokens, use_cache) -> ids
  logits(model, idx) -> (B, T, V) logits (training and eval call this)
  optimizer(model) -> torch optimizer
  train_step(model, opt, x, y, autocast) -> None   (forward + backward + step)
  save(model, folder) / load(folder, shape) for the load job.

Imports of the peers happen inside functions, so a gptlab job never pays for importing transformers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    """Model shapes shared by every contestant (GPT-2 architecture)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1

    def matmul_params(self) -> int:
        """Weights used in matmuls per token: the blocks plus the LM head (V x C); no position table."""
        C, L, V = self.emb_dim, self.n_layers, self.vocab_size
        per_block = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C
        return L * per_block + V * C + 2 * C


SHAPES = {
    "gpt2-small": Shape(),
    # the "small preset" job: 4 layers, 4 heads, 256 wide, GPT-2 vocabulary
    "small": Shape(emb_dim=256, n_heads=4, n_layers=4),
    # for the smoke test only
    "tiny": Shape(vocab_size=1000, context_length=64, emb_dim=32, n_heads=2, n_layers=2),
}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss for every contestant: mean token cross-entropy over the whole batch."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def autocast_ctx(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def plain_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """What the book (and most user loops) do: AdamW over all parameters, torch's default implementation."""
    return torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)


def plain_train_step(logits_fn, model, opt, x, y, autocast: bool) -> None:
    with autocast_ctx(autocast):
        loss = cross_entropy(logits_fn(model, x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


# --------------------------------------------------------------------------------------------- gptlab
class Gptlab:
    name = "gptlab"
    note = ""

    @staticmethod
    def build(shape: Shape, dtype: torch.dtype, for_training: bool):
        from gptlab import GPTConfig, GPTModel

        cfg = GPTConfig(
            vocab_size=shape.vocab_size, context_length=shape.context_length, emb_dim=shape.emb_dim,
            n_heads=shape.n_heads, n_layers=shape.n_layers, drop_rate=shape.drop_rate,
        )
        return GPTModel(cfg).to(dtype)

    @staticmethod
    def process_setup() -> None:
        from gptlab.hardware import keep_freed_memory

        keep_freed_memory()  # as gptlab train / gptlab eval do on CPU: glibc keeps freed memory

    @staticmethod
    def for_decoding(model):
        from gptlab.generation.decoding import prepare_for_decoding

        # as `gptlab generate --cpu-kernel on` does: each batch-1 step in the C kernel over repacked weights (built
        # or loaded from its cache here, not in the timed runs); batches keep the eager forward
        return prepare_for_decoding(model, kernel="on")

    @staticmethod
    def generate(model, idx, new_tokens: int, use_cache: bool):
        from gptlab.generation.generate import generate

        return generate(model, idx, new_tokens, use_cache=use_cache)

    @staticmethod
    def logits(model, idx):
        return model(idx)

    @staticmethod
    def optimizer(model):
        return gptlab_optimizer(model)

    @staticmethod
    def eval_loss(model, x, y):
        return gptlab_loss(model, x, y)

    @staticmethod
    def train_step(model, opt, x, y, autocast: bool) -> None:
        gptlab_train_step(model, opt, x, y, autocast)

    @staticmethod
    def save(model, folder: Path) -> None:
        from gptlab import save_model

        save_model(model, folder)

    @staticmethod
    def load(folder: Path, shape: Shape):
        from gptlab import load_model

        return load_model(folder)


# The functions below are the switch point for gptlab's training path in the benchmark: they call
# the optimizer builder and loss that `gptlab train` runs.
def gptlab_optimizer(model) -> torch.optim.Optimizer:
    """gptlab's own AdamW (decay on 2-D weights only, fused where the device has it), lr 4e-4."""
    from gptlab.training.optim import build_optimizer
    from gptlab.training.settings import TrainConfig

    return build_optimizer(model, TrainConfig(lr=4e-4), next(model.parameters()).device)


def gptlab_loss(model, x, y):
    """gptlab's training/eval loss: the chunked LM-head cross-entropy when the model has it."""
    if hasattr(model, "loss"):
        return model.loss(x, y)
    return cross_entropy(model(x), y)


def gptlab_train_step(model, opt, x, y, autocast: bool) -> None:
    with autocast_ctx(autocast):
        loss = gptlab_loss(model, x, y)
    loss.backward()
    opt.step()
    # set_to_none (the default) frees the gradients before the next forward, whose activations then
    # reuse that memory: measured peak RSS 3.85 GB vs 4.51 GB when zeroing in place (gpt2-small,
    # 4x256, plain loss), with no fewer page faults for keeping them.
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------- transformers
class Transformers:
    name = "transformers"
    note = "GPT2LMHeadModel, default attention"

    @staticmethod
    def build(shape: Shape, dtype: torch.dtype, for_training: bool):
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=shape.vocab_size, n_positions=shape.context_length, n_embd=shape.emb_dim,
            n_layer=shape.n_layers, n_head=shape.n_heads, resid_pdrop=shape.drop_rate,
            embd_pdrop=shape.drop_rate, attn_pdrop=shape.drop_rate,
        )
        return GPT2LMHeadModel(cfg).to(dtype)

    @staticmethod
    def generate(model, idx, new_tokens: int, use_cache: bool):
        return model.generate(
            idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=use_cache, pad_token_id=0,
        )

    @staticmethod
    def logits(model, idx):
        return model(idx).logits

    optimizer = staticmethod(plain_adamw)

    @staticmethod
    def eval_loss(model, x, y):
        return cross_entropy(model(x).logits.float(), y)

    @staticmethod
    def train_step(model, opt, x, y, autocast: bool) -> None:
        plain_train_step(Transformers.logits, model, opt, x, y, autocast)

    @staticmethod
    def save(model, folder: Path) -> None:
        model.save_pretrained(folder)  # safetensors by default

    @staticmethod
    def load(folder: Path, shape: Shape):
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(folder)


# ----------------------------------------------------------------------------------- llms-from-scratch
def book_cfg(shape: Shape) -> dict:
    return {
        "vocab_size": shape.vocab_size, "context_length": shape.context_length, "emb_dim": shape.emb_dim,
        "n_heads": shape.n_heads, "n_layers": shape.n_layers, "drop_rate": shape.drop_rate, "qkv_bias": True,
    }


def patch_book_kv_mask() -> None:
    """Fix llms_from_scratch 1.0.19's kv_cache GPT-2 attention, for this benchmark process only.

    The bug: its causal mask is sliced as `mask[:, -num_tokens:]` (the last *columns*) where the
    queries are the last *rows*, so a cached decoding step (1 query, S keys) builds a (S, 1) mask
    that cannot be applied to the (1, S) scores and the call fails. The replacement below keeps the
    package's computation (separate q/k/v projections, cache by concatenation, explicit softmax)
    and only takes the mask's last rows.
    """
    from llms_from_scratch.kv_cache import gpt2 as kv

    if getattr(kv.MultiHeadAttention, "_bench_patched", False):
        return

    def forward(self, x, use_cache=False, start_pos=0, cache=None):
        b, t, _ = x.shape
        split = (b, t, self.num_heads, self.head_dim)
        q = self.W_query(x).view(split).transpose(1, 2)
        k = self.W_key(x).view(split).transpose(1, 2)
        v = self.W_value(x).view(split).transpose(1, 2)
        if use_cache and cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        new_cache = (k, v) if use_cache else None
        s = k.shape[2]
        future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)[s - t :]  # rows of the queries
        scores = (q @ k.transpose(2, 3)).masked_fill_(future, float("-inf"))
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        ctx = (weights @ v).transpose(1, 2).contiguous().view(b, t, self.d_out)
        return self.out_proj(ctx), new_cache

    kv.MultiHeadAttention.forward = forward
    kv.MultiHeadAttention._bench_patched = True


def book_kv_generate(model, idx, new_tokens: int):
    """Greedy decoding with the package's kv_cache GPT-2 model (its KVCache, prefill then one token a step)."""
    from llms_from_scratch.kv_cache.utils import KVCache

    cache = KVCache(n_layers=len(model.trf_blocks))
    model.current_pos = 0
    with torch.no_grad():
        logits = model(idx, use_cache=True, cache=cache)
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
            logits = model(nxt, use_cache=True, cache=cache)
    return idx


class Book:
    name = "llms-from-scratch"
    note = "ch04.GPTModel (untied head) + ch05.generate; KV cache: kv_cache.gpt2 with its mask bug patched"

    @staticmethod
    def build(shape: Shape, dtype: torch.dtype, for_training: bool, kv: bool = False):
        if kv:
            patch_book_kv_mask()
            from llms_from_scratch.kv_cache.gpt2 import GPTModel
        else:
            from llms_from_scratch.ch04 import GPTModel
        return GPTModel(book_cfg(shape)).to(dtype)

    @staticmethod
    def generate(model, idx, new_tokens: int, use_cache: bool):
        if use_cache:
            return book_kv_generate(model, idx, new_tokens)
        from llms_from_scratch.ch05 import generate

        return generate(model, idx, new_tokens, context_size=model.pos_emb.num_embeddings)

    @staticmethod
    def logits(model, idx):
        return model(idx)

    optimizer = staticmethod(plain_adamw)

    @staticmethod
    def eval_loss(model, x, y):
        return cross_entropy(model(x).float(), y)

    @staticmethod
    def train_step(model, opt, x, y, autocast: bool) -> None:
        plain_train_step(Book.logits, model, opt, x, y, autocast)

    @staticmethod
    def save(model, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    @staticmethod
    def load(folder: Path, shape: Shape):
        from llms_from_scratch.ch04 import GPTModel
        from safetensors.torch import load_file

        model = GPTModel(book_cfg(shape))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model


CONTESTANTS = {c.name: c for c in (Gptlab, Transformers, Book)}
