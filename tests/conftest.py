"""pytest fixtures shared by every test package (helper functions live in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

from gptlab import GPTConfig
from tests.helpers import tiny_config

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny() -> GPTConfig:
    return tiny_config()
