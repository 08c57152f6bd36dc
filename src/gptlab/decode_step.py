"""Batch-1 decoding on CPU as one compiled graph per token (`prepare_for_decoding(model, compile=True)`).

Decoding one token at batch 1 reads every weight once, so its speed is the speed of streaming the
weights from memory; everything else is overhead to remove. Two things stand in the way in eager
PyTorch on CPU:

1. MKL's and oneDNN's kernels for a one-row matrix product stream the weights at 13-25 GB/s on the
   development CPU (2 cores, AMD EPYC), where a plain reduction over the same bytes reads 27-36 GB/s.
   Written as multiply-and-sum over the weight's rows, `(W.float() * x).sum(-1)`, inductor makes a
   vectorised two-thread loop that reads the weights at ~93% of that reduction's speed.
2. A step is ~100 small operations (12 blocks of layer norms, residual adds, GELU, attention over
   the cache, plus the cache writes); each costs Python and dispatch time, and in session 2's first
   version (one compiled call per Linear) 49 compiled calls' guards and wrappers took ~2 ms a token.

So the whole step -- embeddings, 12 blocks with their cache writes and attention, final norm, LM
head -- is one function compiled once by torch.compile into one C++ kernel with one OpenMP region.
The cached length is a dynamic dimension, so one graph serves every step. Each layer's cache slots
are separate graph inputs: written through one view of all layers, inductor copied the whole cache
at every write (step time grew with the length); through per-layer views it writes one slot.
Activations stay in float32 (bfloat16 weights are widened inside the product and the cache holds
the model's dtype), so bfloat16 results are closer to float32 than the eager bfloat16 path's.

Cost: one compile per model, done by `prepare_for_decoding`: ~50 s the first time on a machine (2
cores, gpt2-small), 12-14 s once inductor's on-disk cache holds the kernel. Where torch.compile
cannot run (no C++ compiler), it warns and the model decodes eagerly.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import GPTModel, KVCache


def _product(x: Tensor, linear: nn.Linear) -> Tensor:
    """linear(x) for one float32 vector x, as the multiply-and-sum inductor streams at full speed."""
    y = (linear.weight.float() * x).sum(-1)
    return y if linear.bias is None else y + linear.bias.float()


def _norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, x.shape, norm.weight.float(), norm.bias.float(), norm.eps)


def decode_step(model: GPTModel, token: Tensor, ks: list[Tensor], vs: list[Tensor]) -> tuple[Tensor, ...]:
    """Logits (V,) of the next token after `token` (1,), in float32, then the normalised inputs of the products.

    ks[i], vs[i]: layer i's cached keys/values as (H, S + 1, D) views; the last slot is written here
    (position S). Positions: the cache starts at position 0, as GPTModel.forward's default.
    Returning the layer norms' outputs makes inductor store each once: left internal, it fuses the
    normalisation into the product's loop and recomputes it for every weight row (a division
    and square root per element of the weights: the qkv and MLP products then ran at about half the
    memory speed).
    """
    H, D = model.config.n_heads, model.config.head_dim
    S1 = ks[0].shape[1]
    x = model.tok_emb.weight.index_select(0, token)[0].float()
    x = x + model.pos_emb.weight.narrow(0, S1 - 1, 1)[0].float()
    normed = []
    for i, block in enumerate(model.trf_blocks):
        normed.append(_norm(x, block.norm1))
        q, k, v = _product(normed[-1], block.att.qkv).view(3, H, D)
        ks[i][:, -1] = k.to(ks[i].dtype)
        vs[i][:, -1] = v.to(vs[i].dtype)
        scores = (ks[i].float() * q[:, None, :]).sum(-1) * D**-0.5  # (H, S + 1)
        weights = torch.softmax(scores, dim=-1)
        y = (weights[:, :, None] * vs[i].float()).sum(1)  # (H, D)
        x = x + _product(y.reshape(-1), block.att.out_proj)
        normed.append(_norm(x, block.norm2))
        h = F.gelu(_product(normed[-1], block.ff.fc), approximate="tanh")
        x = x + _product(h, block.ff.proj)
    normed.append(_norm(x, model.final_norm))
    logits = _product(normed[-1], model.out_head)
    return logits[: model.config.vocab_size], *normed


def _own_copy(fn):
    """`fn` with a code object of its own: torch.compile keeps one cache of graphs per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledDecoder:
    """GPTModel.forward hands it batch-1 single-token steps with a KV cache (see `applies`).

    Guards: before each call torch.compile checks that every input still looks as when it compiled.
    For the ~150 parameters that took ~0.3 ms a token (2-3% of a gpt2-small step), so the checks on
    the model's modules and parameters are skipped. That is safe here because each decoder compiles
    its own copy of `decode_step` (a graph never serves another model), the parameters are still
    read from the model at every call (so loaded or trained weights are used), and what could make
    the graph wrong -- another dtype or device -- is checked by `applies` instead.
    """

    def __init__(self, model: GPTModel) -> None:
        weight = model.tok_emb.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.fn = torch.compile(
            _own_copy(decode_step),
            dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )
        self.marked = False

    def applies(self, model: GPTModel, idx: Tensor, kv_cache: KVCache | None) -> bool:
        """True for the calls this graph was made for: one token, one row, a plain cache, no grad."""
        weight = model.tok_emb.weight
        return (
            kv_cache is not None and idx.shape == (1, 1) and kv_cache.valid is None
            and not model.training and not torch.is_grad_enabled()
            and weight.dtype == self.dtype and weight.device == self.device and kv_cache.k.dtype == self.dtype
        )

    def __call__(self, model: GPTModel, idx: Tensor, kv_cache: KVCache) -> Tensor:
        """Logits (1, 1, V) in the model's dtype; appends this token's keys/values to the cache."""
        S1 = kv_cache.length + 1
        ks = [kv_cache.k[i, 0, :, :S1] for i in range(kv_cache.k.shape[0])]
        vs = [kv_cache.v[i, 0, :, :S1] for i in range(kv_cache.v.shape[0])]
        if not self.marked:  # compile with the length symbolic, not once per length
            for t in ks + vs:
                torch._dynamo.mark_dynamic(t, 1)
            self.marked = True
        logits = self.fn(model, idx.reshape(1), ks, vs)[0]
        kv_cache.length = S1
        return logits.to(self.dtype).view(1, 1, -1)


