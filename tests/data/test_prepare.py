"""`gptlab prepare`: exact tokens against a one-shot reference, worker-count independence, flat memory."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptlab.data.prepare import find_cut, prepare_dataset
from gptlab.tokenizer import EOT_ID, get_tokenizer
from tests.helpers import SRC, assert_clean_error, run_cli, synthetic_tokenizer

# Whitespace and script mixes that would change tokens if a piece were cut at the wrong place.
TRICKY = [
    "Hello world.\n\n\nNew paragraph  with   spaces\t\ttabs\r\nCRLF line\n",
    "  leading spaces\n'tis 'll 're contractions at line starts\n 's\n",
    "numbers 12345 67890\n\u00a0no-break\u3000ideographic space 日本語のテキスト\n",
    "emoji 😀😀 and accents: café naïve\n    indented code():\n        return 1\n\n",
    "<|endoftext|> is plain text here\n" + "x" * 300 + "\n" + "word " * 80 + "\n",
]


def make_text(rng: random.Random, n_parts: int) -> str:
    from pydoc_data.topics import topics

    values = list(topics.values())
    return "".join(rng.choice(values + TRICKY) for _ in range(n_parts))


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    files = [root / "b.txt", root / "a.txt", root / "sub" / "c.txt"]
    for i, f in enumerate(files):
        f.write_text(make_text(rng, 8 + i) + ("   " if i == 0 else ""), encoding="utf-8")
    (root / ".hidden.txt").write_text("never read")
    (root / "empty.txt").write_text("")
    extra = tmp_path / "extra.md"
    extra.write_text("x" * 5000 + "\n" + "no visible-before-space stretch: " + "\u3000" * 3000)
    # Input order: the folder's files sorted by path (empty and hidden left out), then extra.md.
    return [root, extra], [root / "a.txt", root / "b.txt", root / "sub" / "c.txt", extra]


def reference_tokens(files) -> list[int]:
    enc = get_tokenizer()
    out = []
    for f in files:
        out += enc.encode_ordinary(f.read_bytes().decode("utf-8")) + [EOT_ID]  # bytes: keep \r\n as is
    return out


def read_all(out) -> np.ndarray:
    return np.concatenate([np.fromfile(out / n, dtype="<u2") for n in ("train.bin", "val.bin")])


def test_pieces_give_exactly_the_one_shot_tokens(tmp_path, corpus):
    inputs, files = corpus
    ref = reference_tokens(files)
    # Tiny pieces force hundreds of cuts, including inside every tricky stretch.
    meta = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.25, chunk_bytes=97)
    tokens = read_all(tmp_path / "out")
    assert tokens.tolist() == ref
    assert meta["train_tokens"] + meta["val_tokens"] == len(ref)
    assert meta["val_tokens"] == int(len(ref) * 0.25)  # the last quarter of the tokens
    assert np.fromfile(tmp_path / "out" / "val.bin", dtype="<u2").tolist() == ref[-meta["val_tokens"]:]
    assert meta["documents"] == 4 and meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert [s["path"] for s in meta["sources"]] == [str(f) for f in files]
    for src, f in zip(meta["sources"], files, strict=True):
        assert src["bytes"] == f.stat().st_size
        assert src["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    # An output folder inside an input folder is not read back as input.
    again = prepare_dataset(inputs, inputs[0] / "prepared", val_fraction=0.25)
    assert again["train_tokens"] + again["val_tokens"] == len(ref)
    again = prepare_dataset(inputs, inputs[0] / "prepared", val_fraction=0.25, force=True)
    assert again["documents"] == 4


def test_find_cut_only_after_a_visible_ascii_byte():
    assert find_cut(b"ab cd\n\nef", 8) == 5  # before the first "\n" (the second follows whitespace)
    assert find_cut(b"ab  cd", 5) == 2
    assert find_cut("\u3000\u3000 x".encode(), 7) == 0  # whitespace after non-ASCII: no cut


def test_one_and_two_workers_write_identical_files(tmp_path, corpus):
    inputs, _ = corpus
    for workers in (1, 2):
        prepare_dataset(inputs, tmp_path / f"w{workers}", chunk_bytes=500, workers=workers)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


PEAK_RSS = """
import resource, sys
from gptlab.data.prepare import prepare_dataset
prepare_dataset([sys.argv[1]], sys.argv[2], workers=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_memory_stays_flat_as_the_input_grows(tmp_path):
    rng = random.Random(1)
    block = make_text(rng, 200).encode("utf-8")
    peaks = {}
    for mib in (3, 24):
        path = tmp_path / f"in{mib}.txt"
        with open(path, "wb") as fh:
            for _ in range(mib * 2**20 // len(block) + 1):
                fh.write(block)
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(path), str(tmp_path / f"out{mib}")],
            capture_output=True, text=True, env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        peaks[mib] = int(proc.stdout.split()[-1]) / 1024
        path.unlink()
    growth = peaks[24] - peaks[3]
    # 21 MiB more input (and ~5 MiB more tokens written): the process grows by far less.
    assert growth < 5, peaks


def test_cli_json_and_refusals(tmp_path, corpus):
    inputs, files = corpus
    out = tmp_path / "out"
    proc = run_cli("prepare", "--data", *map(str, inputs), "--out", str(out), "--workers", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert meta["train_tokens"] + meta["val_tokens"] == len(reference_tokens(files))
    before = (out / "train.bin").read_bytes()
    # Existing dataset: refused without --force, replaced with it.
    assert_clean_error(run_cli("prepare", "--data", str(files[0]), "--out", str(out)), 2, "--force")
    assert (out / "train.bin").read_bytes() == before
    proc = run_cli("prepare", "--data", str(files[0]), "--out", str(out), "--force", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "meta.json").read_text())["documents"] == 1
    # Another tokenizer's data: refused even with --force.
    (out / "meta.json").write_text(json.dumps({"tokenizer": "cl100k_base"}))
    assert_clean_error(
        run_cli("prepare", "--data", str(files[0]), "--out", str(out), "--force"), 2, "cl100k_base", "tokenizer"
    )


def test_cli_bad_inputs(tmp_path):
    out = str(tmp_path / "out")
    assert_clean_error(run_cli("prepare", "--data", str(tmp_path / "nope.txt"), "--out", out), 2, "not found")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(run_cli("prepare", "--data", str(tmp_path / "empty.txt"), "--out", out), 2, "empty")
    (tmp_path / "emptydir").mkdir()
    assert_clean_error(run_cli("prepare", "--data", str(tmp_path / "emptydir"), "--out", out), 2, "no non-empty")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(("fine text\n" * 50_000).encode() + "caf\xe9\n".encode("latin-1"))
    proc = run_cli("prepare", "--data", str(bad), "--out", out, "--workers", "2")
    assert_clean_error(proc, 2, "latin1.txt", "UTF-8", "byte 500003")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    assert_clean_error(run_cli("prepare", "--data", str(bad), "--out", out, "--val-fraction", "1.5"), 2, "between")


def test_progress_bar_counts_bytes(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some words here\n" * 3000)
    prepare_dataset([text], tmp_path / "out", progress=True, chunk_bytes=4096)
    err = capsys.readouterr().err
    assert "prepare: 100%" in err and "46.9k/46.9k" in err and "B/s" in err  # 48,000 bytes in KiB


def test_a_vocabulary_above_65535_is_stored_as_uint32_and_read_back(tmp_path):
    from gptlab.data.tokenfile import load_prepared, read_split
    from gptlab.errors import UsageError

    tok_dir = synthetic_tokenizer(tmp_path / "tok")  # 70,000 tokens; plain words get ids above 65,535
    tok = get_tokenizer(tok_dir)
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("hello world, the quick brown fox jumps over the lazy dog\n" * 300)
    files[1].write_text("天地玄黄，宇宙洪荒。\n" * 50 + "the end")
    meta = prepare_dataset(files, tmp_path / "out", tokenizer=tok_dir, chunk_bytes=700, workers=2)
    ref = [i for f in files for i in tok.encode_ordinary(f.read_text()) + [tok.eot_id]]
    assert max(ref) > 65535
    assert (meta["dtype"], meta["tokenizer"], meta["tokenizer_sha256"]) == ("uint32", tok.name, tok.sha256)
    assert meta["vocab_size"] == 70_000 and meta["eot_token"] == 0
    stored = np.concatenate([np.fromfile(tmp_path / "out" / n, dtype="<u4") for n in ("train.bin", "val.bin")])
    assert stored.tolist() == ref
    assert get_tokenizer(tmp_path / "out").name == tok.name  # the tokenizer is stored with the data
    train, val = load_prepared(tmp_path / "out", context_length=8, tokenizer=tok)
    x, y = train[len(train) - 1]
    assert x.dtype == torch.long and x.tolist() == ref[(len(train) - 1) * 8:(len(train) - 1) * 8 + 8]
    assert read_split(tmp_path / "out", "val", tok).tolist() == ref[-meta["val_tokens"]:]
    with pytest.raises(UsageError, match=f"prepared with tokenizer {tok.name}, but the model uses gpt2"):
        load_prepared(tmp_path / "out", context_length=8)
    prepare_dataset(files, tmp_path / "gpt2", workers=1)  # GPT-2's ids: uint16
    with pytest.raises(UsageError, match="holds uint16 token ids .* needs uint32"):
        load_prepared(tmp_path / "gpt2", context_length=8, tokenizer=tok)
