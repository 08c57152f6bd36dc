"""Benchmark `gptlab prepare`: MB/s and peak memory with 1 and 2 workers, against one tiktoken call.

    python bench/prepare_bench.py [--mb 64] [--files 8] [--workers 1 2]

The corpus is generated from the standard library's pydoc_data.topics (shuffled help texts) into a
temporary folder. Every measurement runs in a fresh subprocess so its peak RSS is its own:
  baseline       one `encode_ordinary` call over the whole corpus read into one string
  prepare_wN     prepare_dataset(..., workers=N): main process + N worker processes
Peak memory: ru_maxrss of the main process, and of the largest worker (RUSAGE_CHILDREN gives the
maximum over children); `tree_peak_mib_bound` = main + N * largest worker, an upper bound of the
tree's peak. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, resource, sys, time
mode, corpus, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from pathlib import Path
files = sorted(Path(corpus).iterdir())
n_bytes = sum(f.stat().st_size for f in files)
from gptlab.tokenizer import get_tokenizer
enc = get_tokenizer()
start = time.perf_counter()
if mode == "baseline":
    text = "".join(f.read_bytes().decode("utf-8") for f in files)
    n_tokens = len(enc.encode_ordinary(text))
else:
    from gptlab.data.prepare import prepare_dataset
    meta = prepare_dataset([corpus], out, workers=workers, force=True, progress=False)
    n_tokens = meta["train_tokens"] + meta["val_tokens"] - meta["documents"]  # without the <|endoftext|>s
seconds = time.perf_counter() - start
kib = lambda who: resource.getrusage(who).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "mb_per_s": n_bytes / 1e6 / seconds, "tokens": n_tokens,
                  "main_peak_mib": kib(resource.RUSAGE_SELF), "worker_peak_mib": kib(resource.RUSAGE_CHILDREN)}))
"""


def make_corpus(folder: Path, total_mb: float, n_files: int, seed: int = 0) -> int:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    texts = list(topics.values())
    per_file = int(total_mb * 1e6 / n_files)
    written = 0
    for i in range(n_files):
        size = 0
        with open(folder / f"part{i:03d}.txt", "w", encoding="utf-8") as fh:
            while size < per_file:
                text = rng.choice(texts)
                fh.write(text)
                size += len(text.encode("utf-8"))
        written += size
    return written


def measure(mode: str, corpus: Path, out: Path, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, str(corpus), str(out), str(workers)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if mode != "baseline":
        result["tree_peak_mib_bound"] = result["main_peak_mib"] + workers * result["worker_peak_mib"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64.0, help="corpus size in MB (default 64)")
    parser.add_argument("--files", type=int, default=8, help="number of files (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        n_bytes = make_corpus(corpus, args.mb, args.files)
        report = {"corpus_bytes": n_bytes, "files": args.files, "cpus": os.cpu_count(),
                  "baseline_encode_ordinary": measure("baseline", corpus, Path(tmp) / "none", 1)}
        for w in args.workers:
            report[f"prepare_workers_{w}"] = measure("prepare", corpus, Path(tmp) / f"out{w}", w)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
