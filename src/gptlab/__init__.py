"""gptlab: pretrain, fine-tune, evaluate and sample GPT-2-style language models.

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
    "GPTConfig": "config",
    "PRESETS": "config",
    "get_preset": "config",
    "GPTModel": "model",
    "KVCache": "model",
    "flops_per_token": "model",
    "unwrap_model": "model",
    "GptlabError": "errors",
    "UsageError": "errors",
    "decode": "tokenizer",
    "encode": "tokenizer",
    "get_tokenizer": "tokenizer",
    "text_to_token_ids": "tokenizer",
    "token_ids_to_text": "tokenizer",
    "tokenizer_of": "tokenizer",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer.train",
    "calc_loss_batch": "evaluate",
    "calc_loss_loader": "evaluate",
    "perplexity": "evaluate",
    "score_tokens": "evaluate",
    "EvalResult": "evaluate",
    "compile_model": "hardware",
    "resolve_device": "hardware",
    "GPTDataset": "data.text",
    "create_dataloader": "data.text",
    "load_documents": "data.text",
    "tokenize_documents": "data.text",
    "prepare_dataset": "data.prepare",
    "TokenFileDataset": "data.tokenfile",
    "WindowBatchSampler": "data.tokenfile",
    "eval_batches": "data.tokenfile",
    "is_prepared_dir": "data.tokenfile",
    "iter_batches": "data.tokenfile",
    "load_prepared": "data.tokenfile",
    "PreparedLoader": "data.prepared",
    "prepared_split": "data.prepared",
    "TrainConfig": "training.settings",
    "RunConfig": "training.settings",
    "TrainResult": "training.settings",
    "train": "training.loop",
    "load_checkpoint": "training.checkpoint",
    "save_checkpoint": "training.checkpoint",
    "GenerationSettings": "generation.generate",
    "StreamChunk": "generation.generate",
    "TokenTextDecoder": "generation.generate",
    "generate": "generation.generate",
    "pad_prompts": "generation.generate",
    "stream_generate": "generation.generate",
    "prepare_for_decoding": "generation.decoding",
    "next_token_probs": "generation.sampling",
    "sample_next": "generation.sampling",
    "explain_sampling": "generation.explain",
    "load_model": "pretrained.native",
    "save_model": "pretrained.native",
    "download_model": "pretrained",
    "load_pretrained": "pretrained",
    "save_hf": "pretrained",
    "finetune": "finetune.run",
    "FinetuneConfig": "finetune.settings",
    "PromptTemplate": "finetune.templates",
    "format_instruction": "finetune.templates",
    "load_template": "finetune.templates",
    "save_template": "finetune.templates",
    "InstructionDataset": "finetune.instructions",
    "instruction_collate": "finetune.instructions",
    "load_instruction_data": "finetune.instructions",
    "LoRALayer": "finetune.lora",
    "LinearWithLoRA": "finetune.lora",
    "add_lora": "finetune.lora",
    "merge_lora": "finetune.lora",
    "load_adapter": "finetune.lora",
    "GPTClassifier": "finetune.classifier",
    "build_classifier": "finetune.classifier",
    "calc_accuracy_loader": "finetune.classifier",
    "classification_collate": "finetune.classifier",
    "classify_texts": "finetune.classifier",
    "load_classifier": "finetune.classifier",
    "ClassificationDataset": "finetune.classify_data",
    "load_classification_data": "finetune.classify_data",
    "respond": "finetune.tasks",
}


__all__ = sorted(_LAZY)


class _Package(types.ModuleType):
    """Keeps the public names the functions or classes even if a same-named submodule gets imported
    (which would otherwise set the package attribute to the module)."""

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
