"""`gptlab train --data PREPARED` under a real `torchrun --nproc_per_node 2` (CPU, gloo) against one process.

One single-process run (compiled with the `eager` backend) is the reference for DDP, for DDP stopped
and resumed, and for FSDP: each rank reads --batch-size 2 windows of every global batch of 4, so the
losses in metrics.jsonl must equal the single process's with --batch-size 4.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.data.prepare import prepare_dataset
from gptlab.pretrained.native import load_model
from gptlab.training.checkpoint import read_checkpoint
from tests.helpers import SRC, assert_clean_error, run_cli

TOL = 1e-4
# No qkv bias: the key bias has an exactly-zero true gradient, so AdamW would amplify rounding noise.
TINY = {"vocab_size": 50257, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": False}
WORDS = "the a function returns value list of data python class method module string number file object".split()


def common(data: Path, model: Path) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--eval-every", "1", "--eval-iters", "2", "--quiet",
            "--warmup-steps", "0", "--lr-schedule", "constant", "--grad-accum", "2", "--sample-prompt", ""]


def torchrun(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptlab", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def losses(run: Path) -> list[tuple[int, int, float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["tokens_seen"], r["train_loss"], r["val_loss"]) for r in records]


def assert_same_losses(a: list, b: list) -> None:
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra[2] - rb[2]) < TOL and abs(ra[3] - rb[3]) < TOL, (ra, rb)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_train")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(3):
        (root / "corpus" / f"f{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(2000)))
    prepare_dataset([root / "corpus"], root / "prep", val_fraction=0.2, workers=1)
    (root / "tiny.json").write_text(json.dumps(TINY))
    ref = root / "ref"
    proc = run_cli("train", *common(root / "prep", root / "tiny.json"), "--batch-size", "4", "--max-steps", "3",
                   "--compile", "--compile-backend", "eager", "--out", str(ref))
    assert proc.returncode == 0, proc.stderr
    return root, losses(ref)


def test_ddp_matches_one_process_and_resumes_exactly(setup):
    root, reference = setup
    run = root / "ddp"
    proc = torchrun(*common(root / "prep", root / "tiny.json"), "--batch-size", "2", "--max-steps", "2",
                    "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks and no --strategy: using ddp" in proc.stderr + proc.stdout
    assert (proc.stdout + proc.stderr).count("Train loss") == 3  # rank 0 alone logs (steps 0, 1, 2)
    ckpt = read_checkpoint(run / "checkpoint.pt")
    assert ckpt["extra"]["world_size"] == 2 and ckpt["step"] == 2
    # Another number of ranks is refused before anything is touched.
    assert_clean_error(run_cli("train", "--out", str(run), "--resume", "--max-steps", "3"), 2,
                       "--nproc_per_node 2")
    proc = torchrun("--out", str(run), "--resume", "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(losses(run), reference)


def test_fsdp_matches_one_process_and_saves_a_plain_model(setup):
    root, reference = setup
    run = root / "fsdp"
    # With a sample prompt: generation runs on every rank (FSDP's forward gathers the shards).
    args = common(root / "prep", root / "tiny.json")
    args[args.index("--sample-prompt") + 1] = "the"
    args += ["--sample-tokens", "3"]
    proc = torchrun(*args, "--batch-size", "2", "--max-steps", "3", "--strategy", "fsdp", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(losses(run), reference)
    assert "the" in proc.stdout  # rank 0 printed the sample
    # The model folder holds whole tensors with plain names: the same weights as the reference's.
    sharded, single = load_model(run).state_dict(), load_model(root / "ref").state_dict()
    assert sharded.keys() == single.keys()
    assert max((sharded[k] - single[k]).abs().max().item() for k in single) < 1e-3
    proc = run_cli("eval", "--model", str(run), "--data", str(root / "prep"), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((root / "prep" / "meta.json").read_text())
    score = json.loads(proc.stdout)
    assert score["tokens"] == meta["val_tokens"] - 1  # val.bin, every token after the first
    assert abs(score["loss"] - losses(run)[-1][3]) < 0.05  # whole val.bin vs the first 2 batches


def test_compiled_run_saves_plain_names_that_load_uncompiled(setup):
    root, _ = setup
    ckpt = read_checkpoint(root / "ref" / "checkpoint.pt")
    assert ckpt["model"] and not any("_orig_mod" in k for k in ckpt["model"])
    model = load_model(root / "ref")  # a plain GPTModel, never compiled
    assert not hasattr(model, "_orig_mod")
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, TINY["vocab_size"])


def test_strategy_none_on_several_ranks_is_refused_with_the_rank(setup):
    root, _ = setup
    proc = run_cli("train", *common(root / "prep", root / "tiny.json"), "--strategy", "none",
                   "--out", str(root / "never"), env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert_clean_error(proc, 2, "(rank 1)", "--strategy none")
    assert not (root / "never").exists()


def test_prepared_loader_ranks_and_resume_skip(tmp_path):
    import numpy as np

    from gptlab.data.prepared import PreparedLoader
    from gptlab.data.tokenfile import TokenFileDataset

    path = tmp_path / "train.bin"
    np.arange(1000, dtype="<u2").tofile(path)
    data = TokenFileDataset(path, 8)  # 124 windows
    one = PreparedLoader(data, 4, seed=3)
    ranks = [PreparedLoader(data, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == 31
    whole = list(one)
    halves = [list(loader) for loader in ranks]
    for k, (x, y) in enumerate(whole):  # rank r holds block r of every global batch
        assert torch.equal(x, torch.cat([halves[0][k][0], halves[1][k][0]]))
        assert torch.equal(y[:, :-1], x[:, 1:])
    assert not torch.equal(list(one)[0][0], whole[0][0])  # the next epoch is another permutation
    one.generator.set_state(torch.tensor([0]))
    resumed = list(one.iter_from(29))  # a resumed run jumps there without reading batches 0..28
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(resumed, whole[29:], strict=True))
