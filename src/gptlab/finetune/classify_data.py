"""Classification data (the book's chapter 6): labelled texts from CSV/TSV or JSON Lines, class ids, the split.

Labels are mapped to class ids in sorted order (numerically when every label is a whole number),
so the book's spam data gets ham = 0, spam = 1. The validation split is stratified: each class
gives the same share of its examples, so every validation label also occurs in training.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from ..data.text import read_text_file
from ..errors import UsageError
from .classifier import encode_texts
from .records import Record, is_table, read_json_records, read_table, require_records


@dataclass
class LabelledTexts:
    """Texts and their labels (as strings; None where a file has no label column)."""

    texts: list[str]
    labels: list[str | None]


def load_classification_data(path: str | os.PathLike, text_column: str = "text", label_column: str = "label",
                             require_labels: bool = True) -> LabelledTexts:
    """The texts and labels of a CSV/TSV file with a header row, or of JSON Lines / a JSON array of objects."""
    text = read_text_file(path)
    if is_table(path, text):
        columns, records = read_table(path, text)
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in columns and (column == text_column or require_labels):
                raise UsageError(f"{path} has no column {column!r} (its columns: {', '.join(columns)}); "
                                 f"name the right one with {flag}")
    else:
        records = read_json_records(path, text)
    return labelled_texts(records, path, text_column, label_column, require_labels)


def labelled_texts(records: Sequence[Record], source: str | os.PathLike, text_column: str = "text",
                   label_column: str = "label", require_labels: bool = True) -> LabelledTexts:
    """Texts and labels of parsed records (objects with the two fields), each checked."""
    require_records(source, list(records))
    rows = [_row(record, source, text_column, label_column, require_labels) for record in records]
    return LabelledTexts([t for t, _ in rows], [label for _, label in rows])


def _row(record: Record, path, text_column: str, label_column: str, require_labels: bool) -> tuple[str, str | None]:
    where, value = record.where(path), record.value
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected an object with {text_column!r} and {label_column!r}")
    if text_column not in value and ({"instruction", "messages"} & set(value)):
        raise UsageError(f"{where}: an instruction record is instruction data: fine-tune it without --task "
                         "classify (the default task is instruct)")
    text = value.get(text_column)
    if text_column not in value:
        raise UsageError(f"{where}: missing {text_column!r}; name the text field with --text-column")
    if not isinstance(text, str):
        raise UsageError(f"{where}: {text_column!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise UsageError(f"{where}: the text is empty")
    if label_column not in value:
        if require_labels:
            raise UsageError(f"{where}: missing {label_column!r}; name the label field with --label-column")
        return text, None
    label = value[label_column]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise UsageError(f"{where}: {label_column!r} must be a string or a whole number, got {label!r}")
    label = str(label).strip()
    if not label:
        raise UsageError(f"{where}: the label is empty")
    return text, label


def class_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels in class-id order: numeric order if all are whole numbers, else alphabetical."""
    names = set(labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_classes(names: Sequence[str], val_labels: Sequence[str], source: str) -> None:
    """At least two classes, and no validation label the training data lacks."""
    if len(names) < 2:
        raise UsageError(f"{source} has a single class ({names[0]!r}); a classifier needs at least two labels")
    unseen = sorted(set(val_labels) - set(names))
    if unseen:
        raise UsageError(f"the validation data has label(s) {', '.join(map(repr, unseen))} that the training data "
                         f"lacks ({', '.join(names)}); add examples of them to the training data")


def stratified_split(labels: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and validation indices: each class gives round(val_fraction x its count) examples (at least
    one while it keeps one for training), drawn with a seeded shuffle; both lists in file order."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val.extend(members[:n_val])
    chosen = set(val)
    return [i for i in range(len(labels)) if i not in chosen], sorted(val)


def class_balance(labels: Sequence[str], names: Sequence[str]) -> str:
    """'ham 4,825 (86.6%), spam 747 (13.4%)'."""
    counts = Counter(labels)
    return ", ".join(f"{n} {counts[n]:,} ({counts[n] / len(labels):.1%})" for n in names)


class ClassificationDataset(Dataset):
    """The book's SpamDataset: each text tokenized once (the first `max_length` tokens kept) with its class id.

    Batches are padded by `classification_collate` to their own longest text, not to one fixed length.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[str], names: Sequence[str],
                 max_length: int | None = None, tokenizer=None) -> None:
        ids = {name: i for i, name in enumerate(names)}
        full = encode_texts(texts, tokenizer=tokenizer)
        self.truncated = sum(1 for row in full if max_length is not None and len(row) > max_length)
        self.max_length = max_length or max(len(row) for row in full)
        self.encoded = [(row[: self.max_length], ids[label]) for row, label in zip(full, labels, strict=True)]
        self.targets = [ids[label] for label in labels]

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded[index]

    def __len__(self) -> int:
        return len(self.encoded)
