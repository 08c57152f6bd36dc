"""Shared test helpers: tiny configs, running the CLI in a subprocess, checking its errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from gptlab import GPTConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"


def tiny_config(**overrides) -> GPTConfig:
    """A model small enough to run thousands of times in a test (GPT-2 vocab, 2 layers)."""
    base = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
    base.update(overrides)
    return GPTConfig(**base)


def run_cli(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m gptlab ARGS` in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gptlab", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        input=input,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """A CLI failure: the given exit code, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(err_lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in err_lines[0].lower(), (needle, err_lines[0])


TINY_TRAIN_MODEL = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                    "drop_rate": 0.1}


def write_training_fixture(root: Path, words: list[str], n_words: int = 2500) -> Path:
    """A seeded random-word corpus (text.txt) and a tiny model config (tiny.json) in `root`."""
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)) + "\n", encoding="utf-8")
    (root / "tiny.json").write_text(json.dumps(TINY_TRAIN_MODEL), encoding="utf-8")
    return root
