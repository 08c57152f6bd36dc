"""gptlab: pretrain, evaluate and sample GPT-2-style language models."""

__version__ = "0.1.0"

from .checkpoint import load_model, save_model
from .config import PRESETS, GPTConfig, get_preset
from .device import resolve_device
from .errors import GptlabError, UsageError
from .generate import (
    StreamChunk,
    TokenTextDecoder,
    generate,
    pad_prompts,
    prepare_for_decoding,
    stream_generate,
)
from .model import GPTModel, KVCache
from .pretrained import load_pretrained
from .sampling import explain_sampling, next_token_probs, sample_next
from .tokenizer import decode, encode, get_tokenizer, text_to_token_ids, token_ids_to_text

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
    "generate",
    "stream_generate",
    "StreamChunk",
    "TokenTextDecoder",
    "pad_prompts",
    "sample_next",
    "next_token_probs",
    "explain_sampling",
    "prepare_for_decoding",
]
