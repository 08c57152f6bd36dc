"""--batch-size auto: the micro-batch search against a simulated device memory limit; --global-batch."""

import json

import pytest
import torch

from gptlab import GptlabError, GPTModel, UsageError, faults
from gptlab.training.autobatch import find_micro_batch, probe_training_step
from tests.helpers import tiny_config


def test_search_finds_the_largest_batch_that_fits():
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        if batch > 37:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return True

    assert find_micro_batch(fits, margin=1.0) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and len(tried) <= 13  # doubling, then a short bisection
    assert find_micro_batch(lambda b: b <= 37, margin=0.9) == 33
    assert find_micro_batch(lambda b: True, limit=48) == 43  # never past the limit
    with pytest.raises(GptlabError, match="micro-batch of 1 does not fit"):
        find_micro_batch(lambda b: False)
    with pytest.raises(RuntimeError, match="device-side assert"):  # other errors are not memory
        find_micro_batch(lambda b: (_ for _ in ()).throw(RuntimeError("device-side assert triggered")))


def test_real_probes_under_a_simulated_limit(monkeypatch):
    """The probe runs a real forward and backward pass; the fault hook plays the device's memory limit."""
    monkeypatch.setenv(faults.ENV, "oom-above:12")
    monkeypatch.setattr(faults, "_plan", None)
    model = GPTModel(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert find_micro_batch(lambda b: probe_training_step(model, b, 16), margin=1.0) == 12
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.setattr(faults, "_plan", None)


def train_tiny(root, out, log, **run):
    from gptlab.training.run import run_training
    from gptlab.training.settings import RunConfig, TrainConfig

    settings = dict(data=[str(root / "text.txt")], model=str(root / "tiny.json"), **run)
    return run_training(RunConfig(**settings), TrainConfig(max_steps=2, eval_every=2, eval_iters=1, sample_prompt="", warmup_steps=0),
                        out, log=log.append)


@pytest.fixture
def corpus(tmp_path):
    from tests.helpers import write_training_fixture

    return write_training_fixture(tmp_path, "one two three four five six seven".split(), n_words=3000)


def test_batch_size_auto_is_searched_and_recorded(corpus, monkeypatch):
    """--batch-size auto: 8 on a CPU; under a (simulated) memory limit, 90% of the largest micro-batch that fits.
    The run records the number found, so that it resumes with it."""
    log = []
    train_tiny(corpus, corpus / "cpu", log, batch_size="auto")
    assert json.loads((corpus / "cpu" / "train_config.json").read_text())["batch_size"] == 8
    assert any("--batch-size auto: 8 windows per micro-batch (on a CPU)" in line for line in log)
    monkeypatch.setenv(faults.ENV, "oom-above:20")
    monkeypatch.setattr(faults, "_plan", None)
    log.clear()
    train_tiny(corpus, corpus / "limited", log, batch_size="auto", global_batch=36)
    saved = json.loads((corpus / "limited" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["grad_accum"], saved["global_batch"]) == (18, 2, 36)
    assert any("--batch-size auto: 18 windows" in line for line in log)
    monkeypatch.setattr(faults, "_plan", None)


def test_global_batch_sets_gradient_accumulation(corpus):
    log = []
    result = train_tiny(corpus, corpus / "g", log, batch_size=4, global_batch=12)
    saved = json.loads((corpus / "g" / "train_config.json").read_text())
    assert saved["grad_accum"] == 3 and result.tokens_seen[-1] == 2 * 12 * 16  # 2 steps of 12 windows of 16
    with pytest.raises(UsageError, match="--global-batch 10 is not a multiple of 4"):
        train_tiny(corpus, corpus / "g2", log, batch_size=4, global_batch=10)


def test_a_fresh_model_on_a_gpu_gets_a_padded_vocabulary():
    """Built for CUDA, a fresh model's vocabulary is padded to 64 (the logits keep the tokenizer's size);
    --vocab-multiple still decides, and a CPU build is left as it is."""
    from gptlab.training.run import build_model
    from gptlab.training.settings import RunConfig

    gpu = build_model(RunConfig(model="gpt-nano"), None, torch.device("cuda"))
    assert (gpu.config.vocab_size, gpu.config.padded_vocab_size, gpu.tok_emb.weight.shape[0]) == (50257, 50304, 50304)
    assert gpu(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 50257
    assert build_model(RunConfig(model="gpt-nano"), None, torch.device("cpu")).config.padded_vocab_size == 50257
    assert build_model(RunConfig(model="gpt-nano", vocab_multiple=1), None,
                       torch.device("cuda")).config.padded_vocab_size == 50257
