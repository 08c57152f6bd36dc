"""Train a byte-level BPE on your own corpus (`gptlab tokenizer train`), with Hugging Face `tokenizers`.

The tokenizer is GPT-2's kind: GPT-2's pre-tokenization (the same regex splits words, numbers,
punctuation and whitespace), bytes as the alphabet (any text round-trips, nothing is unknown), no
prefix space. Its ids: `<|endoftext|>` = 0, then the extra special tokens in the order given, then the
256 bytes, then one token per merge in the order learnt. The vocabulary stops short of `vocab_size`
when too few pairs occur `min_frequency` times; the tokenizer records the size it reached.

Streaming. Files are read as prepare.py reads them: in pieces of about `chunk_bytes` cut where GPT-2's
pre-tokenizer never joins text across, so the counts the trainer sees are those of the whole files,
and only a few MB are in flight (the trainer buffers a few hundred pieces). Every file is one
document: no merge spans two files. The trainer itself, though, keeps one entry per distinct
pre-token, which grows with the corpus: little for English (words repeat), but for Chinese each clause
between punctuation marks is a pre-token, about 80 MB of memory per MB of distinct Chinese text.
`max_bytes` trains on the first bytes of the corpus only (a sample), which bounds it.

Deterministic: the same files and settings give a byte-identical tokenizer.json (ties between pair
counts are broken by pair ids, in any thread count).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..data.prepare import Source, collect_sources, iter_pieces, not_utf8
from ..errors import GptlabError, UsageError
from .base import ENDOFTEXT
from .bpe import BPETokenizer
from .folder import TOKENIZER_FILE, new_record, write_tokenizer
from .hf_files import portable_tokenizer_json

N_BYTES = 256
DEFAULT_CHUNK_BYTES = 64 * 1024  # text handed to the trainer per piece (it buffers 256 of them)


def check_specials(special_tokens: Sequence[str]) -> list[str]:
    """`<|endoftext|>` then the extra special tokens, each non-blank and given once."""
    specials = [ENDOFTEXT]
    for token in special_tokens:
        if not isinstance(token, str) or not token.strip():
            raise UsageError(f"special token {token!r} must be a non-blank string")
        if token in specials:
            raise UsageError(f"special token {token!r} is given twice ({ENDOFTEXT} is always included)")
        specials.append(token)
    return specials


def check_vocab_size(vocab_size: int, specials: list[str]) -> None:
    minimum = N_BYTES + len(specials)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        plural = "s" if len(specials) > 1 else ""
        raise UsageError(f"--vocab-size {vocab_size} is too small: at least {minimum} (256 byte tokens + "
                         f"{len(specials)} special token{plural})")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if (out / TOKENIZER_FILE).exists() and not force:
        raise UsageError(f"{out} already holds a tokenizer; pass --force to replace it, or choose another --out")


class CorpusReader:
    """The corpus as text pieces for the trainer; records the bytes used and their sha256 per file."""

    def __init__(self, sources: list[Source], chunk_bytes: int, max_bytes: int | None) -> None:
        self.sources, self.chunk_bytes, self.max_bytes = sources, chunk_bytes, max_bytes
        self.used = [0] * len(sources)
        self.hashes = [hashlib.sha256() for _ in sources]
        self.has_text = False

    def __iter__(self) -> Iterator[str]:
        total = 0
        for piece in iter_pieces(self.sources, self.chunk_bytes, []):
            if self.max_bytes is not None and total >= self.max_bytes:
                return
            try:
                text = piece.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(self.sources[piece.source].path, piece.offset + exc.start, exc.reason) from None
            self.used[piece.source] += len(piece.data)
            self.hashes[piece.source].update(piece.data)
            total += len(piece.data)
            self.has_text = self.has_text or not text.isspace()
            yield text

    def budget(self) -> int:
        total = sum(s.size for s in self.sources)
        return total if self.max_bytes is None else min(total, self.max_bytes)

    def record(self) -> dict:
        """What was read: bytes in all, and per file its size, the bytes used and their sha256."""
        return {"max_bytes": self.max_bytes, "bytes": sum(self.used),
                "sources": [{"path": str(s.path), "bytes": s.size, "bytes_used": u, "sha256": h.hexdigest()}
                            for s, u, h in zip(self.sources, self.used, self.hashes, strict=True)]}


def train_tokenizer(
    data: Sequence[str | os.PathLike],
    vocab_size: int,
    out: str | os.PathLike,
    special_tokens: Sequence[str] = (),
    *,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    progress: bool | None = None,
    force: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> BPETokenizer:
    """Train a byte-level BPE on `data` (text files and folders, as `gptlab train` reads them) and write it
    to `out` (tokenizer.json + tokenizer_config.json); returns it. Nothing is written unless it succeeds.

    `max_bytes`: train on about the first that many bytes of the corpus (files in order), to bound the
    trainer's memory (module docstring). `progress`: the trainer's progress bars on stderr (default:
    when stderr is a terminal).
    """
    specials = check_specials(special_tokens)
    check_vocab_size(vocab_size, specials)
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"--max-bytes must be positive, got {max_bytes}")
    if min_frequency < 0:
        raise UsageError(f"--min-frequency must be 0 or more, got {min_frequency}")
    out = Path(out)
    check_out(out, force)
    reader = CorpusReader(collect_sources(data, exclude=out), chunk_bytes, max_bytes)
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    backend = _train(reader, vocab_size, specials, min_frequency, show)
    seconds = time.perf_counter() - start
    tok = BPETokenizer(portable_tokenizer_json(backend))
    _check_layout(tok, specials)
    from tokenizers import __version__ as tokenizers_version

    tok.record = new_record(tok, {"training": {
        "requested_vocab_size": vocab_size, "min_frequency": min_frequency, "seconds": round(seconds, 3),
        "tokenizers_version": tokenizers_version, **reader.record()}})
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GptlabError(f"cannot create {out}: {exc.strerror or exc}; choose a writable --out folder") from None
    write_tokenizer(tok, out)
    return tok


def _train(reader: CorpusReader, vocab_size: int, specials: list[str], min_frequency: int, show: bool):
    """The trained `tokenizers.Tokenizer`: GPT-2's byte-level split, every byte in the alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())  # no unknown token: the 256 byte tokens cover every input
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    try:
        backend.train_from_iterator(iter(reader), trainer=trainer, length=-(-reader.budget() // reader.chunk_bytes))
    except GptlabError:
        raise  # the reader's own error (a file that is not UTF-8) comes through the trainer unchanged
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain exceptions
        raise GptlabError(f"tokenizer training failed: {str(exc).splitlines()[0]}") from None
    if not reader.has_text:
        n = len(reader.sources)
        raise UsageError(f"the corpus is empty: {n} file{'s' if n > 1 else ''} with nothing but whitespace")
    return backend


def _check_layout(tok: BPETokenizer, specials: list[str]) -> None:
    """The id layout the module docstring promises: specials first, then all 256 bytes."""
    if list(tok.special_tokens) != specials or list(tok.special_tokens.values()) != list(range(len(specials))):
        raise GptlabError(f"internal: special tokens got ids {tok.special_tokens}")
    singles = {tok.decode_single_token_bytes(i) for i in range(len(specials), len(specials) + N_BYTES)}
    if singles != {bytes([b]) for b in range(N_BYTES)}:
        raise GptlabError("internal: the vocabulary does not start with the 256 byte tokens")
