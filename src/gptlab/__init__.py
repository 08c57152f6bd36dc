"""gptlab: pretrain, evaluate and sample GPT-2-style language models."""

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from .config import PRESETS, GPTConfig, get_preset
from .data import GPTDataset, create_dataloader, load_documents, tokenize_documents
from .device import resolve_device
from .errors import GptlabError, UsageError
from .evaluate import calc_loss_batch, calc_loss_loader, perplexity, score_tokens
from .model import GPTModel, KVCache
from .pretrained import load_pretrained
from .tokenizer import decode, encode, get_tokenizer, text_to_token_ids, token_ids_to_text
from .train import TrainConfig, TrainResult, train

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
    "GPTDataset",
    "TrainConfig",
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
]
