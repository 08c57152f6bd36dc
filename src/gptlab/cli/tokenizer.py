"""`gptlab tokenizer train|info|encode`: train a byte-level BPE on your corpus, look at one, try it on text."""

from __future__ import annotations

import argparse
import json
import re
import sys

from .common import non_negative_int, positive_int

TRAIN_HELP = (
    "Train a byte-level BPE (GPT-2's kind: GPT-2's pre-tokenization, bytes as the alphabet, <|endoftext|> = id 0 "
    "as the document separator) on text files and folders, and write tokenizer.json and tokenizer_config.json "
    "to --out. Every file is one document. The files are streamed, but the trainer keeps every distinct "
    "pre-token in memory: little for English, about 80 MB per MB of distinct Chinese text (each clause between "
    "punctuation marks is one pre-token); train on a sample with --max-bytes (e.g. 200M) to bound it. The same "
    "data and settings give the same tokenizer.json. Use it with --tokenizer DIR on gptlab train and prepare."
)
TOKENIZER_ARG_HELP = "gpt2, or a folder holding a tokenizer (made by gptlab tokenizer train, or a model or run folder)"
SAMPLE_BYTES = 10 * 2**20  # what `info --data` measures: the first 10 MiB


def byte_size(text: str) -> int:
    """A number of bytes: 5000000, 200M, 1.5G, 64k (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 200M, 1G or 5000000, got {text!r}")
    value = float(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return int(value)


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer on your corpus, show one, encode text with one",
                       description="Byte-level BPE tokenizers of your own: train one (train), look at one (info), "
                       "encode text with one (encode). gpt2 names GPT-2's tokenizer.")
    verbs = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True, parser_class=type(p))
    _register_train(verbs)
    _register_info(verbs)
    _register_encode(verbs)


def _register_train(verbs) -> None:
    p = verbs.add_parser("train", help="train a byte-level BPE on text files", description=TRAIN_HELP)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files or folders (UTF-8; folders as gptlab train reads them: hidden, empty and binary "
                   "files skipped)")
    p.add_argument("--vocab-size", type=positive_int, required=True, metavar="N",
                   help="tokens in all: special tokens + 256 bytes + merges (e.g. 16000)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.json and tokenizer_config.json")
    p.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN",
                   help="more special tokens after <|endoftext|> (ids 1, 2, ...), e.g. '<|user|>' '<|assistant|>'")
    p.add_argument("--max-bytes", type=byte_size, default=None, metavar="SIZE",
                   help="train on the first SIZE bytes of the corpus only (files in order), e.g. 200M: bounds the "
                   "trainer's memory on large corpora")
    p.add_argument("--min-frequency", type=non_negative_int, default=2, metavar="N",
                   help="a pair must occur this often to become a token (default 2)")
    p.add_argument("--force", action="store_true", help="replace a tokenizer already in DIR")
    p.add_argument("--json", action="store_true", help="print the tokenizer's record as one JSON object")
    p.set_defaults(func=run_train)


def _register_info(verbs) -> None:
    p = verbs.add_parser("info", help="vocabulary size, special tokens and compression of a tokenizer")
    p.add_argument("tokenizer", help=TOKENIZER_ARG_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="measure tokens per character and per byte on this text")
    src.add_argument("--data", nargs="+", metavar="FILE",
                     help="measure them on these files or folders (their first 10 MiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_info)


def _register_encode(verbs) -> None:
    p = verbs.add_parser("encode", help="the token ids and pieces of a text")
    p.add_argument("tokenizer", help=TOKENIZER_ARG_HELP)
    p.add_argument("--text", required=True, help="text to encode (<|endoftext|> becomes its special id)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "tokens": [...]}')
    p.set_defaults(func=run_encode)


def run_train(args: argparse.Namespace) -> int:
    from ..tokenizer.train import train_tokenizer

    tok = train_tokenizer(args.data, args.vocab_size, args.out, args.special_tokens, min_frequency=args.min_frequency,
                          max_bytes=args.max_bytes, force=args.force)
    training = tok.record["training"]
    if args.json:
        print(json.dumps(tok.record, ensure_ascii=False))
        return 0
    print(f"wrote {args.out}: tokenizer {tok.name}, {tok.n_vocab:,} tokens ({tok.eot_token} = {tok.eot_id}), trained "
          f"on {training['bytes']:,} bytes of {len(training['sources'])} file(s) in {training['seconds']:.1f} s")
    if tok.n_vocab < args.vocab_size:
        print(f"note: the vocabulary stopped at {tok.n_vocab:,} of the {args.vocab_size:,} asked for: no more pairs "
              f"occur {args.min_frequency} times; more text (or --min-frequency 1) gives more", file=sys.stderr)
    print(f"use it: gptlab train --tokenizer {args.out} ...   (or gptlab prepare --tokenizer {args.out} ...)")
    return 0


def measure(tok, text: str) -> dict:
    """Characters, bytes and tokens of a text, and tokens per character and per byte."""
    n_tokens, n_bytes = len(tok.encode(text)), len(text.encode("utf-8"))
    return {"characters": len(text), "bytes": n_bytes, "tokens": n_tokens,
            "tokens_per_char": n_tokens / len(text) if text else None,
            "tokens_per_byte": n_tokens / n_bytes if n_bytes else None}


def sample_text(paths: list[str]) -> str:
    """The first SAMPLE_BYTES of the files (read as gptlab prepare reads them: strict UTF-8)."""
    from ..data.prepare import collect_sources, iter_pieces, not_utf8

    sources = collect_sources(paths)
    parts, total = [], 0
    for piece in iter_pieces(sources, 1 << 20, []):
        if total >= SAMPLE_BYTES:
            break
        try:
            parts.append(piece.data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise not_utf8(sources[piece.source].path, piece.offset + exc.start, exc.reason) from None
        total += len(piece.data)
    return "".join(parts)


def run_info(args: argparse.Namespace) -> int:
    from ..tokenizer import get_tokenizer

    tok = get_tokenizer(args.tokenizer)
    record = getattr(tok, "record", {})
    info = {"name": tok.name, "sha256": tok.sha256, "vocab_size": tok.n_vocab, "eot_token": tok.eot_token,
            "eot_id": tok.eot_id, "special_tokens": tok.special_tokens, "training": record.get("training")}
    text = args.text if args.text is not None else sample_text(args.data) if args.data else None
    if text is not None:
        info["sample"] = measure(tok, text)
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    print(f"tokenizer {tok.name}: {tok.n_vocab:,} tokens, {tok.eot_token} = {tok.eot_id}")
    print("special tokens: " + ", ".join(f"{s} = {i}" for s, i in tok.special_tokens.items()))
    if info["training"]:
        t = info["training"]
        print(f"trained on {t['bytes']:,} bytes of {len(t['sources'])} file(s), {t['requested_vocab_size']:,} tokens "
              f"asked for, min frequency {t['min_frequency']}")
    if text is not None:
        m = info["sample"]
        per_char = f"{m['tokens_per_char']:.3f}" if m["tokens_per_char"] is not None else "-"
        per_byte = f"{m['tokens_per_byte']:.3f}" if m["tokens_per_byte"] is not None else "-"
        print(f"sample: {m['characters']:,} characters, {m['bytes']:,} bytes, {m['tokens']:,} tokens: "
              f"{per_char} tokens per character, {per_byte} per byte")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import get_tokenizer, token_label

    tok = get_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    labels = [token_label(tok.decode_single_token_bytes(i)) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "tokens": labels}, ensure_ascii=False))
        return 0
    print(f"{len(ids)} tokens ({tok.name})")
    width = max([len(str(i)) for i in ids] + [2])
    for token_id, label in zip(ids, labels, strict=True):
        print(f"{token_id:>{width}}  {label}")
    return 0
