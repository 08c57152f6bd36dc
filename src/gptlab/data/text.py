"""Training data: read text, tokenize it, cut it into sliding windows, batch it.

Documents are joined with `<|endoftext|>` so the model learns where one text ends. The train /
validation split cuts the *token stream* at one point (train first), and windows are made inside
each part separately, so no validation window ever shares a token with a training window.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import GptlabError, UsageError
from ..tokenizer import Tokenizer, as_tokenizer
from .corpus import BUILTIN_CORPUS, CORPORA, builtin_documents, fetch_corpus

BINARY_PROBE = 8192  # bytes read to tell a binary file from text


def is_binary(path: str | os.PathLike) -> bool:
    """Whether a file looks binary (a NUL byte near its start): executables, images, archives..."""
    with open(path, "rb") as fh:
        return b"\0" in fh.read(BINARY_PROBE)


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of one file (a leading BOM is dropped); missing, empty, binary or non-UTF-8 is an error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}; check the path") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder; pass it as a folder of text files") from None
    except OSError as exc:
        raise GptlabError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in data[:BINARY_PROBE]:
        raise UsageError(f"{path} is a binary file (an executable, image or archive?), not text; give text files")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise UsageError(f"{path} is empty; give a file with text in it")
    return text


def folder_files(folder: str | os.PathLike, exclude: Path | None = None) -> list[Path]:
    """The text files below a folder, sorted by path: every non-empty file that is not hidden (nor inside a
    hidden folder) and not binary. Binary files are skipped with a warning naming them."""
    folder = Path(folder)
    exclude = exclude.resolve() if exclude is not None else None
    files, binary = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts) or path.stat().st_size == 0:
            continue
        if exclude is not None and (path.resolve() == exclude or exclude in path.resolve().parents):
            continue
        (binary if is_binary(path) else files).append(path)
    if binary:
        shown = ", ".join(str(p.relative_to(folder)) for p in binary[:3]) + (" ..." if len(binary) > 3 else "")
        warnings.warn(f"skipped {len(binary)} binary file(s) in {folder}: {shown}", stacklevel=2)
    if not files:
        raise UsageError(f"folder {folder} holds no non-empty text files; add some or point --data at a file")
    return files


def text_files(path: str | os.PathLike) -> list[Path]:
    """`path` itself if it is a file, else the text files below the folder (`folder_files`)."""
    path = Path(path)
    if path.is_dir():
        return folder_files(path)
    if not path.exists():
        known = ", ".join([BUILTIN_CORPUS, *CORPORA])
        raise UsageError(f"data file not found: {path}; check the path (or name a corpus: {known})")
    return [path]


def is_corpus_name(source: str | os.PathLike) -> bool:
    """A named corpus (python-docs, the-verdict), unless a file or folder of that name exists."""
    return str(source) in (BUILTIN_CORPUS, *CORPORA) and not Path(source).exists()


def data_files(sources: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Every file the sources name, as load_documents reads them (none for the built-in corpus)."""
    files: list[Path] = []
    for source in sources or ():
        if is_corpus_name(source):
            if str(source) in CORPORA:
                files.append(fetch_corpus(str(source)))
        else:
            files.extend(text_files(source))
    return files


def load_documents(sources: Sequence[str | os.PathLike] | None = None) -> list[str]:
    """Texts of the given files, folders or corpus names; none given means the built-in corpus."""
    if not sources:
        return builtin_documents()
    docs: list[str] = []
    for source in sources:
        if is_corpus_name(source) and str(source) == BUILTIN_CORPUS:
            docs.extend(builtin_documents())
        else:
            docs.extend(read_text_file(p) for p in data_files([source]))
    return docs


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer | str | os.PathLike | None = None) -> torch.Tensor:
    """One token stream (int64) with `<|endoftext|>` between documents, tokenized by `tokenizer`
    (GPT-2's by default; a tokenizer folder or object, see gptlab.tokenizer.get_tokenizer).

    A literal `<|endoftext|>` inside a text is kept as the special token (as the book does), so one
    file can hold several documents.
    """
    if not docs:
        raise UsageError("no text to tokenize; give at least one non-empty file")
    tok = as_tokenizer(tokenizer)
    encoded = tok.encode_batch(list(docs))
    ids: list[int] = []
    for i, part in enumerate(encoded):
        if i:
            ids.append(tok.eot_id)
        ids.extend(part)
    return torch.tensor(ids, dtype=torch.long)


