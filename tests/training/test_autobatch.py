"""--batch-size auto: the micro-batch search against a simulated device memory limit."""

import pytest
import torch

from gptlab import GptlabError, GPTModel, faults
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
