"""Which tokenizer a name or folder means, and how damaged or foreign tokenizer folders are answered."""

from __future__ import annotations

import json
import shutil

import pytest
import tiktoken
import torch

from gptlab import GPTModel, load_model, load_pretrained, save_model
from gptlab.errors import UsageError
from gptlab.tokenizer import (
    EOT_ID,
    as_tokenizer,
    byte_lengths,
    count_bytes,
    get_tokenizer,
    gpt2_tokenizer,
    gpt2_vocab_files,
    same_tokenizer,
    text_to_token_ids,
    token_ids_to_text,
    tokenizer_of,
    write_tokenizer,
)
from gptlab.tokenizer.gpt2 import GPT2_SHA256
from gptlab.tokenizer.hf_files import write_gpt2_tokenizer
from gptlab.tokenizer.train import train_tokenizer
from tests.helpers import MIXED_TEXT, tiny_config, write_mixed_corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokdir")
    train_tokenizer([write_mixed_corpus(root / "corpus")], 500, root / "tok", progress=False)
    return root / "tok"


def test_gpt2_is_the_default_with_exactly_the_old_ids():
    gpt2 = get_tokenizer()
    assert gpt2 is get_tokenizer("gpt2") is gpt2_tokenizer() is as_tokenizer(None)
    assert (gpt2.name, gpt2.n_vocab, gpt2.eot_id) == ("gpt2", 50257, EOT_ID)
    assert gpt2.encode("Hello, do you like tea? <|endoftext|> In") == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256,
                                                                         554]
    assert as_tokenizer(gpt2.encoding) is gpt2  # a tiktoken encoding of GPT-2 is GPT-2
    other = tiktoken.Encoding("letters", pat_str=r"\w+| ", mergeable_ranks={bytes([b]): b for b in range(256)},
                              special_tokens={"<|endoftext|>": 256})
    assert as_tokenizer(other).encode("ab<|endoftext|>") == [97, 98, 256]
    import hashlib

    assert hashlib.sha256(b"".join(gpt2_vocab_files())).hexdigest() == GPT2_SHA256
    # the book's way: a tiktoken encoding passed in
    ids = text_to_token_ids("Every effort moves you", gpt2.encoding)
    assert token_ids_to_text(ids, gpt2.encoding) == "Every effort moves you"


def test_folders_and_models(tok_dir, tmp_path):
    tok = get_tokenizer(tok_dir)
    assert get_tokenizer(tok_dir / "tokenizer.json").name == tok.name
    assert same_tokenizer(get_tokenizer(str(tok_dir)), tok)
    # a model folder carries its tokenizer; a GPT-2 model folder holds none and means GPT-2
    model = GPTModel(tiny_config(vocab_size=tok.n_vocab))
    model.tokenizer = tok
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json", "tokenizer_config.json"]
    assert get_tokenizer(tmp_path / "m").name == tok.name
    assert tokenizer_of(load_pretrained(tmp_path / "m")).name == tok.name
    assert tokenizer_of(load_model(tmp_path / "m")).name == tok.name
    gpt2_model = GPTModel(tiny_config())
    save_model(gpt2_model, tmp_path / "m")  # the same folder: the stale tokenizer files go
    assert not (tmp_path / "m" / "tokenizer.json").exists() and get_tokenizer(tmp_path / "m").name == "gpt2"
    assert load_pretrained(tmp_path / "m").tokenizer is None and tokenizer_of(gpt2_model).name == "gpt2"


def test_a_hugging_face_gpt2_folder_is_gpt2(tmp_path):
    write_gpt2_tokenizer(tmp_path / "hf")
    assert get_tokenizer(tmp_path / "hf") is gpt2_tokenizer()
    (tmp_path / "old").mkdir()  # an older folder: vocab.json + merges.txt only
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "hf" / name, tmp_path / "old" / name)
    assert get_tokenizer(tmp_path / "old") is gpt2_tokenizer()
    (tmp_path / "old" / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    with pytest.raises(UsageError, match="not GPT-2's"):
        get_tokenizer(tmp_path / "old")


def test_a_foreign_byte_level_bpe_is_imported(tok_dir, tmp_path):
    """tokenizer.json from elsewhere (no gptlab record): its own end-of-text token from tokenizer_config.json."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", foreign / "tokenizer.json")
    (foreign / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok = get_tokenizer(foreign)
    assert tok.name == get_tokenizer(tok_dir).name and tok.record["imported_from"] == str(foreign)
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    write_tokenizer(tok, tmp_path / "copy")  # stored beside a model: a gptlab folder from then on
    assert get_tokenizer(tmp_path / "copy").record["imported_from"] == str(foreign)


def test_missing_and_damaged_folders(tok_dir, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        get_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="tokenizer.json is missing"):
        get_tokenizer(tmp_path / "empty")
    d = tmp_path / "d"
    shutil.copytree(tok_dir, d)
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text.replace('"merges"', '"merges" ', 1))
    with pytest.raises(UsageError, match="changed or damaged"):
        get_tokenizer(d)
    (d / "tokenizer.json").write_text(text)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="tokenizer_config.json is damaged"):
        get_tokenizer(d)
    record = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del record["gptlab"]["eot_id"]
    (d / "tokenizer_config.json").write_text(json.dumps(record))
    with pytest.raises(UsageError, match="not a gptlab tokenizer record"):
        get_tokenizer(d)
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UsageError, match="cannot be read by tokenizers"):
        get_tokenizer(d)


def test_a_model_whose_tokenizer_disagrees_with_its_vocabulary(tok_dir, tmp_path):
    tok = get_tokenizer(tok_dir)
    save_model(GPTModel(tiny_config(vocab_size=tok.n_vocab + 5)), tmp_path / "m")
    write_tokenizer(tok, tmp_path / "m")
    for load in (load_pretrained, load_model):
        with pytest.raises(UsageError, match=f"has {tok.n_vocab} tokens but the model's vocab_size is {tok.n_vocab + 5}"):
            load(tmp_path / "m")
    model = GPTModel(tiny_config(vocab_size=tok.n_vocab - 1))
    model.tokenizer = tok
    with pytest.raises(UsageError, match="vocab_size"):
        save_model(model, tmp_path / "m2")


def test_bytes_of_tokens(tok_dir):
    tok = get_tokenizer(tok_dir)
    ids = tok.encode("天地 <|endoftext|>x😀")
    assert count_bytes(ids, tok) == len("天地 x😀".encode())  # <|endoftext|> counts 0
    assert count_bytes(torch.tensor(ids), tok) == count_bytes(ids, tok)
    assert byte_lengths(tok)[tok.eot_id] == 0 and byte_lengths(gpt2_tokenizer())[EOT_ID] == 0
    with pytest.raises(ValueError, match="outside"):
        count_bytes([tok.n_vocab], tok)
