"""Compiled matrix-vector products for batch-1 decoding on CPU (`prepare_for_decoding(compile=True)`).

Decoding one token at batch 1 turns every Linear into a matrix-vector product that reads its whole
weight once, so its speed is the speed of streaming the weights from memory. On the development CPU
(2 cores, AMD EPYC) MKL's and oneDNN's kernels for that shape stream 13-25 GB/s, while a plain
reduction over the same tensor reads 27-31 GB/s. Written as multiply-and-sum over the weight's rows,
torch.compile (inductor's C++ backend) makes one vectorised, multi-threaded loop that reads each
weight once at about that speed: the gpt2-small LM head took 5.8 ms instead of 11.5 ms (float32) and
2.1 ms instead of 4.2 ms (bfloat16), and whole decoding ran 1.4-1.8x faster (README, bench/).

The cost is a one-time compile per weight shape (gpt2-small has five): about 12 s on 2 cores the
first time, about 3 s once inductor's on-disk cache holds them. Where torch.compile does not work
(no C++ compiler, unsupported Python), `use_compiled_gemv` says so and leaves the model as it was.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_compiled = None


def _gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """weight (O, I) @ x (I,) + bias, accumulated in float32 and returned in x's dtype."""
    y = (weight.float() * x.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def compiled_gemv():
    """The compiled `_gemv` (one graph per weight shape and dtype, made on first use)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_gemv, dynamic=False)
    return _compiled


class DecodeLinear(nn.Linear):
    """nn.Linear whose single-row calls without gradients (batch-1 decoding) use the compiled product.

    Everything else (prompts, batches, training) goes through F.linear as before; parameters, their
    names and saved files are those of nn.Linear.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == self.in_features and x.device.type == "cpu" and not torch.is_grad_enabled():
            y = compiled_gemv()(x.reshape(-1), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def _compile_works(dtype: torch.dtype) -> str | None:
    """None if a compiled product runs and is right here, else why not."""
    try:
        w, x, b = torch.randn(8, 16).to(dtype), torch.randn(16).to(dtype), torch.randn(8).to(dtype)
        with torch.inference_mode():
            got = compiled_gemv()(x, w, b)
        if not torch.allclose(got.float(), _gemv(x, w, b).float(), atol=1e-2, rtol=1e-2):
            return "the compiled product gave wrong values"
    except Exception as exc:  # any failure of the compiler stack means: stay eager
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def use_compiled_gemv(model: nn.Module) -> bool:
    """Give every CPU nn.Linear of `model` the compiled batch-1 path; False (model unchanged) if it cannot run.

    Weights are made row-major again (the compiled loop reads each output's row contiguously), which
    undoes prepare_for_decoding's column-major layout for eager decoding.
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"]
    if not linears:
        return False
    problem = _compile_works(linears[0].weight.dtype)
    if problem is not None:
        warnings.warn(f"torch.compile is not usable here ({problem}); decoding stays eager", stacklevel=2)
        return False
    for module in linears:
        if not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()
        module.__class__ = DecodeLinear
    return True
