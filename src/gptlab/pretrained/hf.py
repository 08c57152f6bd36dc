"""Hugging Face GPT-2 folders: import (config.json + model.safetensors or pytorch_model.bin) and export.

Hugging Face keeps OpenAI's layout: `transformer.wte/wpe/h.{i}.ln_1/attn.c_attn/attn.c_proj/ln_2/
mlp.c_fc/mlp.c_proj/ln_f`, Conv1D weights stored (in, out) (nn.Linear's transpose), `lm_head`
tied to `wte`. Files saved from a bare GPT2Model have no `transformer.` prefix; both are accepted.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..model import GPTModel, unwrap_model
from ..storage.files import atomic_path, write_json
from ..storage.safe_load import check_tensor_set, inspect_safetensors, safe_torch_load
from ..tokenizer import GPT2_VOCAB_SIZE, Tokenizer, as_tokenizer
from ..tokenizer.hf_files import write_hf_tokenizer
from .assemble import GPT2_LAYER, assemble, brief, gpt2_specs, transpose

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
_GPT2_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}
_TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}  # all GPT-2's tanh approximation
# Non-weight buffers some versions of transformers saved (the causal mask); never needed.
_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


def looks_like_hf_config(data: object) -> bool:
    return isinstance(data, dict) and ("model_type" in data or "n_embd" in data or "architectures" in data)


def hf_weight_files(folder: Path) -> Path | None:
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def config_from_hf(data: dict, source: str) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config dict; anything that is not plain GPT-2 is refused."""
    model_type = data.get("model_type", "gpt2")
    archs = set(data.get("architectures") or ["GPT2LMHeadModel"])
    if model_type != "gpt2" or not archs & _GPT2_ARCHITECTURES:
        raise UsageError(
            f"{source} describes a {model_type!r} model ({', '.join(sorted(archs))}), not GPT-2; "
            "gptlab loads GPT-2-architecture models only"
        )
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
        if not isinstance(data.get(key), int):
            raise UsageError(f"{source} lacks an integer {key}; is this a GPT-2 config.json?")
    d = data["n_embd"]
    problems = []
    if data.get("activation_function", "gelu_new") not in _TANH_GELUS:
        problems.append(f"activation_function {data['activation_function']!r} (gptlab uses GELU's tanh form)")
    if data.get("n_inner") not in (None, 4 * d):
        problems.append(f"n_inner {data['n_inner']} (gptlab's MLP is 4 x n_embd = {4 * d})")
    if abs(float(data.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {data['layer_norm_epsilon']} (gptlab uses 1e-5)")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if data.get(flag):
            problems.append(f"{flag}=true")
    if data.get("scale_attn_weights", True) is False:
        problems.append("scale_attn_weights=false")
    if problems:
        raise UsageError(f"{source}: unsupported GPT-2 variant: {'; '.join(problems)}")
    return GPTConfig(
        vocab_size=data["vocab_size"], context_length=data["n_positions"], emb_dim=d, n_heads=data["n_head"],
        n_layers=data["n_layer"], drop_rate=float(data.get("resid_pdrop", 0.1)), qkv_bias=True,
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
    )


def _hf_name(module: str, param: str) -> str:
    if module == "lm_head":
        return "lm_head.weight"
    module = re.sub(r"^h(\d+)", r"h.\1", module)
    return f"{module}.{ {'': 'weight', 'w': 'weight', 'b': 'bias'}.get(param, param) }"


def _open_tensors(path: Path) -> tuple[list[str], Callable[[str], Tensor]]:
    """(names, lazy getter) for a safetensors file, a sharded safetensors index or a pytorch_model.bin."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.name == BIN_NAME:
            try:  # memory-mapped when the file is in torch's zip format; old pickles load whole
                state = safe_torch_load(path, mmap=True)
            except GptlabError as exc:
                if "refusing" in str(exc):
                    raise
                state = safe_torch_load(path)
            return list(state), state.__getitem__
        if path.name == SAFETENSORS_INDEX_NAME:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
            for f in files:  # byte ranges checked against each file before it is mapped
                inspect_safetensors(path.parent / f)
            handles = {f: safe_open(str(path.parent / f), framework="pt") for f in files}
            return list(weight_map), lambda name: handles[weight_map[name]].get_tensor(name)
        inspect_safetensors(path)
        handle = safe_open(str(path), framework="pt")
        return list(handle.keys()), handle.get_tensor
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        raise GptlabError(f"cannot read {path} ({brief(exc)}); it may be truncated: download it again") from None


def _check_header_shapes(path: Path, specs, prefixed: dict[str, str], config_name: str) -> None:
    """No tensor in the header may be larger than the config's, checked before any tensor is read (other
    mismatches get assemble's more specific message when the tensor is read)."""
    import math

    header = inspect_safetensors(path)
    for spec in specs:
        for source, shape in zip(spec.sources, spec.shapes, strict=True):
            found = header.get(prefixed.get(source, ""))
            if found is not None and math.prod(found[1]) > math.prod(shape):
                raise GptlabError(f"{path}: tensor {prefixed[source]} has shape {found[1]} but {config_name} "
                                  f"expects {tuple(shape)}; the weights belong to another model size")


def load_hf(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            weights: str | os.PathLike | None = None) -> GPTModel:
    """Load a Hugging Face GPT-2 folder (or `weights` with the folder's config.json)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path} not found: Hugging Face weights need their folder's config.json beside them")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {config_path}: {exc}") from None
    config = config_from_hf(data, str(config_path))
    path = Path(weights) if weights is not None else hf_weight_files(folder)
    if path is None:
        raise UsageError(f"{folder} has a GPT-2 config.json but no {SAFETENSORS_NAME} or {BIN_NAME}")
    names, get = _open_tensors(path)
    prefixed = {n.removeprefix("transformer."): n for n in names if not _IGNORED.match(n)}
    specs = gpt2_specs(config, _hf_name, lambda n_in, n_out: (n_in, n_out), transpose, ("weight", "bias"))
    used = {s for spec in specs for s in spec.sources}
    if path.suffix == ".safetensors":
        _check_header_shapes(path, specs, prefixed, str(config_path))
    allowed = used | {"lm_head.weight"}
    # Only unexpected names are refused here; a missing one gets its own message when it is read.
    check_tensor_set(f"{path} (a GPT-2 language model)", prefixed, allowed, optional=allowed,
                     hint="is it another architecture or a model with another head?")

    def fetch(name: str) -> Tensor:
        if name not in prefixed:
            raise GptlabError(
                f"{path} has no tensor {name} though {config_path.name} says n_layer={config.n_layers}; "
                "the file is incomplete or belongs to another model"
            )
        return get(prefixed[name])

    return assemble(config, specs, fetch, str(path), str(config_path), device, dtype)


# --- export ---------------------------------------------------------------------------------------


def _eot_id(config: GPTConfig, tokenizer: Tokenizer | None) -> int | None:
    """The tokenizer's <|endoftext|> id where the vocabulary has it (transformers warns otherwise)."""
    eot = as_tokenizer(tokenizer).eot_id
    return eot if eot < config.vocab_size else None


def hf_config(config: GPTConfig, tokenizer: Tokenizer | None = None) -> dict:
    """transformers' GPT2Config fields for a gptlab config (bos/eos: the tokenizer's <|endoftext|>, GPT-2's
    by default)."""
    eot = _eot_id(config, tokenizer)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def hf_state(model: GPTModel) -> dict[str, Tensor]:
    """The model's weights under transformers' GPT2LMHeadModel names (tied head stored once)."""
    config = model.config
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    V = config.vocab_size  # drop the rows added by vocab_multiple padding
    out = {"transformer.wte.weight": ours["tok_emb.weight"][:V], "transformer.wpe.weight": ours["pos_emb.weight"]}
    for i in range(config.n_layers):
        for mine, theirs, conv in GPT2_LAYER:
            for param in ("weight", "bias"):
                value = ours.get(f"trf_blocks.{i}.{mine}.{param}")
                if value is None:  # qkv_bias=False: GPT-2 always has the bias, so store zeros
                    value = torch.zeros(3 * config.emb_dim, dtype=ours["tok_emb.weight"].dtype)
                if conv is not None and param == "weight":
                    value = value.t()
                out[f"transformer.h.{i}.{theirs}.{param}"] = value
    out["transformer.ln_f.weight"] = ours["final_norm.weight"]
    out["transformer.ln_f.bias"] = ours["final_norm.bias"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = ours["out_head.weight"][:V]
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_generation_config(config: GPTConfig, tokenizer: Tokenizer | None = None) -> dict:
    """generation_config.json: the tokenizer's <|endoftext|> as bos/eos (and padding, so that pipeline does
    not warn) where the vocabulary has it."""
    eot = _eot_id(config, tokenizer)
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": False}


def save_hf(model: GPTModel, folder: str | os.PathLike) -> Path:
    """Write a folder that transformers loads offline: GPT2LMHeadModel.from_pretrained for the weights,
    AutoTokenizer and pipeline("text-generation") with exactly gptlab's token ids.

    The tokenizer files are the model's tokenizer's (`model.tokenizer`), or GPT-2's when the model has none
    and its vocabulary is GPT-2's (50,257 tokens); any other model gets the weights and configs only (and
    a warning).
    """
    from safetensors.torch import save_file

    model = unwrap_model(model)
    folder = Path(folder)
    tokenizer = getattr(model, "tokenizer", None)
    write_json(folder / "config.json", hf_config(model.config, tokenizer))
    write_json(folder / "generation_config.json", hf_generation_config(model.config, tokenizer))
    with atomic_path(folder / SAFETENSORS_NAME) as tmp:
        save_file(hf_state(model), str(tmp), metadata={"format": "pt"})
    if tokenizer is not None or model.config.vocab_size == GPT2_VOCAB_SIZE:
        write_hf_tokenizer(as_tokenizer(tokenizer), folder, model.config.context_length)
    else:
        warnings.warn(f"no tokenizer files written: the model has no tokenizer of its own and its vocabulary "
                      f"({model.config.vocab_size}) is not GPT-2's ({GPT2_VOCAB_SIZE}); add its own tokenizer "
                      f"files to {folder}", stacklevel=2)
    return folder
