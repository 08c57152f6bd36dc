"""Randomized crash-safety suite: kill `gptlab train` (SIGKILL) at random moments, then check the run survives.

Each trial picks a random fault (during a checkpoint save, during any atomic file write, or between two
steps), runs a tiny training with GPTLAB_FAULT set, then checks that the last complete checkpoint loads,
that `--resume` (or a fresh start, when the kill came before the first checkpoint) finishes, and that the
final metrics.jsonl losses equal an uninterrupted run's bit for bit.

    python bench/fault_injection.py --trials 40 [--workers 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)

STEPS = 10
SAVE_EVERY = 2
TINY = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.1}
WORDS = "the model reads every word and learns which word comes next so the loss falls step after step".split()


def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("GPTLAB_FAULT", None)
    if fault:
        env["GPTLAB_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True, env=env)


def train_args(root: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("train", "--data", str(root / "text.txt"), "--model", str(root / "tiny.json"), "--out", str(out),
            "--batch-size", "4", "--eval-iters", "1", "--eval-every", "2", "--save-every", str(SAVE_EVERY),
            "--max-steps", str(STEPS), "--sample-prompt=", "--quiet", *extra)


def losses(out: Path) -> list[tuple]:
    return [(m["step"], m["train_loss"], m["val_loss"])
            for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def random_fault(rng: random.Random) -> str:
    kind = rng.choice(["kill-during-save", "kill-during-write", "kill-at-step"])
    if kind == "kill-during-save":
        return f"{kind}:{rng.randint(1, STEPS // SAVE_EVERY)}"
    if kind == "kill-during-write":
        return f"{kind}:{rng.randint(1, 30)}"
    return f"{kind}:{rng.randint(1, STEPS - 1)}"


def trial(root: Path, index: int, fault: str, reference: list[tuple]) -> dict:
    from gptlab.errors import GptlabError
    from gptlab.training.checkpoint import read_checkpoint

    out = root / f"trial-{index}"
    result = {"fault": fault, "killed": False, "checkpoint_ok": None, "resumed": False, "bit_exact": False}
    proc = cli(*train_args(root, out), fault=fault)
    result["killed"] = proc.returncode == -signal.SIGKILL
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        try:
            result["checkpoint_step"] = read_checkpoint(ckpt)["step"]
            result["checkpoint_ok"] = True
        except GptlabError as exc:
            result["checkpoint_ok"] = False
            result["error"] = str(exc)
    if result["killed"]:
        again = cli(*train_args(root, out, "--resume" if result["checkpoint_ok"] else "--force"))
        result["resumed"] = again.returncode == 0
        if not result["resumed"]:
            result["error"] = again.stderr.strip().splitlines()[-1:]
    result["bit_exact"] = (out / "metrics.jsonl").exists() and losses(out) == reference
    result["temp_files_left"] = len(list(out.rglob("*.tmp")))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the per-trial results too")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = random.Random(0)
        (root / "text.txt").write_text(" ".join(words.choice(WORDS) for _ in range(2500)), encoding="utf-8")
        (root / "tiny.json").write_text(json.dumps(TINY), encoding="utf-8")
        ref = cli(*train_args(root, root / "reference"))
        if ref.returncode != 0:
            print(ref.stderr, file=sys.stderr)
            return 1
        reference = losses(root / "reference")
        faults = [random_fault(rng) for _ in range(args.trials)]
        with ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(lambda i: trial(root, i, faults[i], reference), range(args.trials)))
    killed = [r for r in results if r["killed"]]
    counts = {
        "trials": len(results),
        "kills": len(killed),
        "kills_survived": sum(r["resumed"] and r["bit_exact"] for r in killed),
        "lost_or_corrupt_checkpoints": sum(r["checkpoint_ok"] is False for r in results),
        "bit_exact_resumes": sum(r["bit_exact"] for r in killed),
        "not_killed_runs_bit_exact": sum(r["bit_exact"] for r in results if not r["killed"]),
        "temp_files_left": sum(r["temp_files_left"] for r in results),
    }
    if args.json:
        for r in results:
            print(json.dumps(r))
    print(json.dumps(counts))
    bad = counts["kills"] - counts["kills_survived"] + counts["lost_or_corrupt_checkpoints"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
