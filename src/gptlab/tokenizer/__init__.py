"""Tokenizers: GPT-2's BPE (offline, through tiktoken) and byte-level BPEs of your own (`gptlab tokenizer
train`), behind one protocol; how a folder holds one; the files that carry one into a Hugging Face folder."""

from .base import ENDOFTEXT, Tokenizer, byte_lengths, count_bytes, same_tokenizer, token_label
from .bpe import BPETokenizer
from .folder import has_tokenizer, write_tokenizer
from .gpt2 import EOT_ID, GPT2_PATTERN, GPT2_VOCAB_SIZE, gpt2_tokenizer, gpt2_vocab_files
from .resolve import (
    as_tokenizer,
    decode,
    encode,
    get_tokenizer,
    text_to_token_ids,
    token_ids_to_text,
    tokenizer_of,
)

__all__ = ["BPETokenizer", "ENDOFTEXT", "EOT_ID", "GPT2_PATTERN", "GPT2_VOCAB_SIZE", "Tokenizer", "as_tokenizer",
           "byte_lengths", "count_bytes", "decode", "encode", "get_tokenizer", "gpt2_tokenizer", "gpt2_vocab_files",
           "has_tokenizer", "same_tokenizer", "text_to_token_ids", "token_ids_to_text", "token_label",
           "tokenizer_of", "write_tokenizer"]
