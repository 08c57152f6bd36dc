"""pytest fixtures shared by every test package (helper functions live in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

from gptlab import GPTConfig
from tests.helpers import tiny_config

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The C kernel's speed check (generation/kernel.py) times decoding at preparation: on tiny test models,
# on a machine busy with other tests, its decision would come out either way. Tests use the kernel
# wherever it builds (the check is tested on its own); subprocesses inherit this.
os.environ.setdefault("GPTLAB_KERNEL_SPEED_CHECK", "0")


@pytest.fixture
def tiny() -> GPTConfig:
    return tiny_config()
