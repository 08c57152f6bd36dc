"""State dicts saved by the book's GPTModel ("Build a Large Language Model (From Scratch)").

The book saves `torch.save(model.state_dict(), "model.pth")`, or a dict with `model_state_dict` (and
`optimizer_state_dict`) in "model_and_optimizer.pth". Its names: `tok_emb, pos_emb,
trf_blocks.{i}.att.W_query/W_key/W_value/out_proj, ff.layers.0/2, norm1/norm2.scale/shift,
final_norm.scale/shift, out_head` (a separate, untied head); `att.mask` is a causal-mask buffer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..model import GPTModel
from ..storage.safe_load import check_tensor_set, safe_torch_load
from .assemble import Spec, assemble, brief, concat_rows

# GPT-2's head count for its four widths: the only defaults that are facts, not guesses.
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_BOOK_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
_WRAPPERS = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel prefixes


def read_book_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model's state_dict from a book checkpoint (weights_only: nothing is unpickled blindly)."""
    path = Path(path)
    try:
        obj = safe_torch_load(path)
    except UsageError:
        raise
    except GptlabError as exc:
        if str(exc).startswith("refusing"):  # a pickle that would run code: say so, do not blur it
            raise
        raise GptlabError(f"cannot read {path} as a PyTorch checkpoint of weights; it may be damaged") from None
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises many types for damaged or non-weights pickles
        raise GptlabError(f"cannot read {path} as a PyTorch checkpoint of weights ({brief(exc)}); "
                          "it may be damaged or hold more than weights") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict (expected a dict of tensors or one with model_state_dict)")
    state = {}
    for name, value in obj.items():
        for prefix in _WRAPPERS:
            name = name.removeprefix(prefix)
        state[name] = value
    return state


def is_book_state(state: dict[str, Tensor]) -> bool:
    return "tok_emb.weight" in state and any(k.endswith("att.W_query.weight") for k in state)


def book_config(state: dict[str, Tensor], path: Path) -> tuple[GPTConfig, str]:
    """The config: from a config.json beside the file (the book's dict), else read off the tensors."""
    if "tok_emb.weight" not in state or "pos_emb.weight" not in state:
        raise UsageError(f"{path} is not a book GPTModel state_dict (no tok_emb.weight / pos_emb.weight)")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    vocab, width = state["tok_emb.weight"].shape
    inferred = {
        "vocab_size": vocab, "context_length": state["pos_emb.weight"].shape[0], "emb_dim": width,
        "n_layers": max(layers) + 1 if layers else 0, "drop_rate": 0.1,
        "qkv_bias": "trf_blocks.0.att.W_query.bias" in state,
    }
    config_path = path.parent / "config.json"
    if config_path.is_file():
        try:
            given = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read {config_path}: {exc}") from None
        if not isinstance(given, dict) or "n_heads" not in given:
            raise UsageError(f"{config_path} has no n_heads; it should hold the book's config dict")
        fields = {k: given[k] for k in _BOOK_FIELDS if k in given}
        return GPTConfig(**{**inferred, **fields, "tie_embeddings": False}), str(config_path)
    if width not in GPT2_HEADS:
        raise UsageError(
            f"{path}: the number of attention heads cannot be read off the weights (width {width}); put a "
            "config.json with the book's config dict (vocab_size, context_length, emb_dim, n_heads, n_layers, "
            "drop_rate, qkv_bias) beside the file"
        )
    return GPTConfig(**inferred, n_heads=GPT2_HEADS[width], tie_embeddings=False), f"the shapes in {path.name}"


def book_specs(config: GPTConfig) -> list[Spec]:
    d, V = config.emb_dim, config.vocab_size
    specs = [
        Spec("tok_emb.weight", ("tok_emb.weight",), ((V, d),)),
        Spec("pos_emb.weight", ("pos_emb.weight",), ((config.context_length, d),)),
    ]
    for i in range(config.n_layers):
        b, t = f"trf_blocks.{i}.", f"trf_blocks.{i}."
        qkv = tuple(f"{b}att.W_{n}" for n in ("query", "key", "value"))
        specs.append(Spec(f"{t}att.qkv.weight", tuple(f"{n}.weight" for n in qkv), ((d, d),) * 3, concat_rows))
        if config.qkv_bias:
            specs.append(Spec(f"{t}att.qkv.bias", tuple(f"{n}.bias" for n in qkv), ((d,),) * 3, concat_rows))
        for ours, theirs, shape_w in (("att.out_proj", "att.out_proj", (d, d)), ("ff.fc", "ff.layers.0", (4 * d, d)),
                                      ("ff.proj", "ff.layers.2", (d, 4 * d))):
            specs.append(Spec(f"{t}{ours}.weight", (f"{b}{theirs}.weight",), (shape_w,)))
            specs.append(Spec(f"{t}{ours}.bias", (f"{b}{theirs}.bias",), ((shape_w[0],),)))
        for norm in ("norm1", "norm2"):
            specs.append(Spec(f"{t}{norm}.weight", (f"{b}{norm}.scale",), ((d,),)))
            specs.append(Spec(f"{t}{norm}.bias", (f"{b}{norm}.shift",), ((d,),)))
    specs.append(Spec("final_norm.weight", ("final_norm.scale",), ((d,),)))
    specs.append(Spec("final_norm.bias", ("final_norm.shift",), ((d,),)))
    specs.append(Spec("out_head.weight", ("out_head.weight",), ((V, d),)))
    return specs


def load_book(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> GPTModel:
    """Load a book checkpoint (model.pth or model_and_optimizer.pth) into a GPTModel."""
    path = Path(path)
    state = read_book_state(path)
    config, config_source = book_config(state, path)
    specs = book_specs(config)
    used = {s for spec in specs for s in spec.sources}
    found = {k for k in state if not re.fullmatch(r"trf_blocks\.\d+\.att\.mask", k)}  # the causal-mask buffers
    # Only unexpected names are refused here; a missing one gets its own message when it is read.
    check_tensor_set(f"{path} (the book's GPTModel)", found, used, optional=used,
                     hint=f"check n_layers / qkv_bias in {config_source}")

    def fetch(name: str) -> Tensor:
        if name not in state:
            raise GptlabError(f"{path} has no tensor {name}, which {config_source} implies; "
                              "check n_layers / qkv_bias there")
        return state[name]

    return assemble(config, specs, fetch, str(path), config_source, device, dtype)
