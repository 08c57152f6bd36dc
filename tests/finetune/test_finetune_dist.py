"""`gptlab finetune --method lora` under a real `torchrun --nproc_per_node 2` (CPU, gloo) against one process.

Every example has the same length and the same number of scored tokens, so the mean of the two
ranks' batch losses equals one process's loss over both ranks' examples: with --batch-size 2 on each
of 2 ranks, metrics.jsonl must equal one process's with --batch-size 4 (DDP and FSDP alike).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from gptlab.finetune.templates import format_instruction
from gptlab.tokenizer import get_tokenizer
from tests.helpers import SRC, run_cli

TOL = 1e-4
TINY = {"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
        "qkv_bias": False}
WORDS = ("apple river window letter city doctor flower table horse bottle forest ticket planet bridge water "
         "music paper money house night light").split()


def equal_length_records() -> list[dict]:
    tok = get_tokenizer()
    records = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in WORDS]
    shape = [(len(tok.encode_ordinary(format_instruction(r))), len(tok.encode_ordinary(r["output"]))) for r in records]
    common = max(set(shape), key=shape.count)
    chosen = [r for r, s in zip(records, shape, strict=True) if s == common][:12]
    assert len(chosen) == 12
    return chosen


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptlab",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def losses(run):
    return [(r["step"], r["tokens_seen"], r["train_loss"], r["val_loss"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_lora_on_two_ranks_equals_one_process(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(equal_length_records()), encoding="utf-8")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY), encoding="utf-8")
    common = ["finetune", "--init", str(tmp_path / "tiny.json"), "--data", str(tmp_path / "data.json"), "--val-data",
              str(tmp_path / "data.json"), "--method", "lora", "--max-steps", "4", "--eval-every", "1", "--eval-iters",
              "10", "--quiet", "--warmup-steps", "0", "--lr-schedule", "constant", "--lr", "1e-2",
              "--sample-responses", "1", "--max-new-tokens", "3"]
    one = run_cli(*common, "--batch-size", "4", "--out", str(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    expected = losses(tmp_path / "one")
    reference = load_file(str(tmp_path / "one" / "model.safetensors"))
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        proc = torchrun(*common, "--batch-size", "2", "--strategy", strategy, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = losses(out)
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert all(abs(g[i] - e[i]) < TOL for g, e in zip(got, expected, strict=True) for i in (2, 3)), (got, expected)
        merged = load_file(str(out / "model.safetensors"))
        assert all(torch.allclose(v, reference[k], atol=1e-5) for k, v in merged.items())
        assert (out / "adapter.safetensors").is_file() and len((out / "responses.jsonl").read_text().splitlines()) == 12
