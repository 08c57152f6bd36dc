"""`finetune` end to end on a tiny model: instructions learnt exactly (full and LoRA), the run folder, exact
resume, reloading an adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gptlab import (
    GPTModel,
    finetune,
    load_adapter,
    load_pretrained,
    load_template,
    merge_lora,
    respond,
    save_model,
)
from gptlab.errors import UsageError
from gptlab.finetune.lora import ADAPTER_CONFIG_NAME, ADAPTER_NAME
from tests.helpers import (
    INSTRUCTIONS,
    TINY_FINETUNE_MODEL,
    tiny_config,
    write_instructions,
    write_labelled_csv,
)

QUIET = dict(quiet=True, log=lambda *a: None)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random model saved as a folder, and the instruction files. Each file is also its own
    validation file: every instruction is trained on and then asked."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    save_model(GPTModel(tiny_config(**{k: v for k, v in TINY_FINETUNE_MODEL.items() if k != "vocab_size"})),
               root / "base")
    write_instructions(root / "inst.json")
    write_instructions(root / "swapped.json", SWAPPED)
    return root


# The same instructions, each with the next one's answer: what the LoRA run has to learn on top of a model
# that answers them correctly (on a random frozen model, adapters could move the answers, but barely the loss).
SWAPPED = [dict(e, output=INSTRUCTIONS[(i + 1) % len(INSTRUCTIONS)]["output"]) for i, e in enumerate(INSTRUCTIONS)]


def tune(root, init, data, out, **settings):
    return finetune(root / init, str(root / data), root / out, val_data=str(root / data), batch_size=4,
                    warmup_steps=0, sample_responses=0, **QUIET, **settings)


@pytest.fixture(scope="module")
def full_run(base):
    return base / "full", tune(base, "base", "inst.json", "full", max_steps=60, lr=1e-2, eval_every=30,
                               max_new_tokens=12)


@pytest.fixture(scope="module")
def lora_run(base, full_run):
    result = tune(base, "full", "swapped.json", "lora", method="lora", max_steps=40, lr=2e-2, lora_dropout=0.0,
                  eval_every=20, max_new_tokens=12)
    return base / "lora", result


def test_full_finetuning_answers_its_instructions_exactly(full_run):
    out, result = full_run
    model = load_pretrained(out)
    assert respond(model, INSTRUCTIONS, max_new_tokens=12) == [e["output"] for e in INSTRUCTIONS]
    assert result.val_losses[-1] < 0.5 < result.val_losses[0]
    lines = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert lines == [{**e, "model_response": e["output"]} for e in INSTRUCTIONS]
    assert load_template(out).name == "alpaca"
    assert not (out / ADAPTER_NAME).exists()


def test_lora_finetuning_answers_exactly_and_saves_the_merged_model(lora_run, base):
    out, result = lora_run
    model = load_pretrained(out)  # plain weights: the adapters merged in
    assert respond(model, SWAPPED, max_new_tokens=12) == [e["output"] for e in SWAPPED]
    assert result.val_losses[-1] < 0.5 < result.val_losses[0]
    saved = load_file(str(out / "model.safetensors"))
    assert not [k for k in saved if "lora" in k or ".linear." in k]
    adapter = load_file(str(out / ADAPTER_NAME))
    assert set(adapter) == {f"trf_blocks.{i}.{m}.lora.{p}" for i in range(2)
                            for m in ("att.qkv", "att.out_proj", "ff.fc", "ff.proj") for p in "AB"}
    info = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert (info["r"], info["alpha"], info["targets"]) == (8, 16.0, ["qkv", "out_proj", "fc", "proj"])
    base_model = load_pretrained(base / "full")
    unchanged = {k: v for k, v in saved.items() if "trf_blocks" not in k or "norm" in k or k.endswith("bias")}
    assert all(torch.equal(v, base_model.state_dict()[k]) for k, v in unchanged.items())  # base weights frozen
    # the adapter alone, put on the base model, is the same model
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    reloaded = load_adapter(load_pretrained(base / "full"), out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(reloaded)(ids), model(ids), atol=1e-5, rtol=0)


def test_adapter_reload_continues_from_the_adapter(lora_run, base):
    out, result = lora_run
    again = tune(base, "full", "swapped.json", "again", adapter=str(out), max_steps=1, lr=1e-9, max_new_tokens=0)
    assert again.metrics[0]["val_loss"] == pytest.approx(result.metrics[-1]["val_loss"], abs=1e-5)
    assert json.loads((base / "again" / ADAPTER_CONFIG_NAME).read_text())["alpha"] == 16.0
    data = str(base / "inst.json")
    with pytest.raises(UsageError, match="trained on other base weights"):
        finetune(base / "base", data, base / "x", adapter=str(out), **QUIET)
    save_model(GPTModel(tiny_config(emb_dim=64, context_length=64)), base / "wider")
    with pytest.raises(UsageError, match="another base model.*emb_dim 32"):
        finetune(base / "wider", data, base / "y", adapter=str(out), **QUIET)
    with pytest.raises(UsageError, match="holds no LoRA adapter"):
        finetune(base / "base", data, base / "z", adapter=str(base / "base"), **QUIET)
    assert not any((base / n).exists() for n in "xyz")


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", ["instruct-full", "classify-lora"])
def test_resume_is_bit_exact(base, case):
    """Stopped after 3 steps and resumed to 7 = 7 steps in one go (dropout on, so the RNGs matter too)."""
    if case == "classify-lora":
        data = str(write_labelled_csv(base / "cls.csv", 40))
        settings = dict(task="classify", method="lora", lora_dropout=0.2, drop_rate=0.1, batch_size=4)
    else:
        data = str(base / "inst.json")
        settings = dict(drop_rate=0.1, batch_size=2, max_new_tokens=0, sample_responses=1)
    common = dict(lr=1e-2, decay_steps=7, warmup_steps=2, eval_every=2, save_every=2, **QUIET, **settings)
    finetune(base / "base", data, base / f"{case}-whole", max_steps=7, **common)
    finetune(base / "base", data, base / f"{case}-cut", max_steps=3, **common)
    finetune(base / "base", data, base / f"{case}-cut", max_steps=7, resume=True, **common)
    whole, cut = base / f"{case}-whole", base / f"{case}-cut"
    steps = {m["step"] for m in metrics(whole)}
    assert [m for m in metrics(cut) if m["step"] in steps] == metrics(whole)  # (+ where the first part stopped)
    assert all(torch.equal(v, weights(whole)[k]) for k, v in weights(cut).items())
    if case == "classify-lora":
        assert torch.equal(load_file(str(cut / ADAPTER_NAME))["out_head.weight"],
                           load_file(str(whole / ADAPTER_NAME))["out_head.weight"])


def test_python_objects_as_model_and_data(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64))
    result = finetune(model, INSTRUCTIONS, tmp_path / "inst", max_steps=2, batch_size=2, max_new_tokens=0, **QUIET)
    assert result.state.step == 2 and json.loads((tmp_path / "inst" / "train_config.json").read_text())["data"] is None
    rows = [{"text": f"{word} film", "label": label} for word, label in
            [("great", "pos"), ("awful", "neg")] * 6]
    result = finetune(model, rows, tmp_path / "cls", task="classify", max_steps=2, batch_size=4, **QUIET)
    assert "val_accuracy" in result.metrics[-1]
    with pytest.raises(UsageError, match="record 2: missing 'label'"):
        finetune(model, [{"text": "a", "label": "x"}, {"text": "b"}], tmp_path / "bad", task="classify", **QUIET)
    with pytest.raises(UsageError, match="unknown fine-tuning setting.*did you mean 'lora_r'"):
        finetune(model, INSTRUCTIONS, tmp_path / "bad", lora_rank=4, **QUIET)


def test_a_model_with_its_own_tokenizer_is_tuned_with_it(tmp_path):
    """Instruction and classification tuning of a model that carries a trained tokenizer (300 tokens,
    <|endoftext|> = 0): data, padding, answers and the run folders use it, and `generate --instruction`
    and `classify` read it from the folder."""
    from gptlab import train_tokenizer
    from gptlab.finetune.classifier import load_classifier
    from tests.helpers import run_cli

    corpus = tmp_path / "corpus.txt"
    from gptlab.finetune.instructions import format_instruction

    corpus.write_text("\n".join(format_instruction(e, "alpaca") + e["output"] for e in INSTRUCTIONS * 20)
                      + " great awful film", encoding="utf-8")
    tok = train_tokenizer([corpus], 300, tmp_path / "tok", progress=False)
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=tok.n_vocab, context_length=128))
    model.tokenizer = tok
    save_model(model, tmp_path / "base")
    write_instructions(tmp_path / "inst.json")
    tune(tmp_path, "base", "inst.json", "run", max_steps=60, lr=1e-2, eval_every=60, max_new_tokens=0)
    tuned = load_pretrained(tmp_path / "run")
    assert tuned.tokenizer.name == tok.name and (tmp_path / "run" / "tokenizer.json").is_file()
    assert respond(tuned, INSTRUCTIONS, max_new_tokens=24) == [e["output"] for e in INSTRUCTIONS]
    asked = run_cli("generate", "--model", str(tmp_path / "run"), "--instruction", INSTRUCTIONS[2]["instruction"],
                    "--input", INSTRUCTIONS[2]["input"], "--max-new-tokens", "24")
    assert asked.returncode == 0 and asked.stdout.strip() == INSTRUCTIONS[2]["output"], asked.stderr
    rows = [{"text": f"{word} film", "label": label} for word, label in [("great", "pos"), ("awful", "neg")] * 6]
    finetune(tmp_path / "base", rows, tmp_path / "cls", task="classify", max_steps=2, batch_size=4, **QUIET)
    assert load_classifier(tmp_path / "cls").tokenizer.name == tok.name
    labelled = run_cli("classify", "--model", str(tmp_path / "cls"), "--text", "great film")
    assert labelled.returncode == 0 and labelled.stdout.split()[0] in ("pos", "neg"), labelled.stderr
