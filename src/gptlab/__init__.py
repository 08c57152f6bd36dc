"""gptlab: pretrain, evaluate and sample GPT-2-style language models.

Names are imported lazily (PEP 562): `import gptlab` and `gptlab --help` do not load torch;
`from gptlab import train` imports the module that defines it on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "save_model": "checkpoint",
    "PRESETS": "config",
    "GPTConfig": "config",
    "get_preset": "config",
    "GPTDataset": "data",
    "create_dataloader": "data",
    "load_documents": "data",
    "tokenize_documents": "data",
    "resolve_device": "device",
    "GptlabError": "errors",
    "UsageError": "errors",
    "calc_loss_batch": "evaluate",
    "calc_loss_loader": "evaluate",
    "perplexity": "evaluate",
    "score_tokens": "evaluate",
    "StreamChunk": "generate",
    "TokenTextDecoder": "generate",
    "generate": "generate",
    "pad_prompts": "generate",
    "stream_generate": "generate",
    "prepare_for_decoding": "generate",
    "GPTModel": "model",
    "KVCache": "model",
    "prepare_dataset": "prepare",
    "download_model": "pretrained",
    "load_pretrained": "pretrained",
    "save_hf": "pretrained",
    "explain_sampling": "sampling",
    "next_token_probs": "sampling",
    "sample_next": "sampling",
    "compile_model": "speed",
    "flops_per_token": "speed",
    "unwrap_model": "speed",
    "TokenFileDataset": "tokenfile",
    "WindowBatchSampler": "tokenfile",
    "eval_batches": "tokenfile",
    "is_prepared_dir": "tokenfile",
    "iter_batches": "tokenfile",
    "load_prepared": "tokenfile",
    "decode": "tokenizer",
    "encode": "tokenizer",
    "get_tokenizer": "tokenizer",
    "text_to_token_ids": "tokenizer",
    "token_ids_to_text": "tokenizer",
    "TrainConfig": "train",
    "PreparedLoader": "train_data",
    "prepared_split": "train_data",
    "TrainResult": "train",
    "train": "train",
}


__all__ = [
    "GPTConfig",
    "GPTModel",
    "GptlabError",
    "KVCache",
    "PRESETS",
    "UsageError",
    "decode",
    "encode",
    "get_preset",
    "get_tokenizer",
    "load_model",
    "load_pretrained",
    "resolve_device",
    "save_model",
    "text_to_token_ids",
    "token_ids_to_text",
    "download_model",
    "save_hf",
    "prepare_dataset",
    "TokenFileDataset",
    "WindowBatchSampler",
    "is_prepared_dir",
    "load_prepared",
    "iter_batches",
    "eval_batches",
    "compile_model",
    "flops_per_token",
    "unwrap_model",
    "GPTDataset",
    "TrainConfig",
    "PreparedLoader",
    "prepared_split",
    "TrainResult",
    "calc_loss_batch",
    "calc_loss_loader",
    "create_dataloader",
    "load_checkpoint",
    "load_documents",
    "perplexity",
    "save_checkpoint",
    "score_tokens",
    "tokenize_documents",
    "train",
    "generate",
    "stream_generate",
    "prepare_for_decoding",
    "StreamChunk",
    "TokenTextDecoder",
    "pad_prompts",
    "sample_next",
    "next_token_probs",
    "explain_sampling",
]


class _Package(types.ModuleType):
    """Keeps `gptlab.train` and `gptlab.generate` the functions (as eager imports made them) when their
    same-named submodules get imported, which would otherwise set the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
