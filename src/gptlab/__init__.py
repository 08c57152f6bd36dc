"""gptlab: pretrain, evaluate and sample GPT-2-style language models."""

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from .config import PRESETS, GPTConfig, get_preset
from .data import GPTDataset, create_dataloader, load_documents, tokenize_documents
from .device import resolve_device
from .errors import GptlabError, UsageError
from .evaluate import calc_loss_batch, calc_loss_loader, perplexity, score_tokens
from .generate import StreamChunk, TokenTextDecoder, generate, pad_prompts, stream_generate
from .model import GPTModel, KVCache
from .prepare import prepare_dataset
from .pretrained import download_model, load_pretrained, save_hf
from .sampling import explain_sampling, next_token_probs, sample_next
from .speed import compile_model, flops_per_token, unwrap_model
from .tokenfile import (
    TokenFileDataset,
    WindowBatchSampler,
    eval_batches,
    is_prepared_dir,
    iter_batches,
    load_prepared,
)
from .tokenizer import decode, encode, get_tokenizer, text_to_token_ids, token_ids_to_text
from .train import TrainConfig, TrainResult, train
from .train_data import PreparedLoader, prepared_split

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
    "StreamChunk",
    "TokenTextDecoder",
    "pad_prompts",
    "sample_next",
    "next_token_probs",
    "explain_sampling",
    "PreparedLoader",
    "prepared_split",
]
