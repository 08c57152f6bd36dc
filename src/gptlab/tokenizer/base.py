"""What gptlab needs of a tokenizer (the `Tokenizer` protocol) and helpers that work on any of them.

Two kinds fit the protocol: GPT-2's BPE through tiktoken (`gpt2.TiktokenTokenizer`) and a byte-level
BPE in a Hugging Face `tokenizer.json` (`bpe.BPETokenizer`: one trained by `gptlab tokenizer train`, or
the one an imported Hugging Face model came with). Callers never pass tiktoken's `allowed_special` or
`errors`: the protocol fixes gptlab's choices (special-token text is the special token in `encode`,
plain text in `encode_ordinary`; invalid UTF-8 decodes to U+FFFD).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

ENDOFTEXT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """A tokenizer as gptlab uses it.

    `name` and `sha256` identify it (recorded in prepared data and checked against a model's);
    ids are 0..n_vocab-1; `eot_id` is `<|endoftext|>`, the document separator and end-of-sample token;
    `special_tokens` maps each special token's text to its id.
    """

    name: str
    sha256: str
    n_vocab: int
    eot_id: int
    eot_token: str
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]: ...
    def encode_ordinary(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]: ...
    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def decode_single_token_bytes(self, token_id: int) -> bytes: ...


def as_id_list(ids) -> list[int]:
    """Token ids from a list, a tuple, a numpy array or a tensor of any shape with one row."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
        if ids and isinstance(ids[0], list):  # a (1, T) batch of one
            ids = [i for row in ids for i in row]
    return [int(i) for i in ids]


def token_label(token_bytes: bytes) -> str:
    """A token made readable: its text (newlines and tabs escaped), or its bytes as `<E7 9A>` when it is only
    part of a UTF-8 character (byte-level tokens split many characters of non-Latin scripts)."""
    try:
        text = token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02X}" for b in token_bytes) + ">"
    return repr(text)[1:-1]


@functools.lru_cache(maxsize=8)
def byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of every token id (int64, length n_vocab); special tokens count 0: they mark
    document boundaries, they are not text. The table bits per byte are counted with."""
    lengths = np.zeros(tokenizer.n_vocab, dtype=np.int64)
    specials = set(tokenizer.special_tokens.values())
    for token_id in range(tokenizer.n_vocab):
        if token_id not in specials:
            try:
                lengths[token_id] = len(tokenizer.decode_single_token_bytes(token_id))
            except KeyError:  # an id with no token (a gap in a foreign vocabulary)
                pass
    return lengths


def count_bytes(ids, tokenizer: Tokenizer, chunk: int = 1 << 24) -> int:
    """UTF-8 bytes of the text that token ids stand for (special tokens: 0), read in chunks of `chunk` ids,
    so a memory-mapped token file is never loaded whole."""
    table = byte_lengths(tokenizer)
    ids = ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)
    total = 0
    for start in range(0, len(ids), chunk):
        part = np.asarray(ids[start : start + chunk], dtype=np.int64)
        if part.size and (part.min() < 0 or part.max() >= len(table)):
            raise ValueError(f"token id {int(part.max())} is outside the tokenizer's {len(table)} ids")
        total += int(table[part].sum())
    return total


def describe(tokenizer: Tokenizer) -> str:
    """`name (N tokens)`, for messages."""
    return f"{tokenizer.name} ({tokenizer.n_vocab:,} tokens)"


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids: the same name and the same sha256 of their definition."""
    return a.name == b.name and a.sha256 == b.sha256
