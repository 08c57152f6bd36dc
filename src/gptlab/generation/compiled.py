"""Decoding steps compiled with torch.compile over a static KV cache (`prepare_for_decoding(model, compile=True)`).

On a GPU, one decoding step of a small model is a few hundred tiny kernel launches, and the launches,
not the arithmetic or the memory, set the speed. The remedy (as in gpt-fast) is a step whose shapes
never change, so torch.compile can fuse it and capture it in a CUDA graph (mode "reduce-overhead"),
replayed by one launch per token:
- the keys and values live in buffers of a fixed size, the whole context, one per batch size, owned
  by the decoder (module buffers, so the graph may write into them);
- the step takes the token ids, the column the new keys go to, each row's position, and which cached
  columns are real (padding-aware), all as tensors, and attends over the whole buffer with a mask.
Prompts still run through the eager forward (writing into the same buffers); only single-token steps
take the compiled path. Results are the eager path's up to float rounding (greedy tokens match in the
tests). On CPU the same step compiles with inductor; the C kernel (`kernel="auto"`) is faster there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import GPTModel, KVCache


class StaticCaches(nn.Module):
    """Full-context key/value buffers for one batch size: (n_layers, B, H, context, D) each."""

    def __init__(self, model: GPTModel, batch_size: int) -> None:
        super().__init__()
        cfg, w = model.config, model.tok_emb.weight
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.context_length, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=w.device, dtype=w.dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=w.device, dtype=w.dtype), persistent=False)

    def kv_cache(self) -> KVCache:
        """A KVCache over these buffers, empty: the eager forward fills it the usual way."""
        cache = KVCache.__new__(KVCache)
        cache.k, cache.v, cache.valid, cache.length = self.k, self.v, None, 0
        return cache


class DecodeStep(nn.Module):
    """One single-token step of `model` over a StaticCaches, every shape fixed."""

    def __init__(self, model: GPTModel, caches: StaticCaches) -> None:
        super().__init__()
        self.model, self.caches = model, caches

    def forward(self, idx: Tensor, column: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """idx (B, 1), column () the cache column of the new token, positions (B,), valid (B, S) bool -> logits (B, V)."""
        m, cfg = self.model, self.model.config
        B, H, D = idx.shape[0], cfg.n_heads, cfg.head_dim
        x = m.tok_emb(idx[:, 0]) + m.pos_emb(positions)  # (B, C)
        keys = torch.arange(cfg.context_length, device=idx.device)
        mask = (valid & (keys <= column))[:, None, None, :]  # (B, 1, 1, S): written columns up to this one
        for i, block in enumerate(m.trf_blocks):
            q, k, v = block.att.qkv(block.norm1(x)).view(B, 3, H, D).unbind(1)
            self.caches.k[i].index_copy_(2, column.view(1), k[:, :, None])
            self.caches.v[i].index_copy_(2, column.view(1), v[:, :, None])
            y = F.scaled_dot_product_attention(q[:, :, None], self.caches.k[i], self.caches.v[i], attn_mask=mask)
            x = x + block.att.out_proj(y.reshape(B, H * D))
            x = x + block.ff(block.norm2(x))
        return m.out_head(m.final_norm(x))[:, : cfg.vocab_size]


class CompiledDecoder:
    """The compiled step for each batch size (up to `max_batch`), and the static caches it writes into."""

    def __init__(self, model: GPTModel, max_batch: int = 8, mode: str | None = None, backend: str = "inductor") -> None:
        self.model, self.max_batch = model, max_batch
        cuda = model.tok_emb.weight.device.type == "cuda"
        self.mode = mode if mode is not None else ("reduce-overhead" if cuda else None)
        self.backend = backend
        self.steps: dict[int, tuple[StaticCaches, nn.Module, Tensor]] = {}

    def kv_cache(self, batch_size: int) -> KVCache | None:
        """A KVCache over the static buffers for this batch size (None: too big, the eager cache serves it)."""
        if not 0 < batch_size <= self.max_batch:
            return None
        if batch_size not in self.steps:
            caches = StaticCaches(self.model, batch_size)
            step = torch.compile(DecodeStep(self.model, caches), mode=self.mode, backend=self.backend,
                                 fullgraph=True, dynamic=False)
            every_column = torch.ones(batch_size, self.model.config.context_length, dtype=torch.bool,
                                      device=self.model.tok_emb.weight.device)
            self.steps[batch_size] = (caches, step, every_column)
        return self.steps[batch_size][0].kv_cache()

    def applies(self, idx: Tensor, cache: KVCache | None) -> bool:
        """A single-token step on one of this decoder's caches, with the model in eval mode and no grad."""
        entry = self.steps.get(idx.shape[0]) if idx.dim() == 2 else None
        return (entry is not None and cache is not None and cache.k is entry[0].k and idx.shape[1] == 1
                and not self.model.training and not torch.is_grad_enabled())

    def __call__(self, idx: Tensor, cache: KVCache, position_ids: Tensor | None) -> Tensor:
        """Logits (B, 1, V) of the step; appends its keys/values to `cache`."""
        B, device = idx.shape[0], idx.device  # noqa: N806
        column = torch.tensor(cache.length, device=device)
        positions = position_ids[:, 0] if position_ids is not None else column.expand(B)
        _, step, every_column = self.steps[B]
        logits = step(idx, column, positions, cache.valid if cache.valid is not None else every_column)
        if cache.valid is not None:
            cache.valid[:, cache.length] = True
        cache.length += 1
        return logits[:, None]
