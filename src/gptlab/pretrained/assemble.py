"""Build a GPTModel from another program's tensors, checking every shape before it is assigned.

The model is created on the meta device (no memory, no random init) and each tensor is read,
checked, converted and moved to its device one at a time, then assigned in place (`assign=True`):
loading never holds more than one full copy of the weights plus a single tensor in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import GPTConfig
from ..errors import GptlabError
from ..model import GPTModel


def _first(ts: list[Tensor]) -> Tensor:
    return ts[0]


@dataclass(frozen=True)
class Spec:
    """One gptlab tensor made from one or more source tensors of known shapes."""

    target: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Callable[[list[Tensor]], Tensor] = field(default=_first)


def transpose(ts: list[Tensor]) -> Tensor:
    """A Conv1D weight stored (in, out) -> nn.Linear's (out, in)."""
    return ts[0].t()


def squeeze_transpose(ts: list[Tensor]) -> Tensor:
    """OpenAI's Conv1D weight stored (1, in, out) -> nn.Linear's (out, in)."""
    return ts[0][0].t()


def concat_rows(ts: list[Tensor]) -> Tensor:
    """Separate query, key and value projections -> gptlab's fused qkv (q, k, v in that order)."""
    return torch.cat(ts, dim=0)


# (gptlab module, GPT-2 module, Conv1D (in, out) as multiples of the width, or None for a LayerNorm)
GPT2_LAYER = (
    ("norm1", "ln_1", None),
    ("att.qkv", "attn.c_attn", (1, 3)),
    ("att.out_proj", "attn.c_proj", (1, 1)),
    ("norm2", "ln_2", None),
    ("ff.fc", "mlp.c_fc", (1, 4)),
    ("ff.proj", "mlp.c_proj", (4, 1)),
)


def brief(exc: BaseException) -> str:
    """The first line of an exception's message (library messages can run to paragraphs)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first[:160] + ("..." if len(first) > 160 else "")
    return f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__


def describe(config: GPTConfig) -> str:
    return (
        f"vocab_size={config.vocab_size}, context_length={config.context_length}, emb_dim={config.emb_dim}, "
        f"n_layers={config.n_layers}"
    )


def likely_cause(got: tuple[int, ...], want: tuple[int, ...], config: GPTConfig) -> str:
    """A best guess at why a tensor has the wrong shape, for the error message."""
    if len(got) == 2 and got == want[::-1]:
        return "it looks transposed (GPT-2's Conv1D layers store weights as (in, out), nn.Linear as (out, in))"
    if len(got) == len(want) == 2 and got[1] == want[1] and want[0] in (config.vocab_size, config.context_length):
        return (
            "the vocabulary or context length differs from the config (added tokens, or a config.json "
            "from another model?)"
        )
    return "the weights were made for a different model size than the config describes"


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], origin: str, config: GPTConfig,
                config_source: str) -> None:
    if tuple(got) != tuple(want):
        raise GptlabError(
            f"{origin}: tensor {name} has shape {tuple(got)} but {config_source} ({describe(config)}) "
            f"expects {tuple(want)}; {likely_cause(tuple(got), tuple(want), config)}"
        )


def assemble(
    config: GPTConfig,
    specs: Iterable[Spec],
    fetch: Callable[[str], Tensor],
    origin: str,
    config_source: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> GPTModel:
    """A GPTModel in eval mode whose weights are `spec.combine(fetch(source) ...)` for every spec."""
    with torch.device("meta"):
        model = GPTModel(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        del expected["out_head.weight"]
    state: dict[str, Tensor] = {}
    for spec in specs:
        tensors = []
        for name, shape in zip(spec.sources, spec.shapes, strict=True):
            tensor = fetch(name)
            check_shape(name, tuple(tensor.shape), shape, origin, config, config_source)
            tensors.append(tensor)
        value = spec.combine(tensors)
        if tuple(value.shape) != expected[spec.target]:  # a bug in a layout table, not in the user's file
            raise AssertionError(f"{spec.target}: built {tuple(value.shape)}, model has {expected[spec.target]}")
        state[spec.target] = value.to(device=device, dtype=dtype or value.dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise AssertionError(f"layout table misses {missing[:3]}")
    if config.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def gpt2_specs(config: GPTConfig, name: Callable[[str, str], str], conv_shape: Callable[[int, int], tuple],
               conv_combine: Callable[[list[Tensor]], Tensor], ln_names: tuple[str, str]) -> list[Spec]:
    """Specs for a GPT-2-layout source (Hugging Face or OpenAI): `name(module, param)` spells the names."""
    d, w, b = config.emb_dim, ln_names[0], ln_names[1]
    specs = [
        Spec("tok_emb.weight", (name("wte", ""),), ((config.vocab_size, d),)),
        Spec("pos_emb.weight", (name("wpe", ""),), ((config.context_length, d),)),
    ]
    for i in range(config.n_layers):
        for ours, theirs, conv in GPT2_LAYER:
            ours, theirs = f"trf_blocks.{i}.{ours}", f"h{i}.{theirs}"
            if conv is None:
                specs.append(Spec(f"{ours}.weight", (name(theirs, w),), ((d,),)))
                specs.append(Spec(f"{ours}.bias", (name(theirs, b),), ((d,),)))
            else:
                n_in, n_out = conv[0] * d, conv[1] * d
                specs.append(Spec(f"{ours}.weight", (name(theirs, "w"),), (conv_shape(n_in, n_out),), conv_combine))
                specs.append(Spec(f"{ours}.bias", (name(theirs, "b"),), ((n_out,),)))
    specs.append(Spec("final_norm.weight", (name("ln_f", w),), ((d,),)))
    specs.append(Spec("final_norm.bias", (name("ln_f", b),), ((d,),)))
    if not config.tie_embeddings:
        specs.append(Spec("out_head.weight", (name("lm_head", ""),), ((config.vocab_size, d),)))
    return specs
