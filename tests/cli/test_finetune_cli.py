"""`gptlab finetune`, `gptlab generate --instruction` and `gptlab classify` as a user runs them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gptlab import GPTModel, save_model
from tests.helpers import (
    INSTRUCTIONS,
    TINY_FINETUNE_MODEL,
    assert_clean_error,
    labelled_rows,
    run_cli,
    tiny_config,
    write_instructions,
    write_labelled_csv,
)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cli(*args, **kw):
    return run_cli(*args, env=ONE_THREAD, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftcli")
    torch.manual_seed(0)
    save_model(GPTModel(tiny_config(**{k: v for k, v in TINY_FINETUNE_MODEL.items() if k != "vocab_size"})),
               root / "base")
    write_instructions(root / "inst.jsonl", jsonl=True)
    write_labelled_csv(root / "train.csv", 240, seed=0)
    write_labelled_csv(root / "test.csv", 60, seed=1)
    return root


def finetune_args(root, out, data, *extra):
    return ("finetune", "--init", str(root / "base"), "--data", str(root / data), "--out", str(root / out),
            "--batch-size", "4", "--warmup-steps", "0", "--quiet", *extra)


@pytest.fixture(scope="module")
def instruct_run(root):
    proc = cli(*finetune_args(root, "inst", "inst.jsonl", "--val-data", str(root / "inst.jsonl"), "--max-steps", "60",
                              "--lr", "1e-2", "--eval-every", "30", "--max-new-tokens", "12"))
    assert proc.returncode == 0, proc.stderr
    return root / "inst", proc


def test_finetune_writes_an_instruction_run(instruct_run):
    out, proc = instruct_run
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == sorted([
        "checkpoint.pt", "config.json", "loss.png", "metrics.jsonl", "model.safetensors", "prompt_template.json",
        "responses.jsonl", "train_config.json"])
    assert "loss on the response and its <|endoftext|> only" in proc.stdout
    assert "full fine-tuning" in proc.stdout and "AdamW state" in proc.stdout
    assert "'Name the color of the sky.' ->" in proc.stdout  # greedy answers after each epoch
    assert f'gptlab generate --model {out} --instruction' in proc.stdout
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["task"] == "instruct" and settings["lr"] == 1e-2 and settings["weight_decay"] == 0.1
    responses = [json.loads(line)["model_response"] for line in (out / "responses.jsonl").read_text().splitlines()]
    assert responses == [e["output"] for e in INSTRUCTIONS]


def test_generate_answers_an_instruction(instruct_run):
    out, _ = instruct_run
    proc = cli("generate", "--model", str(out), "--instruction", INSTRUCTIONS[0]["instruction"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == INSTRUCTIONS[0]["output"] + "\n"  # only the response, without <|endoftext|>
    entry = INSTRUCTIONS[2]
    proc = cli("generate", "--model", str(out), "--instruction", entry["instruction"], "--input", entry["input"], "--json")
    data = json.loads(proc.stdout)
    assert data["completions"][0]["text"] == entry["output"] and data["completions"][0]["token_ids"][-1] == 50256


def test_lora_run_saves_merged_weights_and_the_adapter(root, instruct_run):
    out = root / "lora"
    proc = cli(*finetune_args(root, "lora", "inst.jsonl", "--method", "lora", "--lora-r", "4", "--lora-alpha", "8",
                              "--lora-targets", "qkv,fc", "--max-steps", "2", "--responses", "1", "--init",
                              str(instruct_run[0])))
    assert proc.returncode == 0, proc.stderr
    assert "LoRA r=4 alpha=8 dropout 0 on qkv, fc" in proc.stdout
    assert {"adapter.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    assert set(load_file(str(out / "adapter.safetensors"))) == {
        f"trf_blocks.{i}.{m}.lora.{p}" for i in range(2) for m in ("att.qkv", "ff.fc") for p in "AB"}
    assert len((out / "responses.jsonl").read_text().splitlines()) == 1
    assert cli("generate", "--model", str(out), "--instruction", "Hi", "--max-new-tokens", "3").returncode == 0
    assert_clean_error(cli(*finetune_args(root, "l2", "inst.jsonl", "--adapter", str(out), "--lora-r", "8")), 2,
                       "--adapter brings its own LoRA settings")


def test_resume_continues_exactly(root):
    opts = ("--drop-rate", "0.1", "--batch-size", "2", "--eval-every", "2", "--decay-steps", "6",
            "--max-new-tokens", "0", "--sample-responses", "0")
    assert cli(*finetune_args(root, "whole", "inst.jsonl", *opts, "--max-steps", "6")).returncode == 0
    assert cli(*finetune_args(root, "cut", "inst.jsonl", *opts, "--max-steps", "3")).returncode == 0
    proc = cli("finetune", "--out", str(root / "cut"), "--resume", "--max-steps", "6")
    assert proc.returncode == 0, proc.stderr

    def metrics(name):
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
                for line in (root / name / "metrics.jsonl").read_text().splitlines()]

    assert [m for m in metrics("cut") if m["step"] != 3] == metrics("whole")
    whole, cut = load_file(str(root / "whole" / "model.safetensors")), load_file(str(root / "cut" / "model.safetensors"))
    assert all(torch.equal(v, whole[k]) for k, v in cut.items())
    assert_clean_error(cli("finetune", "--out", str(root / "cut"), "--resume", "--lora-r", "4"), 2, "--lora-r cannot change")


@pytest.fixture(scope="module")
def classify_run(root):
    proc = cli(*finetune_args(root, "cls", "train.csv", "--task", "classify", "--val-data", str(root / "test.csv"),
                              "--trainable", "all", "--epochs", "4", "--lr", "3e-3", "--eval-every", "30",
                              "--batch-size", "8"))
    assert proc.returncode == 0, proc.stderr
    return root / "cls", proc


def test_finetune_classify_and_classify(root, classify_run):
    out, proc = classify_run
    assert "classes (training): neg" in proc.stdout and "validation accuracy" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_accuracy"] >= 0.9 and "train_accuracy" in metrics[-1]
    assert json.loads((out / "classifier.json").read_text())["labels"] == ["neg", "pos"]
    result = json.loads(cli("classify", "--model", str(out), "--data", str(root / "test.csv"), "--json").stdout)
    assert result["accuracy"] >= 0.9 and result["examples"] == 60 and result["labels"] == ["neg", "pos"]
    assert sum(map(sum, result["confusion_matrix"])) == 60
    text = cli("classify", "--model", str(out), "--data", str(root / "test.csv")).stdout
    assert text.startswith("accuracy ") and "confusion matrix" in text
    proc = cli("classify", "--model", str(out), "--text", "a truly wonderful film", "the acting was awful", "--json")
    predictions = json.loads(proc.stdout)["predictions"]
    assert [p["label"] for p in predictions] == ["pos", "neg"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    line = cli("classify", "--model", str(out), "--text", "superb").stdout
    assert line.startswith("pos\t(neg ")


def test_classify_lora_reports_its_trainable_parts(root):
    proc = cli(*finetune_args(root, "clora", "train.csv", "--task", "classify", "--method", "lora", "--max-steps",
                              "2"))
    assert proc.returncode == 0, proc.stderr
    assert "LoRA r=8" in proc.stdout
    adapter = load_file(str(root / "clora" / "adapter.safetensors"))
    assert {"out_head.weight", "out_head.bias"} <= set(adapter)  # the new head trains whole


def test_prompt_training_truncation_and_named_columns(root):
    proc = cli(*finetune_args(root, "prompt", "inst.jsonl", "--train-on-prompt", "--max-length", "40", "--max-steps",
                              "1", "--max-new-tokens", "2", "--val-fraction", "0.25"))
    assert proc.returncode == 0, proc.stderr
    assert "loss on the prompt and response" in proc.stdout and "(3 train, 1 validation)" in proc.stdout
    assert "warning: 3 of the 3 training examples are longer than 40 tokens: 3 are truncated" in proc.stderr
    settings = json.loads((root / "prompt" / "train_config.json").read_text())
    assert settings["train_on_prompt"] is True and settings["max_length"] == 40
    rows = [{"review": text, "stars": 5 if label == "pos" else 1} for text, label in labelled_rows(40)]
    (root / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    proc = cli(*finetune_args(root, "stars", "reviews.jsonl", "--task", "classify", "--text-column", "review",
                              "--label-column", "stars", "--trainable", "head", "--max-steps", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "trainable: head" in proc.stdout and json.loads((root / "stars" / "classifier.json").read_text())[
        "labels"] == ["1", "5"]
    result = json.loads(cli("classify", "--model", str(root / "stars"), "--data", str(root / "reviews.jsonl"),
                            "--json").stdout)  # the run's column names by default
    assert result["examples"] == 40 and result["labels"] == ["1", "5"]
