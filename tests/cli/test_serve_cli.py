"""`gptlab serve`'s own failures: a port in use and a missing `serve` extra, each one line and exit 2."""

from __future__ import annotations

import socket

import pytest
import torch

from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from tests.helpers import assert_clean_error, run_cli, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_model(GPTModel(tiny_config()), tmp_path_factory.mktemp("serve-cli") / "tiny"))


def test_a_port_in_use_is_one_line_before_the_model_loads(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--model", model_dir, "--port", str(port), timeout=120)
    assert_clean_error(proc, 2, f"127.0.0.1:{port}", "in use", "--port")
    assert "serving" not in proc.stdout


def test_a_missing_serve_extra_says_how_to_install_it(model_dir, tmp_path):
    (tmp_path / "fastapi.py").write_text("raise ImportError(\"No module named 'fastapi'\")\n")
    proc = run_cli("serve", "--model", model_dir, "--port", "0", env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert_clean_error(proc, 2, "pip install fastapi uvicorn")


def test_serve_help_names_the_options():
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0
    for option in ("--model", "--host", "--port", "--name", "--dtype", "--device", "--max-batch", "--max-queue",
                   "--max-body-bytes"):
        assert option in proc.stdout
