"""Tokenizer folders: reading the tokenizer a folder holds, and writing one beside a model.

A folder holds a tokenizer when it has `tokenizer.json` (Hugging Face's format) and, from gptlab,
`tokenizer_config.json`. gptlab's tokenizer_config.json serves both sides: transformers reads its
top-level keys (AutoTokenizer.from_pretrained(folder) works), gptlab reads its record under the key
"gptlab": format, name, vocabulary size, `<|endoftext|>` and its id, the special tokens, the sha256
of tokenizer.json (so a changed or damaged file is noticed) and how it was trained.

A folder with tokenizer.json but no gptlab record is a Hugging Face tokenizer: GPT-2's own (recognised
by its vocabulary, merges and pre-tokenizer) is GPT-2, anything else a byte-level BPE of its own.
A model folder without tokenizer files is a GPT-2 model: gptlab never stores GPT-2's tokenizer there.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import UsageError
from ..storage.files import atomic_open, write_json
from .base import ENDOFTEXT, Tokenizer
from .bpe import BPETokenizer
from .gpt2 import GPT2_NAME, gpt2_tokenizer, gpt2_vocab_files

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE)
FORMAT = "gptlab-bpe"
FORMAT_VERSION = 1
# GPT-2's pre-tokenization pattern, as recorded (ByteLevel(use_regex=True) in `tokenizers` applies it).
PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}

# transformers' own "no limit" value for model_max_length
NO_MAX_LENGTH = 1_000_000_000_000_000_019_884_624_838_656


def hf_tokenizer_config(eot: str, model_max_length: int | None) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or NO_MAX_LENGTH,
    }


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return (Path(folder) / TOKENIZER_FILE).is_file()


def load_folder(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `folder` (gptlab's, a Hugging Face one, or GPT-2's files); one-line errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"tokenizer folder {folder} does not exist; give gpt2 or a folder made by "
                         "gptlab tokenizer train (or a model folder)")
    tok_path = folder / TOKENIZER_FILE
    if not tok_path.is_file():
        if _has_gpt2_vocab_files(folder):
            return gpt2_tokenizer()
        raise UsageError(f"{folder} holds no tokenizer: {TOKENIZER_FILE} is missing")
    config = _read_config(folder)
    try:
        text = tok_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {tok_path} ({exc}); restore it or train the tokenizer again") from None
    if "gptlab" in config:
        return _load_gptlab(folder, config["gptlab"], text)
    return _load_foreign(folder, config, text)


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:80]}); restore it or train the "
                         "tokenizer again") from None
    return config


def _load_gptlab(folder: Path, record: dict, text: str) -> BPETokenizer:
    """gptlab's tokenizer, checked against its record: format, sha256, size, <|endoftext|>, specials."""
    where = folder / CONFIG_FILE
    try:
        if record["format"] != FORMAT:
            raise KeyError("format")
        version, eot_token, sha = record["format_version"], record["eot_token"], record["tokenizer_json_sha256"]
        expected = (record["name"], record["vocab_size"], record["eot_id"], record["special_tokens"])
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{where} is not a gptlab tokenizer record (missing {exc}); restore it or train the "
                         "tokenizer again") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(f"{where} has format version {version!r}; this gptlab reads up to {FORMAT_VERSION}: "
                         "upgrade gptlab")
    tok = BPETokenizer(text, eot_token=eot_token, record=record, source=str(folder / TOKENIZER_FILE))
    if tok.sha256 != sha:
        raise UsageError(f"{folder / TOKENIZER_FILE} has sha256 {tok.sha256[:12]}..., not the {sha[:12]}... recorded "
                         f"in {CONFIG_FILE}: the file was changed or damaged; restore it or train again")
    found = (tok.name, tok.n_vocab, tok.eot_id, tok.special_tokens)
    if found != tuple(expected):
        raise UsageError(f"{folder}: {TOKENIZER_FILE} and {CONFIG_FILE} disagree (name, size, {eot_token} id or "
                         f"special tokens: {found[:3]} vs {tuple(expected)[:3]}); restore them or train again")
    return tok


def _load_foreign(folder: Path, config: dict, text: str) -> Tokenizer:
    """A Hugging Face tokenizer.json: GPT-2's is GPT-2, any other byte-level BPE becomes gptlab's."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{folder / TOKENIZER_FILE} is damaged ({exc}); restore it") from None
    if is_gpt2_json(data):
        return gpt2_tokenizer()
    eot = _eos_text(config.get("eos_token")) or _eos_text(_read_special_map(folder).get("eos_token")) or ENDOFTEXT
    tok = BPETokenizer(text, eot_token=eot, source=str(folder / TOKENIZER_FILE))
    tok.record = new_record(tok, {"imported_from": str(folder)})
    return tok


def _eos_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_special_map(folder: Path) -> dict:
    try:
        data = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_gpt2_json(data: dict) -> bool:
    """Whether a tokenizer.json (parsed) is GPT-2's: its vocabulary, merges, byte-level split without a
    prefix space, no normalizer, and `<|endoftext|>` = 50256 as the only added token."""
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    added = [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or []]
    if (model.get("type") != "BPE" or data.get("normalizer") is not None or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True) or added != [(50256, ENDOFTEXT)]):
        return False
    encoder_json, vocab_bpe = gpt2_vocab_files()
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return model.get("vocab") == json.loads(encoder_json) and merges == vocab_bpe.decode().split("\n")[1:-1]


def _has_gpt2_vocab_files(folder: Path) -> bool:
    """vocab.json + merges.txt (an older Hugging Face folder, no tokenizer.json): GPT-2's, or refused."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return False
    if (vocab.read_bytes(), merges.read_bytes()) == gpt2_vocab_files():
        return True
    raise UsageError(f"{folder} has vocab.json and merges.txt that are not GPT-2's, and no {TOKENIZER_FILE}; "
                     "write one with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...))")


def new_record(tok: BPETokenizer, extra: dict | None = None) -> dict:
    """gptlab's record of a BPE tokenizer (tokenizer_config.json's "gptlab" key)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": tok.name,
        "vocab_size": tok.n_vocab,
        "eot_token": tok.eot_token,
        "eot_id": tok.eot_id,
        "special_tokens": tok.special_tokens,
        "pre_tokenizer": PRE_TOKENIZER,
        "tokenizer_json_sha256": tok.sha256,
        **(extra or {}),
    }


def write_tokenizer(tok: Tokenizer, folder: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Store `tok` in `folder` (tokenizer.json, then tokenizer_config.json, each atomically); GPT-2 needs no
    files, so any tokenizer files there are removed instead. Returns the names written."""
    folder = Path(folder)
    if not isinstance(tok, BPETokenizer):
        if tok.name != GPT2_NAME:
            raise UsageError(f"tokenizer {tok.name} cannot be stored: gptlab stores byte-level BPE tokenizers "
                             "(tokenizer.json) and GPT-2's")
        remove_tokenizer(folder)
        return []
    path = folder / TOKENIZER_FILE
    if not path.is_file() or path.read_bytes() != tok.json_text.encode("utf-8"):
        with atomic_open(path) as fh:
            fh.write(tok.json_text)
    record = tok.record if tok.record.get("format") == FORMAT else new_record(tok, tok.record)
    write_json(folder / CONFIG_FILE, {**hf_tokenizer_config(tok.eot_token, model_max_length), "gptlab": record})
    return list(TOKENIZER_FILES)


def remove_tokenizer(folder: str | os.PathLike) -> None:
    """Remove tokenizer files from a model folder (tokenizer.json first: a folder without it is GPT-2's)."""
    for name in TOKENIZER_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(folder) / name).unlink()
