"""GPTModel: the GPT-2 architecture in one readable file, with a pre-allocated KV cache.

Shape names used in comments: B batch, T tokens in this call, S tokens already cached, H heads,
D head width, C = H * D model width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GPTConfig
from .errors import UsageError
from .loss import chunked_cross_entropy


class KVCache:
    """Keys and values of every layer for incremental decoding, allocated once.

    Buffers are (n_layers, B, H, max_len, D); `length` counts the positions already filled, so a step
    writes into the buffer in place instead of concatenating (no per-token reallocation).
    `valid` (B, max_len) remembers which cached positions are real tokens when prompts were padded.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_len = config.context_length if max_len is None else max_len
        if not 0 < max_len <= config.context_length:
            raise UsageError(f"KV cache length must be in 1..{config.context_length}, got {max_len}")
        shape = (config.n_layers, batch_size, config.n_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid: Tensor | None = None
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        """Forget everything cached; the buffers are reused."""
        self.length = 0
        self.valid = None

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the given batch rows (e.g. to drop finished sequences)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        if self.valid is not None:
            self.valid = self.valid[rows]

    @classmethod
    def over(cls, k: Tensor, v: Tensor, length: int = 0) -> KVCache:
        """A cache over existing (n_layers, B, H, max_len, D) buffers (no copy), `length` positions filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.valid, cache.length = k, v, None, length
        return cache


class SlotKVCache:
    """Keys and values for continuous batching: one slot per sequence, each slot with its own length.

    Buffers are (slots, n_layers, H, max_len, D): slot-major, so that one slot is laid out exactly like a
    batch-1 KVCache and `view(slot)` runs a lone sequence through the plain single-sequence path (and the
    C CPU kernel) with no copy. `GPTModel.forward_slots` runs the contiguous slots first..first+B-1
    together, each row at its own positions; callers keep their running sequences in the lowest slots
    (`move` fills the hole a finished one leaves), so a decoding step's rows are one slice of the buffers.
    """

    def __init__(self, config: GPTConfig, slots: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.max_len = config.context_length if max_len is None else max_len
        if not 0 < self.max_len <= config.context_length:
            raise UsageError(f"KV cache length must be in 1..{config.context_length}, got {self.max_len}")
        self._shape = (config.n_layers, config.n_heads, self.max_len, config.head_dim)
        self.k = torch.zeros((slots, *self._shape), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * slots  # positions filled in each slot

    @property
    def slots(self) -> int:
        return self.k.shape[0]

    def grow(self, slots: int) -> None:
        """Make room for `slots` slots, keeping what the existing ones hold (the buffers are reallocated)."""
        if slots <= self.slots:
            return
        extra = torch.zeros((slots - self.slots, *self._shape), device=self.k.device, dtype=self.k.dtype)
        self.k = torch.cat([self.k, extra])
        self.v = torch.cat([self.v, torch.zeros_like(extra)])
        self.lengths += [0] * (slots - len(self.lengths))

    def view(self, slot: int) -> KVCache:
        """Slot `slot` as a batch-1 KVCache sharing its memory; copy `.length` back into `lengths` after use."""
        return KVCache.over(self.k[slot].unsqueeze(1), self.v[slot].unsqueeze(1), self.lengths[slot])

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src`'s filled positions into slot `dst` (which then has the same length)."""
        n = self.lengths[src]
        self.k[dst, :, :, :n] = self.k[src, :, :, :n]
        self.v[dst, :, :, :n] = self.v[src, :, :, :n]
        self.lengths[dst] = n


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.drop_rate = config.drop_rate
        # One fused projection for queries, keys and values: a single matmul instead of three.
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.resid_drop = nn.Dropout(config.drop_rate)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        write_pos: Tensor | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k_buf, v_buf = cache
            if write_pos is None:
                k_buf[:, :, start : start + T] = k
                v_buf[:, :, start : start + T] = v
            else:  # rows at their own positions (SlotKVCache): row b's tokens go to write_pos[b]
                rows = torch.arange(B, device=x.device)[:, None]
                k_buf[rows, :, write_pos] = k.transpose(1, 2)
                v_buf[rows, :, write_pos] = v.transpose(1, 2)
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]
        # Without an explicit mask, a full causal prompt (no cache offset) uses the fused causal kernel;
        # a single decoding step attends to every cached key and needs no mask at all.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.drop_rate if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.out_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.proj = nn.Linear(4 * config.emb_dim, config.emb_dim)
        self.drop = nn.Dropout(config.drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 uses the tanh approximation of GELU; the exact erf form breaks parity with its weights.
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.att = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor, mask: Tensor | None, cache=None, start: int = 0,
                write_pos: Tensor | None = None) -> Tensor:
        x = x + self.att(self.norm1(x), mask, cache, start, write_pos)
        return x + self.ff(self.norm2(x))