def token_fingerprint(ids: torch.Tensor) -> str:
    """A short sha256 of a token stream, to notice when a resumed run's data changed."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class GPTDataset(Dataset):
    """Sliding windows over a token stream: input ids[s:s+L], target ids[s+1:s+L+1], s = 0, stride, ...

    The same windows as the book's GPTDatasetV1 (starts `range(0, n - max_length, stride)`), computed
    on demand instead of stored, so memory stays one copy of the stream.
    """

    def __init__(self, token_ids: Sequence[int] | torch.Tensor, max_length: int, stride: int) -> None:
        for name, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        self.token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, len(self.token_ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]  # raises IndexError past the end, as a Dataset should
        window = self.token_ids[start : start + self.max_length + 1]
        return window[:-1], window[1:]


def create_dataloader(
    source: str | Sequence[int] | torch.Tensor,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int | None = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
) -> DataLoader:
    """Batches of (inputs, targets), each (batch_size, max_length), from a text or a token stream.

    A text is tokenized with `tokenizer` (GPT-2's by default).

    The loader owns a torch.Generator seeded with `seed` (or, when None, with a number drawn from
    torch's global RNG, so `torch.manual_seed` makes it reproducible): shuffling and worker seeds come
    from it alone, so the order is reproducible and its state can be checkpointed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be 0 or more, got {num_workers}")
    if isinstance(source, str):
        source = tokenize_documents([source], tokenizer)
    dataset = GPTDataset(source, max_length, stride)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and len(dataset) > 0,  # RandomSampler refuses an empty dataset
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


def split_tokens(token_ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train (first part) and validation (last `val_fraction`) token streams: one cut, no overlap."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    cut = int(round(len(token_ids) * (1.0 - val_fraction)))
    return token_ids[:cut], token_ids[cut:]


def tokens_needed(max_length: int, val_fraction: float) -> int:
    """Fewest tokens that give one full window (max_length + 1 tokens) in both parts of the split."""
    n = math.ceil((max_length + 1) / min(val_fraction, 1.0 - val_fraction))
    while True:  # the rounding in split_tokens can cost a token; step up until both parts fit
        cut = int(round(n * (1.0 - val_fraction)))
        if cut >= max_length + 1 and n - cut >= max_length + 1:
            return n
        n += 1


@dataclass
class DataSplit:
    """The train and validation loaders of a run, plus what is needed to check a resumed run's data."""

    train_loader: DataLoader
    val_loader: DataLoader
    total_tokens: int
    train_tokens: int
    val_tokens: int
    fingerprint: str


def make_loaders(
    token_ids: torch.Tensor,
    *,
    batch_size: int,
    max_length: int,
    stride: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 123,
    num_workers: int = 0,
) -> DataSplit:
    """Split a token stream and build a shuffled train loader and an ordered validation loader."""
    stride = stride or max_length
    needed = tokens_needed(max_length, val_fraction)
    if len(token_ids) < needed:
        raise UsageError(
            f"the corpus has {len(token_ids):,} tokens but context {max_length} with val fraction {val_fraction} "
            f"needs at least {needed:,} (one {max_length + 1}-token window in each part); "
            "add text or lower --context-length"
        )
    train_ids, val_ids = split_tokens(token_ids, val_fraction)
    n_train = len(GPTDataset(train_ids, max_length, stride))
    train_loader = create_dataloader(
        train_ids, batch_size=batch_size, max_length=max_length, stride=stride, shuffle=True,
        # dropping a ragged last batch keeps batches equal, unless that would leave no batch at all
        drop_last=n_train >= batch_size, num_workers=num_workers, seed=seed,
    )
    val_loader = create_dataloader(
        val_ids, batch_size=batch_size, max_length=max_length, stride=max_length, shuffle=False,
        drop_last=False, num_workers=num_workers, seed=seed,
    )
    return DataSplit(train_loader, val_loader, len(token_ids), len(train_ids), len(val_ids),
                     token_fingerprint(token_ids))
