import json

import pytest
import torch

from gptlab import GPTModel, load_model, save_model
from gptlab.generation.generate import generate
from gptlab.tokenizer import EOT_ID, decode, encode
from tests.helpers import assert_clean_error, run_cli, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=24))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # varied, non-tied greedy choices
    return str(save_model(model, tmp_path_factory.mktemp("model") / "tiny"))


def test_json_shape_and_greedy_tokens(model_dir):
    proc = run_cli("generate", "--model", model_dir, "--prompt", "Every effort moves you", "--max-new-tokens", "6",
                   "--temperature", "0", "--num-samples", "2", "--no-eos-stop", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one object on stdout
    assert set(out) == {"prompt_ids", "completions"}
    assert out["prompt_ids"] == encode("Every effort moves you")
    assert len(out["completions"]) == 2
    model = load_model(model_dir)
    expected = generate(model, torch.tensor([out["prompt_ids"]]), 6)[0, len(out["prompt_ids"]) :].tolist()
    for c in out["completions"]:
        assert set(c) == {"text", "token_ids"}
        assert c["token_ids"] == expected  # new ids only
        assert c["text"] == decode(expected)


def test_seeded_sampling_repeats_and_streams_the_same_text(model_dir):
    args = ("generate", "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "3",
            "--top-k", "40", "--top-p", "0.9", "--no-eos-stop")
    a, b = run_cli(*args, "--json"), run_cli(*args, "--json")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    completion = json.loads(a.stdout)["completions"][0]
    assert len(completion["token_ids"]) == 8
    streamed = run_cli(*args, "--verbose")  # the default: text streamed to stdout
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "Hello" + completion["text"] + "\n"
    assert "tokens/s" in streamed.stderr


def test_empty_prompt_starts_from_endoftext_and_long_prompt_is_cropped(model_dir):
    proc = run_cli("generate", "--model", model_dir, "--prompt", "", "--max-new-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_ids"] == [EOT_ID]
    long_text = "one two three four five six seven eight nine ten " * 4
    proc = run_cli("generate", "--model", model_dir, "--prompt", long_text, "--max-new-tokens", "3", "--json",
                   "--context-size", "16")
    assert proc.returncode == 0, proc.stderr
    n = len(encode(long_text))
    assert f"warning: prompt has {n} tokens, more than the context of 16; using its last 16" in proc.stderr
    assert json.loads(proc.stdout)["prompt_ids"] == encode(long_text)[-16:]


@pytest.mark.parametrize(
    "extra, needles",
    [
        (("--temperature", "-1"), ("--temperature", "0 or more")),
        (("--top-p", "0"), ("--top-p", "(0, 1]")),
        (("--top-p", "1.5"), ("--top-p", "(0, 1]")),
        (("--top-k", "0"), ("--top-k", "at least 1")),
        (("--max-new-tokens", "-2"), ("--max-new-tokens", "0 or more")),
        (("--context-size", "25"), ("--context-size 25", "context_length 24")),
    ],
)
def test_bad_inputs_are_one_line_errors(model_dir, extra, needles):
    proc = run_cli("generate", "--model", model_dir, "--prompt", "hi", *extra)
    assert_clean_error(proc, 2, *needles)


def test_unknown_model_and_token_outside_vocabulary(tmp_path):
    assert_clean_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), 2, "no model at")
    small = GPTModel(tiny_config(vocab_size=100))
    folder = save_model(small, tmp_path / "small")
    proc = run_cli("generate", "--model", str(folder), "--prompt", "Hello world", "--json")
    assert_clean_error(proc, 2, "outside the model's vocabulary")