class GPTModel(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.tok_emb = nn.Embedding(V, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.out_head = self.make_head(config)
        self.tie_weights()
        # Set by prepare_for_decoding: batch-1 cached steps on CPU in the C kernel (generation/kernel.py),
        # as are forward_slots' single-token rows, and single-token steps compiled over static caches
        # (generation/compiled.py), used by generate.
        self.cpu_decoder = None
        self.compiled_decoder = None
        # The tokenizer the model reads and writes (gptlab.tokenizer): None means GPT-2's. load_pretrained
        # and gptlab train set it; save_model stores it beside the weights.
        self.tokenizer = None
        if not self.tok_emb.weight.is_meta:  # a meta model (shapes only, weights loaded later) skips it
            self.reset_parameters()

    def make_head(self, config: GPTConfig) -> nn.Module:
        """The layer on top of the final norm: the LM head over the (padded) vocabulary; a classifier
        (finetune/classifier.py) puts a Linear over its classes here instead."""
        return nn.Linear(config.emb_dim, config.padded_vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head when the config asks for it (GPT-2's choice)."""
        if self.config.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.proj.weight, mean=0.0, std=residual_std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` leaves out the position embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache on the model's device and dtype."""
        w = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    def make_slot_cache(self, slots: int, max_len: int | None = None) -> SlotKVCache:
        """A continuous-batching KV cache (one slot per sequence) on the model's device and dtype."""
        w = self.tok_emb.weight
        return SlotKVCache(self.config, slots, max_len, device=w.device, dtype=w.dtype)

    def forward(
        self,
        idx: Tensor,
        *,
        kv_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T).

        kv_cache: continue from the cached positions and append this call's keys/values.
        position_ids: (B, T) positions, for left-padded batches; default start..start+T-1.
        attention_mask: (B, T) 1 for real tokens, 0 for padding, for the tokens of this call (the
            cache remembers earlier calls'). Padded keys are never attended to.
        last_only: compute logits only for the last position (decoding needs nothing else).
        """
        if idx.dim() != 2:
            raise UsageError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.context_length
        if start + T > limit:
            raise UsageError(
                f"input of {start + T} tokens is longer than the model's context of {limit}; "
                "crop it to the last context_length tokens"
            )
        if position_ids is None and attention_mask is None and self.cpu_decoder is not None:
            if self.cpu_decoder.applies(self, idx, kv_cache, last_only):
                return self.cpu_decoder(self, idx, kv_cache)
        x = self.hidden_states(idx, kv_cache, position_ids, attention_mask)
        if last_only:
            x = x[:, -1:, :]
        logits = self.out_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits

    def hidden_states(self, idx: Tensor, kv_cache: KVCache | None = None, position_ids: Tensor | None = None,
                      attention_mask: Tensor | None = None) -> Tensor:
        """The trunk shared by `forward` and `loss`: embeddings, blocks, final norm -> (B, T, C)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(position_ids))
        mask = self._attention_mask(B, T, start, kv_cache, attention_mask, idx.device)
        for i, block in enumerate(self.trf_blocks):
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, mask, cache, start)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.final_norm(x)

    def forward_slots(self, idx: Tensor, cache: SlotKVCache, first: int = 0,
                      counts: list[int] | None = None) -> Tensor:
        """Logits (B, V) after each row's last new token; row b continues slot first + b of `cache`.

        Row b holds counts[b] new tokens (right-padded to T; default all T) that follow the slot's own
        cached positions: positions, cache writes and the causal mask are per row, so sequences of
        different lengths decode as one batch (continuous batching, gptlab.serve). Padding's keys land
        past the row's end, where its next tokens overwrite them; no row attends past its own end.
        """
        B, T = idx.shape
        counts = [T] * B if counts is None else counts
        starts = cache.lengths[first : first + B]
        if len(starts) != B or len(counts) != B or not all(0 < n <= T for n in counts):
            raise UsageError(f"forward_slots: {B} rows need slots {first}..{first + B - 1} and counts in 1..{T}")
        if max(starts) + T > cache.max_len:
            raise UsageError(f"input reaches position {max(starts) + T}, past the cache's {cache.max_len}")
        if T == 1 and self.cpu_decoder is not None and self.cpu_decoder.applies_rows(self, idx, cache):
            logits = self.cpu_decoder.rows(self, idx, cache, first)  # every row in one pass of the C kernel
        else:
            logits = self._slot_logits(idx, cache, first, starts, counts)
        for b, n in enumerate(counts):
            cache.lengths[first + b] += n
        return logits

    def _slot_logits(self, idx: Tensor, cache: SlotKVCache, first: int, starts: list[int], counts: list[int]) -> Tensor:
        """forward_slots in eager PyTorch."""
        (B, T), dev = idx.shape, idx.device
        end = max(starts) + T
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        mask = (torch.arange(end, device=dev) <= pos[..., None])[:, None]  # (B, 1, T, end): keys up to itself
        for i, block in enumerate(self.trf_blocks):
            x = block(x, mask, (cache.k[first : first + B, i], cache.v[first : first + B, i]), end - T, pos)
        last = torch.tensor(counts, device=dev) - 1
        logits = self.out_head(self.final_norm(x[torch.arange(B, device=dev), last]))
        return logits[..., : self.config.vocab_size]

    def loss(self, idx: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy of `idx` (B, T) against `targets` (B, T), memory-lean.

        Same value and gradients as F.cross_entropy(self(idx).flatten(0, 1), targets.flatten()) up to
        float rounding, but the LM head runs in row chunks (gptlab.loss), so the (B, T, V) logits,
        their log-softmax and their gradient are never allocated: less memory, less memory traffic.
        """
        if idx.dim() != 2 or targets.shape != idx.shape:
            raise UsageError(
                f"idx and targets must both have shape (batch, tokens), got {tuple(idx.shape)} and {tuple(targets.shape)}"
            )
        T = idx.shape[1]
        if T > self.config.context_length:
            raise UsageError(f"input of {T} tokens is longer than the model's context of {self.config.context_length}")
        x = self.hidden_states(idx)
        return chunked_cross_entropy(x.flatten(0, 1), self.out_head.weight, targets.flatten(),
                                     self.config.vocab_size, ignore_index)

    @staticmethod
    def _attention_mask(
        B: int, T: int, start: int, kv_cache: KVCache | None, attention_mask: Tensor | None, device
    ) -> Tensor | None:
        """A boolean (B|1, 1, T, S+T) mask where one is needed, else None (the fast fused paths)."""
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise UsageError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
            if kv_cache is not None:
                if kv_cache.valid is None:
                    kv_cache.valid = torch.ones(B, kv_cache.max_len, dtype=torch.bool, device=device)
                kv_cache.valid[:, start : start + T] = attention_mask.bool()
            else:
                valid = attention_mask.bool()
        if kv_cache is not None and kv_cache.valid is not None:
            valid = kv_cache.valid[:, : start + T]
        if valid is None and (start == 0 or T == 1):
            return None
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        k_pos = torch.arange(start + T, device=device)[None, :]
        mask = (k_pos <= q_pos)[None]
        if valid is not None:
            # A padded query may see only itself, so no row is fully masked (which would give NaN).
            mask = (mask & valid[:, None, :]) | (k_pos == q_pos)[None]
        return mask[:, None]


def wrapper_layers(model: nn.Module) -> Iterator[nn.Module]:
    """`model`, then each module wrapped inside it: torch.compile's `_orig_mod`, DDP's `module`."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        yield model
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DistributedDataParallel wrappers.

    FSDP2's fully_shard changes the module in place (no wrapper), so it is returned as is; its
    parameters are sharded, so save it with distributed.model_state_dict, not state_dict().
    """
    *_, inner = wrapper_layers(model)
    return inner


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * L * C * T.

    N counts the weights of every matmul: 12 * C^2 per layer (qkv 3C^2, out 1C^2, MLP 8C^2) plus the
    LM head (padded V * C); embedding look-ups cost no FLOPs, biases and norms are negligible. Each
    weight costs 2 FLOPs per token forward and 4 backward, hence 6N. Attention scores and their
    weighted sum add 2 * 2 * T * C per layer forward (x3 with backward): 12 * L * C * T, counted
    without the causal half-saving, as in the PaLM paper's MFU (appendix B) and nanoGPT.
    """
    T = config.context_length if seq_len is None else seq_len
    C, L = config.emb_dim, config.n_layers
    n_matmul = 12 * L * C * C + config.padded_vocab_size * C
    return 6.0 * n_matmul + 12.0 * L * C * T


def model_info(config: GPTConfig) -> dict:
    """Parameter counts and memory needs of a config, from a model on the meta device (no memory used)."""
    with torch.device("meta"):
        model = GPTModel(config)
    n = model.num_parameters()
    return {
        "config": config.to_dict(),
        "parameters": n,
        "non_embedding_parameters": n - model.tok_emb.weight.numel() - model.pos_emb.weight.numel(),
        "weights_fp32_bytes": 4 * n,
        "weights_bf16_bytes": 2 * n,
        # fp32 weights + fp32 grads + AdamW's two fp32 moments; activations come on top.
        "train_adamw_fp32_bytes": 16 * n,
    }