def use_compiled_decoding(model: GPTModel) -> bool:
    """Compile `model`'s batch-1 decoding step now; False (model unchanged, a warning) if it cannot run.

    Checks the compiled step against the eager forward on a scratch cache, so a broken compiler
    stack is found here rather than in the middle of a generation.
    """
    if model.tok_emb.weight.device.type != "cpu":
        return False
    for module in model.modules():  # the product reads each output's row: undo the eager column-major layout
        if isinstance(module, nn.Linear) and not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()
    decoder = CompiledDecoder(model)
    problem, was_training = None, model.training
    try:
        model.eval()
        with torch.inference_mode():
            ids = torch.tensor([[0, 1]], device=decoder.device)
            cache = model.make_kv_cache(1, 3)
            model(ids[:, :1], kv_cache=cache)
            got = decoder(model, ids[:, 1:], cache).float()
            want = model(ids, last_only=True).float()
        if not torch.allclose(got, want, atol=5e-2, rtol=5e-2):
            problem = f"the compiled step differs from the eager forward by {(got - want).abs().max():.3g}"
    except Exception as exc:  # any failure of the compiler stack means: stay eager
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.train(was_training)
    if problem is not None:
        warnings.warn(f"torch.compile is not usable here ({problem}); decoding stays eager", stacklevel=2)
        return False
    model.compiled_decoder = decoder
    return True
