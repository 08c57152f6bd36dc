"""Your own tokenizer end to end, as a user runs it: train one, prepare with it, train a model with it, then
generate, eval and convert without naming it again; the Hugging Face export gives the same ids and text."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gptlab.tokenizer import get_tokenizer
from tests.helpers import TINY_TRAIN_MODEL, assert_clean_error, run_cli, write_mixed_corpus

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
HF_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's here; don't go.",
    "我们今天去图书馆看书。窗外下着小雨，屋里很安静。",
    "   spaces  at\tthe start,\t\ttabs\n\n\r\n trailing   ",
    "First document.<|endoftext|>Second document<|endoftext|>",
    "👍🏽 😀 Ça va? naïve café 1234 ١٢٣ 鼠",
]


def cli(*args, **kw):
    return run_cli(*args, env=ONE_THREAD, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """corpus/, tok/ (gptlab tokenizer train), prep/ (gptlab prepare --tokenizer tok), run/ (gptlab train)."""
    root = tmp_path_factory.mktemp("own")
    write_mixed_corpus(root / "corpus", n_files=4)
    (root / "tiny.json").write_text(json.dumps(TINY_TRAIN_MODEL))
    proc = cli("tokenizer", "train", "--data", str(root / "corpus"), "--vocab-size", "700", "--out", str(root / "tok"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "gptlab train --tokenizer" in proc.stdout and "\r" not in proc.stderr
    proc = cli("prepare", "--data", str(root / "corpus"), "--out", str(root / "prep"), "--tokenizer",
               str(root / "tok"), "--workers", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = cli("train", "--data", str(root / "prep"), "--model", str(root / "tiny.json"), "--out", str(root / "run"),
               "--max-steps", "30", "--eval-every", "10", "--batch-size", "4", "--warmup-steps", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return root


def test_the_run_carries_its_tokenizer(trained):
    tok = get_tokenizer(trained / "tok")
    meta = json.loads((trained / "prep" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["tokenizer_sha256"], meta["dtype"]) == (tok.name, tok.sha256, "uint16")
    run = trained / "run"
    assert (run / "tokenizer.json").read_bytes() == (trained / "tok" / "tokenizer.json").read_bytes()
    assert json.loads((run / "config.json").read_text())["vocab_size"] == tok.n_vocab  # follows the tokenizer
    assert json.loads((run / "train_config.json").read_text())["tokenizer"] == str(trained / "prep")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["val_bpb"] > 0 for m in metrics) and metrics[-1]["val_bpb"] < metrics[0]["val_bpb"]


def test_generate_and_eval_use_the_run_tokenizer(trained):
    tok = get_tokenizer(trained / "tok")
    run = str(trained / "run")
    proc = cli("generate", "--model", run, "--prompt", "我们今天", "--max-new-tokens", "12", "--temperature", "0",
               "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_ids"] == tok.encode("我们今天")
    new = out["completions"][0]["token_ids"]
    assert all(0 <= i < tok.n_vocab for i in new) and out["completions"][0]["text"] == tok.decode(new)
    proc = cli("generate", "--model", run, "--prompt", "", "--max-new-tokens", "3", "--json")
    assert json.loads(proc.stdout)["prompt_ids"] == [tok.eot_id]  # the empty prompt: this tokenizer's <|endoftext|>
    proc = cli("eval", "--model", run, "--data", str(trained / "prep"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (result["bytes"] * 0.6931471805599453))
    proc = cli("eval", "--model", run, "--text", HF_TEXTS[1])
    assert proc.returncode == 0 and "bits per byte" in proc.stdout, proc.stderr


def test_hugging_face_export_gives_the_same_ids_and_greedy_text(trained, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from gptlab import generate, load_pretrained, text_to_token_ids, token_ids_to_text

    hf = trained / "hf"
    proc = cli("convert", str(trained / "run"), "--to", "hf", str(hf))
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = get_tokenizer(trained / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    assert len(theirs) == tok.n_vocab and theirs.eos_token_id == tok.eot_id == 0
    for text in HF_TEXTS:
        assert theirs(text)["input_ids"] == tok.encode(text), text
        assert theirs.decode(tok.encode(text)) == text
    pipe = transformers.pipeline("text-generation", model=str(hf))
    model = load_pretrained(trained / "run")
    for prompt in ("我们今天", "The quick"):
        ours = token_ids_to_text(generate(model, text_to_token_ids(prompt, tok), 12, eos_id=tok.eot_id), tok)
        assert pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"] == ours
    # gptlab reads the export back with its tokenizer, and a gptlab folder written from it carries it on
    proc = cli("generate", "--model", str(hf), "--prompt", "我们今天", "--max-new-tokens", "12", "--temperature", "0",
               "--json")
    run_out = cli("generate", "--model", str(trained / "run"), "--prompt", "我们今天", "--max-new-tokens", "12",
                  "--temperature", "0", "--json")
    assert json.loads(proc.stdout) == json.loads(run_out.stdout)
    assert cli("convert", str(hf), "--to", "gptlab", str(trained / "back")).returncode == 0
    assert get_tokenizer(trained / "back").name == tok.name


def test_a_hugging_face_model_keeps_its_own_tokenizer(trained, tmp_path):
    """An HF GPT-2-architecture folder with a tokenizer.json of its own (not gptlab's, not GPT-2's)."""
    transformers = pytest.importorskip("transformers")
    tok = get_tokenizer(trained / "tok")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.n_vocab + 3, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    shutil.copy(trained / "tok" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    proc = cli("generate", "--model", str(tmp_path / "hf"), "--prompt", "我们", "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_ids"] == tok.encode("我们")
    assert cli("convert", str(tmp_path / "hf"), "--to", "gptlab", str(tmp_path / "g")).returncode == 0
    assert get_tokenizer(tmp_path / "g").name == tok.name


def test_mismatched_tokenizers_are_refused(trained, tmp_path):
    tok = get_tokenizer(trained / "tok")
    prep, run = str(trained / "prep"), str(trained / "run")
    proc = cli("train", "--data", prep, "--tokenizer", "gpt2", "--out", str(tmp_path / "r"))
    assert_clean_error(proc, 2, f"prepared with tokenizer {tok.name}, but the model uses gpt2")
    assert_clean_error(cli("train", "--out", run, "--resume", "--tokenizer", "gpt2"), 2,
                       "--tokenizer cannot change when resuming", tok.name)
    assert_clean_error(cli("train", "--init", run, "--tokenizer", "gpt2", "--data", str(trained / "corpus"),
                           "--out", str(tmp_path / "r2")), 2, f"trained with tokenizer {tok.name}, not gpt2")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_resume_and_init_keep_the_tokenizer(trained):
    run = trained / "run"
    proc = cli("train", "--out", str(run), "--resume", "--max-steps", "32", "--tokenizer", str(trained / "tok"),
               "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = cli("train", "--init", str(run), "--data", str(trained / "corpus"), "--out", str(trained / "more"),
               "--max-steps", "2", "--quiet", "--warmup-steps", "0")
    assert proc.returncode == 0, proc.stderr
    assert get_tokenizer(trained / "more").name == get_tokenizer(trained / "tok").name


def test_info_and_encode(trained):
    tok = get_tokenizer(trained / "tok")
    proc = cli("tokenizer", "info", str(trained / "tok"), "--text", "天地玄黄 and more", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["name"], info["vocab_size"], info["eot_id"]) == (tok.name, tok.n_vocab, 0)
    sample = info["sample"]
    assert sample["tokens"] == len(tok.encode("天地玄黄 and more")) and sample["characters"] == 13
    assert sample["tokens_per_byte"] == pytest.approx(sample["tokens"] / len("天地玄黄 and more".encode()))
    proc = cli("tokenizer", "info", "gpt2", "--data", str(trained / "corpus"))
    assert proc.returncode == 0 and "tokens per character" in proc.stdout and "50,257 tokens" in proc.stdout
    proc = cli("tokenizer", "encode", "gpt2", "--text", "鼠 <|endoftext|>", "--json")
    assert json.loads(proc.stdout) == {"ids": [165, 120, 254, 220, 50256],
                                       "tokens": ["<E9>", "<BC>", "<A0>", " ", "<|endoftext|>"]}
    proc = cli("tokenizer", "encode", str(trained / "run"), "--text", "我们 the")  # a run folder: its tokenizer
    ids = tok.encode("我们 the")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{len(ids)} tokens ({tok.name})" and [int(line.split()[0]) for line in lines[1:]] == ids
