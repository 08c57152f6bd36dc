"""Tokenizers: GPT-2's BPE (offline, through tiktoken), and the files that carry it into a Hugging Face folder."""

from .gpt2 import (
    ENDOFTEXT,
    EOT_ID,
    GPT2_PATTERN,
    GPT2_VOCAB_SIZE,
    decode,
    encode,
    get_tokenizer,
    gpt2_vocab_files,
    text_to_token_ids,
    token_ids_to_text,
)

__all__ = ["ENDOFTEXT", "EOT_ID", "GPT2_PATTERN", "GPT2_VOCAB_SIZE", "decode", "encode", "get_tokenizer",
           "gpt2_vocab_files", "text_to_token_ids", "token_ids_to_text"]
