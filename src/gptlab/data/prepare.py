"""Tokenize text files or folders once into memory-mappable token files (`gptlab prepare`).

Output folder layout:
    train.bin   token ids, little-endian, no header (data/tokenfile.py defines the format)
    val.bin     the same for the validation split
    meta.json   tokenizer (name, sha256), vocabulary size, token type, token counts, split rule, sources
    tokenizer.json, tokenizer_config.json   the tokenizer, when it is not GPT-2's

Documents. Every input file is one document: its tokens are followed by `<|endoftext|>` (50256 for GPT-2).
Files are taken in the order given on the command line; a folder contributes its text files
(recursively; hidden, empty and binary ones skipped, as `gptlab train` does) sorted by path.
`<|endoftext|>` written literally inside a file is ordinary text.

Streaming and why token counts do not change. A big file is cut into pieces of about `chunk_bytes`
that are encoded independently (in worker processes), so memory stays flat. Pieces are cut only
before an ASCII space or newline whose preceding character is visible: any character but whitespace
(an ASCII one, 0x21-0x7e, or a complete multi-byte UTF-8 character that is not whitespace, such as a
CJK character or full stop). GPT-2's pre-tokenizer regex (see tokenizer.GPT2_PATTERN), which trained
tokenizers use too, never matches across such a position: every alternative that can contain a
visible character stops at whitespace, and a whitespace run cannot start before a visible character.
The regex has no look-behind, so matching the piece after the cut gives the same pre-tokens as the
whole text does from there; its only look-ahead, `\\s+(?!\\S)`, concerns whitespace runs, and the piece
before the cut ends in a visible character. BPE merges never cross pre-tokens, hence the tokens of all
pieces, concatenated, are exactly `encode_ordinary(whole_file)`. A stretch with no such position (e.g.
a huge run of text without spaces or line breaks) is kept whole, so memory is bounded by
max(chunk_bytes, the longest such stretch). Cuts fall before an ASCII byte, so they never split a
UTF-8 character.

Validation split. val.bin holds the last `val_fraction` of all tokens (in the input order above,
rounded down, at least 1 token), train.bin the rest: deterministic, independent of the number of
workers, and it works for a single file. Put the text you want held out last.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GptlabError, UsageError
from ..storage.files import atomic_path, write_json
from ..tokenizer import Tokenizer, as_tokenizer, write_tokenizer
from .text import folder_files, is_binary
from .tokenfile import (
    FORMAT_VERSION,
    META_NAME,
    TRAIN_NAME,
    VAL_NAME,
    numpy_dtype,
    token_bytes,
    token_dtype_for,
)

DEFAULT_CHUNK_BYTES = 1 << 20
# A visible character followed by a space or newline: a position where the text may be cut. The
# multi-byte branch also matches whitespace (U+3000) and broken sequences: `_is_cut` checks it.
_CUT = re.compile(rb"(?:[\x21-\x7e]|[\xc2-\xf4][\x80-\xbf]{1,3})(?=[ \n])")
_COPY_TOKENS = 1 << 22


@dataclass(frozen=True)
class Source:
    path: Path
    size: int


@dataclass
class Piece:
    """Part of one file: its bytes, and whether the file ends here (then `<|endoftext|>` follows)."""

    source: int
    offset: int
    data: bytes
    last: bool


def collect_sources(paths: Sequence[str | os.PathLike], exclude: Path | None = None) -> list[Source]:
    """Input files in order: each path as given, folders expanded to their text files (text.folder_files).

    Files under `exclude` (the output folder, when it lies inside an input folder) are left out.
    """
    if not paths:
        raise UsageError("no input given; pass --data FILE_OR_FOLDER ...")
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            sources.extend(Source(p, p.stat().st_size) for p in folder_files(path, exclude))
        elif path.is_file():
            size = path.stat().st_size
            if size == 0:
                raise UsageError(f"{path} is empty; remove it from --data")
            if is_binary(path):
                raise UsageError(f"{path} is a binary file (an executable, image or archive?), not text; "
                                 "remove it from --data")
            sources.append(Source(path, size))
        elif path.exists():
            raise UsageError(f"{path} is neither a file nor a folder; pass text files or folders")
        else:
            raise UsageError(f"input not found: {path}; check the --data path")
    return sources


def _is_cut(m: re.Match) -> bool:
    if len(m.group()) == 1:
        return True
    try:
        char = m.group().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(char) == 1 and not char.isspace()


def find_cut(buf: bytes, limit: int) -> int:
    """The last safe cut position in buf[:limit+1] (see the module docstring), or 0 if there is none."""
    # Look back in growing windows: in normal text a cut is found within a few bytes of `limit`.
    window = 256
    while True:
        lo = max(0, limit - window)
        cut = 0
        for m in _CUT.finditer(buf, lo, min(len(buf) - 1, limit) + 1):
            if _is_cut(m):
                cut = m.end()
        if cut or lo == 0:
            return cut
        window *= 16


def _first_cut_after(buf: bytes, start: int) -> int:
    for m in _CUT.finditer(buf, start):
        if _is_cut(m):
            return m.end()
    return 0


def iter_pieces(sources: Sequence[Source], chunk_bytes: int, hashes: list) -> Iterator[Piece]:
    """Stream every file as pieces of about `chunk_bytes`, cut at safe positions; fills `hashes`."""
    for index, src in enumerate(sources):
        digest = hashlib.sha256()
        offset = scanned = 0
        buf = b""
        try:
            with open(src.path, "rb") as fh:
                while True:
                    block = fh.read(chunk_bytes)
                    digest.update(block)
                    buf += block
                    if not block:
                        break
                    while len(buf) > chunk_bytes:
                        cut = find_cut(buf, chunk_bytes) or _first_cut_after(buf, max(chunk_bytes, scanned))
                        if not cut:
                            scanned = len(buf) - 1  # no safe position yet: read more, scan only the new bytes
                            break
                        yield Piece(index, offset, buf[:cut], False)
                        offset += cut
                        buf = buf[cut:]
                        scanned = 0
        except OSError as exc:
            raise UsageError(f"cannot read {src.path}: {exc.strerror or exc}") from None
        hashes.append(digest.hexdigest())
        yield Piece(index, offset, buf, True)


def _batches(pieces: Iterator[Piece], batch_bytes: int) -> Iterator[list[Piece]]:
    """Group consecutive pieces (many small files) into tasks of about `batch_bytes`."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.data)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_WORKER_TOKENIZER: Tokenizer | None = None  # a worker process's tokenizer, received once at its start


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def encode_batch(batch: list[tuple[int, int, bytes, bool]], dtype: str = "uint16",
                 tokenizer: Tokenizer | None = None) -> np.ndarray | tuple[int, int, str]:
    """Worker task: decode and encode pieces; the token ids, or (source, byte offset, reason) on bad UTF-8.

    `tokenizer`: the tokenizer to use (default: the worker's, else GPT-2's).
    """
    tok = tokenizer or _WORKER_TOKENIZER or as_tokenizer(None)
    texts = []
    for source, offset, data, _ in batch:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return (source, offset + exc.start, exc.reason)
    # One thread: the parallelism comes from the worker processes.
    encoded = tok.encode_ordinary_batch(texts, num_threads=1)
    parts = []
    for (_, _, _, last), ids in zip(batch, encoded, strict=True):
        parts.append(np.asarray(ids, dtype=numpy_dtype(dtype)))
        if last:
            parts.append(np.array([tok.eot_id], dtype=numpy_dtype(dtype)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=numpy_dtype(dtype))


def _encoded_stream(tasks: Iterator[list[Piece]], workers: int, dtype: str,
                    tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray | tuple, int]]:
    """Encoded tasks in input order with (tokens or error, bytes); at most 2*workers tasks in flight."""
    as_args = ([(p.source, p.offset, p.data, p.last) for p in task] for task in tasks)
    if workers == 1:
        for args in as_args:
            yield encode_batch(args, dtype, tokenizer), sum(len(a[2]) for a in args)
        return
    # spawn: no fork of a possibly multi-threaded parent (torch, tqdm); the same on every platform.
    ctx = multiprocessing.get_context("spawn")
    # Each worker receives the tokenizer once (a trained one travels as its tokenizer.json text).
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for args in as_args:
            # Bounded queue instead of Pool.imap, which would read the whole input ahead into memory.
            pending.append((pool.apply_async(encode_batch, (args, dtype)), sum(len(a[2]) for a in args)))
            if len(pending) >= 2 * workers:
                result, size = pending.popleft()
                yield result.get(), size
        while pending:
            result, size = pending.popleft()
            yield result.get(), size


