"""Reading fine-tuning data files: JSON arrays, JSON Lines, CSV and TSV, with errors that name the line.

Every record comes back with the line it starts on, so a bad record is reported as
`data.json: record 7 (line 31): ...` and the user can go straight to it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.text import read_text_file
from ..errors import UsageError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


@dataclass(frozen=True)
class Record:
    """One example as read from its file: the parsed value, its 1-based number and starting line (0: not
    from a file, e.g. records given to the Python API)."""

    value: object
    number: int
    line: int

    def where(self, path: str | os.PathLike) -> str:
        return f"{path}: record {self.number}" + (f" (line {self.line})" if self.line else "")


def is_table(path: str | os.PathLike, text: str) -> bool:
    """A CSV/TSV file: by its suffix, else by content (JSON starts with '[' or '{')."""
    suffix = Path(path).suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return True
    if suffix in (".json", ".jsonl"):
        return False
    return not text.lstrip().startswith(("[", "{"))


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _json_error(path, exc: json.JSONDecodeError, line_offset: int = 0) -> UsageError:
    return UsageError(f"{path}: invalid JSON at line {exc.lineno + line_offset} column {exc.colno}: {exc.msg}; "
                      "fix the file (a JSON array of records, or one JSON object per line)")


def read_json_records(path: str | os.PathLike, text: str | None = None) -> list[Record]:
    """The records of a JSON array, or of JSON Lines (one object per line, blank lines skipped)."""
    text = read_text_file(path) if text is None else text
    if text.lstrip().startswith("["):
        return _array_records(path, text)
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc, i - 1) from None
        records.append(Record(value, len(records) + 1, i))
    return records


def _array_records(path, text: str) -> list[Record]:
    """A JSON array's elements with the line each starts on (json.loads alone forgets where they were)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None
    if not isinstance(values, list):
        raise UsageError(f"{path}: expected a JSON array of records")
    decoder, records = json.JSONDecoder(), []
    index = text.index("[") + 1
    for number in range(1, len(values) + 1):
        while text[index] in " \t\r\n,":
            index += 1
        value, end = decoder.raw_decode(text, index)
        records.append(Record(value, number, _line_of(text, index)))
        index = end
    return records


def read_table(path: str | os.PathLike, text: str | None = None) -> tuple[list[str], list[Record]]:
    """A CSV/TSV file with a header row: (column names, one dict per row).

    The delimiter comes from the suffix (.tsv/.tab: tab), else from the header (a tab in it means TSV).
    """
    text = read_text_file(path) if text is None else text
    delimiter = TABLE_SUFFIXES.get(Path(path).suffix.lower())
    if delimiter is None:
        delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        rows = []
        line = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((line, row))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise UsageError(f"{path}: unreadable table at line {reader.line_num}: {exc}") from None
    columns = [name.strip() for name in header]
    records = []
    for number, (line, row) in enumerate(rows, start=1):
        if len(row) != len(columns):
            raise UsageError(f"{path}: record {number} (line {line}) has {len(row)} fields but the header has "
                             f"{len(columns)}; quote fields that contain the delimiter")
        records.append(Record(dict(zip(columns, row, strict=True)), number, line))
    return columns, records


def require_records(path: str | os.PathLike, records: list[Record]) -> None:
    if not records:
        raise UsageError(f"{path} holds no examples; give a file with at least one record")
