"""Shared test helpers: tiny configs, running the CLI in a subprocess, checking its errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from gptlab import GPTConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"


def tiny_config(**overrides) -> GPTConfig:
    """A model small enough to run thousands of times in a test (GPT-2 vocab, 2 layers)."""
    base = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
    base.update(overrides)
    return GPTConfig(**base)


def run_cli(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m gptlab ARGS` in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gptlab", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        input=input,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """A CLI failure: the given exit code, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(err_lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in err_lines[0].lower(), (needle, err_lines[0])


TINY_TRAIN_MODEL = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                    "drop_rate": 0.1}


def write_training_fixture(root: Path, words: list[str], n_words: int = 2500) -> Path:
    """A seeded random-word corpus (text.txt) and a tiny model config (tiny.json) in `root`."""
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)) + "\n", encoding="utf-8")
    (root / "tiny.json").write_text(json.dumps(TINY_TRAIN_MODEL), encoding="utf-8")
    return root


INSTRUCTIONS = [
    {"instruction": "Name the color of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "What is two plus two?", "input": "", "output": "Two plus two is four."},
    {"instruction": "Translate the word into French.", "input": "cat", "output": "chat"},
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
]
TINY_FINETUNE_MODEL = {"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                       "drop_rate": 0.0}


def write_instructions(path: Path, records: list[dict] | None = None, jsonl: bool = False) -> Path:
    records = INSTRUCTIONS if records is None else records
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1)
    path.write_text(text + "\n", encoding="utf-8")
    return path


POSITIVE = "great wonderful excellent lovely superb fantastic".split()
NEGATIVE = "awful terrible horrible dreadful poor nasty".split()
FILLER = "the movie was and it a story film plot acting".split()


def labelled_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable toy reviews: filler words plus one word that decides the label (pos/neg)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_labelled_csv(path: Path, n: int = 200, seed: int = 0, delimiter: str = ",") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(["text", "label"])
        writer.writerows(labelled_rows(n, seed))
    return path


# A mixed corpus for tokenizer tests: English, Chinese, emoji, whitespace runs (written by the test authors).
MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's here; don't go.\n\n"
    "    def f(x):\n        return x  \n\r\n"
    "我们今天去图书馆看书。窗外下着小雨，屋里很安静。\n"
    "Ça va? naïve café 👍🏽 😀 1234 ١٢٣\t\ttabs   spaces\n"
)


def write_mixed_corpus(folder: Path, n_files: int = 3, n_words: int = 3000) -> Path:
    """`n_files` seeded random-word files made of MIXED_TEXT's words, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = MIXED_TEXT.split(" ")
    for i in range(n_files):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)), encoding="utf-8")
    return folder


def synthetic_tokenizer(folder: Path, n_vocab: int = 70_000) -> Path:
    """A byte-level BPE folder of `n_vocab` tokens, built without training (a big vocabulary in a second):
    <|endoftext|>, the 256 bytes, then pairs of bytes, those of lower-case letters and the space last, then
    triples of those: plain English words get ids above 65,535."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from gptlab.tokenizer import BPETokenizer, write_tokenizer
    from gptlab.tokenizer.hf_files import portable_tokenizer_json

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    common = list("\u0120etaoinshrdlucmfwypvbgkjqxz")  # the byte-level space, then letters by frequency
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    merges = []
    candidates = [(a, b) for a in alphabet for b in alphabet if not (a in common and b in common)]
    candidates += [(a, b) for a in common for b in common] + [(a + b, c) for a in common for b in common for c in common]
    for left, right in candidates:
        if len(vocab) >= n_vocab:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(BPETokenizer(portable_tokenizer_json(backend)), folder)
    return folder