def default_workers() -> int:
    """CPUs this process may use, at most 8: each worker process costs a few hundred MB (it imports gptlab)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def not_utf8(path: Path, offset: int, reason: str) -> UsageError:
    """The error for a file that is not UTF-8: its name and the offset of the first bad byte."""
    return UsageError(f"{path} is not UTF-8 text (byte {offset}: {reason}); convert it (e.g. iconv -t UTF-8) "
                      "or leave it out")


def check_out_dir(out: Path, force: bool, tokenizer: Tokenizer | None = None) -> None:
    """Refuse to mix tokenizers in `out`, and to overwrite a prepared dataset without `force`."""
    name = as_tokenizer(tokenizer).name
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tokenizer = meta.get("tokenizer")
        except (OSError, ValueError, AttributeError):
            tokenizer = None
        if tokenizer != name:
            raise UsageError(
                f"{out} holds data prepared with tokenizer {tokenizer!r}, not {name!r}; "
                "tokenizers cannot be mixed: delete that folder or choose another --out"
            )
    existing = [n for n in (META_NAME, TRAIN_NAME, VAL_NAME) if (out / n).exists()]
    if existing and not force:
        raise UsageError(f"{out} already holds a prepared dataset ({', '.join(existing)}); pass --force to replace it")


def _split_tail(all_tmp: Path, val_tmp: Path, total: int, n_val: int, itemsize: int) -> None:
    """Move the last `n_val` tokens of all_tmp into val_tmp (streamed) and truncate all_tmp."""
    start = (total - n_val) * itemsize
    with open(all_tmp, "rb+") as src, open(val_tmp, "wb") as dst:
        src.seek(start)
        while block := src.read(_COPY_TOKENS * itemsize):
            dst.write(block)
        src.truncate(start)


def _progress(total_bytes: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                disable=not show, file=sys.stderr)


def prepare_dataset(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    workers: int = 1,
    force: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
) -> dict:
    """Tokenize `paths` into out/train.bin, out/val.bin and out/meta.json; returns the meta dict.

    `tokenizer`: GPT-2's by default, or a tokenizer (folder); a tokenizer other than GPT-2's is stored in
    `out` too (tokenizer.json, tokenizer_config.json), so training on the folder finds it.
    `progress`: a progress bar in bytes on stderr (None: only when stderr is a terminal).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if workers < 1 or chunk_bytes < 1:
        raise UsageError("workers and chunk_bytes must be at least 1")
    tok = as_tokenizer(tokenizer)
    out = Path(out)
    sources = collect_sources(paths, exclude=out)
    check_out_dir(out, force, tok)
    dtype = token_dtype_for(tok.n_vocab)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GptlabError(f"cannot create {out}: {exc.strerror or exc}; choose a writable --out folder") from None
    # The old meta.json goes first: a crash below leaves no meta.json pointing at mismatched .bin files.
    (out / META_NAME).unlink(missing_ok=True)
    hashes: list[str] = []
    total = 0
    show = sys.stderr.isatty() if progress is None else progress
    with atomic_path(out / TRAIN_NAME) as train_tmp, atomic_path(out / VAL_NAME) as val_tmp:
        with open(train_tmp, "wb") as fh, _progress(sum(s.size for s in sources), show) as bar:
            tasks = _batches(iter_pieces(sources, chunk_bytes, hashes), chunk_bytes)
            # closing(): on an error the worker pool is shut down at once, not when garbage-collected.
            with contextlib.closing(_encoded_stream(tasks, workers, dtype, tok)) as stream:
                for tokens, size in stream:
                    if isinstance(tokens, tuple):
                        source, offset, reason = tokens
                        raise not_utf8(sources[source].path, offset, reason)
                    fh.write(token_bytes(tokens, dtype))
                    total += len(tokens)
                    bar.update(size)
        n_val = max(1, int(total * val_fraction))
        if total - n_val < 1:
            raise UsageError(f"only {total} tokens: too little text to split into train and val")
        _split_tail(train_tmp, val_tmp, total, n_val, numpy_dtype(dtype).itemsize)
    write_tokenizer(tok, out)  # before meta.json, which marks the folder complete
    meta = _meta(tok, dtype, sources, hashes, total - n_val, n_val, val_fraction)
    write_json(out / META_NAME, meta)
    return meta


def _meta(tok: Tokenizer, dtype: str, sources: list[Source], hashes: list[str], n_train: int, n_val: int,
          val_fraction: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.name,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.n_vocab,
        "eot_token": tok.eot_id,
        "dtype": dtype,
        "documents": len(sources),
        "train_tokens": n_train,
        "val_tokens": n_val,
        "val_fraction": val_fraction,
        "split": "val = last val_fraction of all tokens, in input order",
        "sources": [
            {"path": str(s.path), "bytes": s.size, "sha256": h} for s, h in zip(sources, hashes, strict=True)
        ],
    }
