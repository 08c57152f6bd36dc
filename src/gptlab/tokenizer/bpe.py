"""A byte-level BPE held in a Hugging Face `tokenizer.json`, behind gptlab's Tokenizer protocol.

This is what `gptlab tokenizer train` makes (train.py), and what a Hugging Face GPT-2-architecture model
usually comes with. Encoding runs in `tokenizers`; decoding is a lookup in a table of every id's raw
bytes, built once, so that `decode` and `decode_single_token_bytes` (the streaming decoder's input)
agree exactly and never depend on `tokenizers`' own decode, which drops special tokens by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..errors import UsageError
from .base import ENDOFTEXT, as_id_list
from .gpt2 import byte_decoder


def bpe_name(n_vocab: int, sha256: str) -> str:
    """The name of a BPE tokenizer: its size and the start of its tokenizer.json's sha256, a content identity."""
    return f"bpe-{n_vocab}-{sha256[:12]}"


class BPETokenizer:
    """A `tokenizers.Tokenizer` whose vocabulary is byte-level (GPT-2's byte-to-character table).

    `json_text` is the tokenizer.json text, kept byte for byte: its sha256 is the identity, and it is
    what gets written into a model or export folder. `record` is gptlab's description (name, vocabulary
    size, special tokens, training settings), written into tokenizer_config.json next to it.
    """

    def __init__(self, json_text: str, *, eot_token: str = ENDOFTEXT, record: dict | None = None,
                 source: str = "tokenizer.json") -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(json_text)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception with a multi-line text
            raise UsageError(f"{source} cannot be read by tokenizers: {str(exc).splitlines()[0]}") from None
        # A second copy treats special-token text as plain text (encode_ordinary). The flag lives on the
        # Tokenizer object, so toggling one shared object would race between threads.
        self._plain = Tokenizer.from_str(json_text)
        self._plain.encode_special_tokens = True
        self.json_text = json_text
        self.sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = bpe_name(self.n_vocab, self.sha256)
        eot_id = self._tok.token_to_id(eot_token)
        if eot_id is None:
            raise UsageError(f"{source} has no {eot_token} token (the end-of-text token); gptlab needs one")
        self.eot_token, self.eot_id = eot_token, eot_id
        self._bytes, self.special_tokens = _byte_table(self._tok, self.n_vocab, source)
        self.record = record or {}

    # --- encoding
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return _batch(self._tok, texts, num_threads)

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return _batch(self._plain, texts, num_threads)

    # --- decoding
    def decode_single_token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.n_vocab or self._bytes[token_id] is None:
            raise KeyError(token_id)
        return self._bytes[token_id]  # type: ignore[return-value]

    def decode(self, ids) -> str:
        parts = []
        for i in as_id_list(ids):
            data = self._bytes[i] if 0 <= i < self.n_vocab else None
            parts.append(data if data is not None else "\ufffd".encode())  # an id with no token
        return b"".join(parts).decode("utf-8", errors="replace")

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` (special-token text becomes the special token)."""
        return self._tok

    def __reduce__(self):  # picklable for worker processes: the JSON text travels, not the Rust object
        return (_rebuild, (self.json_text, self.eot_token, self.record))

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


def _rebuild(json_text: str, eot_token: str, record: dict) -> BPETokenizer:
    return BPETokenizer(json_text, eot_token=eot_token, record=record)


def _batch(tok, texts: Sequence[str], num_threads: int) -> list[list[int]]:
    # `tokenizers` has no per-call thread count: its pool is sized once per process (RAYON_NUM_THREADS).
    # num_threads <= 1 means "stay in this thread", what gptlab prepare's worker processes ask for.
    if num_threads <= 1:
        return [tok.encode(t, add_special_tokens=False).ids for t in texts]
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def _byte_table(tok, n_vocab: int, source: str) -> tuple[list[bytes | None], dict[str, int]]:
    """Raw bytes of every id (None for gaps in the ids) and the special tokens, from the vocabulary."""
    table: list[bytes | None] = [None] * n_vocab
    specials = {}
    for token_id, added in tok.get_added_tokens_decoder().items():
        if token_id < n_vocab:
            table[token_id] = added.content.encode("utf-8")
            if added.special:
                specials[added.content] = token_id
    to_byte = byte_decoder()
    for token, token_id in tok.get_vocab(with_added_tokens=False).items():
        if token_id < n_vocab and table[token_id] is None:
            try:
                table[token_id] = bytes(to_byte[ch] for ch in token)
            except KeyError:
                raise UsageError(f"{source} is not a byte-level BPE (token {token!r} is not written in GPT-2's "
                                 "byte alphabet); gptlab reads byte-level BPE tokenizers only") from None
    return table, dict(sorted(specials.items(), key=lambda kv: kv[1]))
