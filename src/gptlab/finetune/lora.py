"""LoRA (the book's appendix E): low-rank adapters on frozen Linear layers, merged back into plain weights.

A LinearWithLoRA computes linear(x) + (alpha / rank) * dropout(x) @ A @ B, with A (in, rank) and B
(rank, out). B starts at zero, so a freshly adapted model computes exactly what the base did. Only A
and B train; the base weights stay frozen, so the optimizer holds 2 x rank x (in + out) numbers per
layer instead of 2 x in x out.

The update is scaled by alpha / rank, as in the LoRA paper and PEFT (the book scales by alpha
alone): then changing the rank does not change the size of the update, and the same learning rate
keeps working. A run folder always holds plain merged weights (`merged_state_dict`), so every tool
loads it as an ordinary model; the adapter alone is saved beside it (`save_adapter`).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..config import GPTConfig
from ..errors import GptlabError, UsageError
from ..model import unwrap_model
from ..storage.files import atomic_path, read_format_file, write_json
from ..storage.safe_load import check_tensor_set

ADAPTER_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "gptlab-lora"
DEFAULT_TARGETS = ("qkv", "out_proj", "fc", "proj")  # every Linear of a transformer block (model.py)


class LoRALayer(nn.Module):
    """The low-rank update (alpha / rank) * dropout(x) @ A @ B."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise UsageError(f"the LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        # A as nn.Linear(in_dim, rank) would initialise its (rank, in_dim) weight (PEFT's lora_A): bound 1/sqrt(in_dim).
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A) @ self.B * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix, to add to an nn.Linear's weight."""
        return (self.A.float() @ self.B.float()).T * self.scaling


class LinearWithLoRA(nn.Module):
    """A frozen nn.Linear plus a trainable LoRALayer (the book's LinearWithLoRA)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout)
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        lora = self.lora
        low = lora.dropout(x) @ lora.A  # (..., rank): small, so the update costs two thin matmuls
        # One fused multiply-add into a fresh tensor instead of "out + (low @ B) * scaling" (two more
        # full-size temporaries per layer and step).
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, lora.rank), lora.B, alpha=lora.scaling)
        return flat.view(out.shape)


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The model's LoRA-adapted layers by qualified name (wrappers such as DDP looked through)."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, LinearWithLoRA)}


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> nn.Module:
    """Freeze every weight of `model` and put a LoRA adapter on each targeted Linear of its blocks.

    `targets` name Linear layers of a transformer block by attribute (qkv, out_proj, fc, proj: all
    by default). The model is changed in place and returned; its outputs are unchanged until the
    adapters train. Parameters that should train fully besides the adapters (a new classification
    head) are switched back on by the caller.
    """
    unknown = sorted(set(targets) - set(DEFAULT_TARGETS))
    if unknown:
        raise UsageError(f"unknown LoRA target(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_TARGETS)}")
    inner = unwrap_model(model)
    for param in inner.parameters():
        param.requires_grad_(False)
    done = 0
    for block in inner.trf_blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and type(child) is nn.Linear:
                    setattr(parent, name, LinearWithLoRA(child, rank, alpha, dropout))
                    done += 1
    if not done:
        raise UsageError("add_lora found no Linear layer to adapt; is this a GPTModel, and is LoRA already on?")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear (W + scaling * (A @ B).T) and drop the adapters, in place.

    The merged model computes the same outputs (up to float rounding) at the base model's cost.
    """
    inner = unwrap_model(model)
    for name, layer in lora_layers(inner).items():
        parent = inner.get_submodule(name.rpartition(".")[0])
        linear = layer.linear
        with torch.no_grad():
            linear.weight += layer.lora.delta_weight().to(linear.weight.dtype)
        setattr(parent, name.rpartition(".")[2], linear)
    return model


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain GPTModel weights (adapters merged) from the model's state, or from `state`, a full state
    dict of it (e.g. gathered from several ranks). The model itself is not changed."""
    state = dict(state if state is not None else unwrap_model(model).state_dict())
    for name, layer in lora_layers(model).items():
        weight = state.pop(f"{name}.linear.weight")
        A, B = state.pop(f"{name}.lora.A"), state.pop(f"{name}.lora.B")
        delta = (A.float() @ B.float()).T * layer.lora.scaling
        state[f"{name}.weight"] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
        if f"{name}.linear.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.linear.bias")
    return state


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen weights (names, shapes and each tensor's first 4,096 values): tells
    whether an adapter is loaded onto the base model it was trained on, without reading every byte."""
    digest = hashlib.sha256()
    for name, param in sorted(unwrap_model(model).named_parameters()):
        if param.requires_grad:
            continue
        head = param.detach().flatten()[:4096].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapter(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """adapter.safetensors (`tensors`: the trainable ones, adapters and any head trained whole) and
    adapter_config.json (`info`: rank, alpha, dropout, targets, the base model's config and fingerprint)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    with atomic_path(folder / ADAPTER_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT})
    write_json(folder / ADAPTER_CONFIG_NAME, {"format": ADAPTER_FORMAT, **info})


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """The adapter_config.json of a run folder (a clear error when there is none)."""
    return read_format_file(folder, ADAPTER_CONFIG_NAME, ADAPTER_FORMAT,
                            f"--adapter {folder} holds no LoRA adapter ({ADAPTER_CONFIG_NAME} is missing); give the "
                            "folder of a run fine-tuned with --method lora")


def check_adapter_base(info: dict, model: nn.Module, source: str) -> None:
    """Refuse an adapter made for another base model: other shapes, or the same shapes with other weights."""
    config = unwrap_model(model).config
    try:
        theirs = GPTConfig.from_dict(info["base_config"]).replace(drop_rate=config.drop_rate)
    except (KeyError, TypeError, UsageError) as exc:
        raise UsageError(f"{source}: damaged adapter config ({exc})") from None
    if theirs != config:
        diff = ", ".join(f"{k} {v} (base: {getattr(config, k)})" for k, v in theirs.to_dict().items()
                         if getattr(config, k) != v)
        raise UsageError(f"the adapter in {source} was made for another base model ({diff}); "
                         f"give --init {info.get('init') or 'the model it was trained from'}")
    if info.get("base_fingerprint") != base_fingerprint(model):
        raise UsageError(f"the adapter in {source} was trained on other base weights than --init's "
                         f"(same shapes, different values); give --init {info.get('init') or 'its base model'}")


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy adapter.safetensors into the model's trainable tensors (names and shapes checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_NAME
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise GptlabError(f"cannot read {path} ({exc}); the adapter is missing or damaged") from None
    params = trainable_parameters(model)
    check_tensor_set(str(path), tensors, params, hint="was the adapter made for another task or --lora-targets?")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise UsageError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model expects "
                                 f"{tuple(param.shape)}; the adapter was made for another model")
            param.copy_(tensors[name])


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Put the LoRA adapter saved in a run folder on `model`, the base model it was trained from (in place).

    The adapter's rank, alpha, dropout and targets come from its adapter_config.json; a model of
    another shape or with other weights is refused. `merge_lora` then gives the plain model again.
    """
    info = read_adapter_config(folder)
    if info.get("labels"):
        raise UsageError(f"the adapter in {folder} belongs to a classifier (it holds the class head too): load "
                         "the classifier itself with load_classifier, or continue it with gptlab finetune "
                         "--task classify --adapter")
    add_lora(model, int(info["r"]), float(info["alpha"]), float(info["dropout"]), list(info["targets"]))
    check_adapter_base(info, model, str(folder))
    load_adapter_weights(model, folder)
    return model
