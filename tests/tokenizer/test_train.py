"""Training a byte-level BPE: the id layout, round trips of any text, determinism, streaming, the record."""

from __future__ import annotations

import codecs
import hashlib
import json
import pickle
import random

import pytest

from gptlab.errors import UsageError
from gptlab.tokenizer import ENDOFTEXT, Tokenizer, get_tokenizer, token_label
from gptlab.tokenizer.train import train_tokenizer
from tests.helpers import MIXED_TEXT, write_mixed_corpus

ROUND_TRIPS = [
    MIXED_TEXT,
    "",
    " ",
    "\n",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。",
    "👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 ❤️ keycap 1️⃣",
    f"Hello{ENDOFTEXT}World {ENDOFTEXT} x {ENDOFTEXT}{ENDOFTEXT}\n near misses: <|endoftext| <|ENDOFTEXT|>",
    "unseen: Ωμέγα Русский 한국어 हिन्दी \x00\x7f \u3000\xa0 \r\n\t",
    "  two leading spaces\n\n\n\ttab\tseparated   \r\nCRLF\r\n trailing   ",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_mixed_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "t"
    return train_tokenizer([corpus], 600, out, ["<|user|>", "<|用户|>"], progress=False), out


def test_layout_and_record(trained, corpus):
    tok, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    record = config["gptlab"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_prefix_space"] is False
    assert record["special_tokens"] == {ENDOFTEXT: 0, "<|user|>": 1, "<|用户|>": 2} == tok.special_tokens
    assert tok.eot_id == record["eot_id"] == 0 and record["vocab_size"] == tok.n_vocab <= 600
    assert record["name"] == tok.name == f"bpe-{tok.n_vocab}-{tok.sha256[:12]}"
    assert record["tokenizer_json_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    training = record["training"]
    assert training["requested_vocab_size"] == 600 and training["min_frequency"] == 2
    files = sorted(corpus.iterdir())
    assert [s["path"] for s in training["sources"]] == [str(f) for f in files]
    for src, f in zip(training["sources"], files, strict=True):
        assert src["bytes"] == src["bytes_used"] == f.stat().st_size
        assert src["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    # ids 3..258 are the 256 bytes, each a token of its own
    assert {tok.decode_single_token_bytes(i) for i in range(3, 259)} == {bytes([b]) for b in range(256)}
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_any_text_round_trips(trained, text):
    tok, out = trained
    for t in (tok, get_tokenizer(out)):
        assert t.decode(t.encode(text)) == text
        assert t.decode(t.encode_ordinary(text)) == text


def test_special_tokens_and_batches(trained):
    tok, _ = trained
    text = f"a{ENDOFTEXT}b<|user|>c <|用户|>"
    ids = tok.encode(text)
    assert {0, 1, 2} <= set(ids) and tok.decode(ids) == text
    plain = tok.encode_ordinary(text)
    assert not {0, 1, 2} & set(plain) and tok.decode(plain) == text
    texts = [MIXED_TEXT, text, "", "x" * 1000]
    for n in (1, 4):
        assert tok.encode_batch(texts, num_threads=n) == [tok.encode(t) for t in texts]
        assert tok.encode_ordinary_batch(texts, num_threads=n) == [tok.encode_ordinary(t) for t in texts]


def test_streaming_never_splits_a_character(trained):
    tok, _ = trained
    text = "😀 我们" + ENDOFTEXT + "é 天地玄黄"
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    pieces = [utf8.decode(tok.decode_single_token_bytes(i)) for i in tok.encode(text)]
    assert "".join(pieces) + utf8.decode(b"", final=True) == text and "\ufffd" not in "".join(pieces)
    first = tok.decode_single_token_bytes(tok.encode_ordinary("鼠")[0])  # a character unseen in training: bytes
    assert token_label(first) == "<" + " ".join(f"{b:02X}" for b in first) + ">"
    with pytest.raises(KeyError):
        tok.decode_single_token_bytes(tok.n_vocab)
    assert tok.decode([tok.n_vocab]) == "\ufffd"  # never raises while decoding


def test_pickles_for_worker_processes(trained):
    tok, _ = trained
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(MIXED_TEXT) == tok.encode(MIXED_TEXT) and again.name == tok.name
    assert again.record == tok.record


def test_training_twice_gives_identical_files(corpus, tmp_path):
    a = train_tokenizer([corpus], 500, tmp_path / "a", progress=False)
    b = train_tokenizer([corpus], 500, tmp_path / "b", progress=False)
    c = train_tokenizer([corpus], 500, tmp_path / "c", progress=False, chunk_bytes=997)  # other cut points
    data = {(tmp_path / x / "tokenizer.json").read_bytes() for x in "abc"}
    assert len(data) == 1 and a.name == b.name == c.name


def test_max_bytes_trains_on_a_sample(corpus, tmp_path):
    files = sorted(corpus.iterdir())
    tok = train_tokenizer([corpus], 500, tmp_path / "s", progress=False, max_bytes=5000, chunk_bytes=1000)
    training = tok.record["training"]
    assert 5000 <= training["bytes"] < 7000 and training["max_bytes"] == 5000
    first, second = training["sources"][:2]
    assert second["bytes_used"] == 0
    assert first["sha256"] == hashlib.sha256(files[0].read_bytes()[: first["bytes_used"]]).hexdigest()


def test_folders_read_like_gptlab_train(corpus, tmp_path):
    mixed = tmp_path / "mixed"
    write_mixed_corpus(mixed, n_files=1)
    (mixed / ".hidden.txt").write_text("never read")
    (mixed / "empty.txt").write_text("")
    (mixed / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0" + bytes(range(256)))
    with pytest.warns(UserWarning, match="binary"):
        tok = train_tokenizer([mixed], 400, tmp_path / "t", progress=False)
    assert [s["path"] for s in tok.record["training"]["sources"]] == [str(mixed / "doc0.txt")]


def test_bad_settings_and_corpora(corpus, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(UsageError, match=r"--vocab-size 256 is too small: at least 257 \(256 byte tokens \+ 1 special"):
        train_tokenizer([corpus], 256, out, progress=False)
    with pytest.raises(UsageError, match=r"at least 259 \(256 byte tokens \+ 3 special tokens\)"):
        train_tokenizer([corpus], 258, out, ["<a>", "<b>"], progress=False)
    with pytest.raises(UsageError, match="given twice"):
        train_tokenizer([corpus], 1000, out, [ENDOFTEXT], progress=False)
    with pytest.raises(UsageError, match="no input"):
        train_tokenizer([], 1000, out, progress=False)
    (tmp_path / "blank.txt").write_text(" \n\n \t")
    with pytest.raises(UsageError, match="the corpus is empty: 1 file with nothing but whitespace"):
        train_tokenizer([tmp_path / "blank.txt"], 1000, out, progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(("é " * 5000).encode("utf-8") + "café au lait".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1\.txt is not UTF-8 text \(byte 15003: invalid continuation"):
        train_tokenizer([bad], 1000, out, progress=False, chunk_bytes=4096)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("ab😀".encode()[:-1])
    with pytest.raises(UsageError, match="byte 2"):
        train_tokenizer([cut], 1000, out, progress=False)
    assert not out.exists()  # nothing written on failure


def test_refuses_to_overwrite_without_force(trained, corpus):
    tok, out = trained
    with pytest.raises(UsageError, match="already holds a tokenizer; pass --force"):
        train_tokenizer([corpus], 600, out, progress=False)
    again = train_tokenizer([corpus], 600, out, ["<|user|>", "<|用户|>"], progress=False, force=True)
    assert again.name == tok.name


def test_chinese_pieces_are_bounded(tmp_path):
    """Chinese text without spaces is still cut into pieces (after a full stop, before a line break)."""
    from gptlab.data.prepare import Source, iter_pieces

    rng = random.Random(0)
    lines = ["天地玄黄，宇宙洪荒。", "日月盈昃，辰宿列张。", "寒来暑往，秋收冬藏。"]
    path = tmp_path / "zh.txt"
    path.write_text("".join(rng.choice(lines) + "\n" for _ in range(3000)), encoding="utf-8")
    pieces = list(iter_pieces([Source(path, path.stat().st_size)], 4096, []))
    assert len(pieces) > 20 and max(len(p.data) for p in pieces) < 4096 + 100
    assert b"".join(p.data for p in pieces) == path.read_bytes()
