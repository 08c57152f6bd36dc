"""Fixtures for the server's tests: a tiny saved model and `gptlab serve` running on it in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from tests.helpers import SRC, tiny_config


def save_tiny(folder: Path, context_length: int = 512, seed: int = 0) -> str:
    """A tiny random model whose weights are scaled up, so its next-token choices are varied and not near-ties."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config(context_length=context_length))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return str(save_model(model, folder))


class ServerProcess:
    """`gptlab serve ... --port 0` in a subprocess; `url` once it printed its address."""

    def __init__(self, *args: str, cwd: Path, timeout: float = 120) -> None:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2")
        self.out, self.err = cwd / "stdout.txt", cwd / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", "--port", "0", *args],
                                         stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout
        while not (match := re.search(r"serving (\S+) on (http://\S+) ", self.out.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start: {self.err.read_text()[-2000:]}")
            time.sleep(0.05)
        self.name, self.url = match.group(1), match.group(2)

    @property
    def log(self) -> str:
        return self.err.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("serve-model") / "tiny")


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """One server shared by the API tests (it must keep serving after every bad request)."""
    srv = ServerProcess("--model", model_dir, "--max-batch", "16", cwd=tmp_path_factory.mktemp("serve-run"))
    yield srv
    assert srv.stop() == 0, srv.log


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
