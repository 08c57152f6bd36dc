"""Runs ONE benchmark job in this process and writes its result as JSON.

Usage (the harness calls it): python -m bench.child SPEC_JSON RESULT_PATH
Each job gets a fresh process, so ru_maxrss is that job's own peak resident memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from .contestants import CONTESTANTS, SHAPES, Book, Shape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def seeded_tokens(shape: Shape, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, shape.vocab_size, (batch, length), generator=g)


def job_shape(spec: dict) -> Shape:
    shape = SHAPES[spec["shape"]]
    if spec["kind"] in ("train", "eval"):
        # the training jobs' shapes: context 256 (position table sized to the sequence)
        shape = Shape(**{**shape.__dict__, "context_length": spec["seq"]})
    return shape


def run_generate(spec: dict, contestant) -> dict:
    shape = job_shape(spec)
    dtype = DTYPES[spec["dtype"]]
    if contestant is Book:
        model = Book.build(shape, dtype, False, kv=spec["cache"])
    else:
        model = contestant.build(shape, dtype, False)
    model.eval()
    # what each contestant's own generate command does to a model before decoding (gptlab generate:
    # prepare_for_decoding); peers have no such step
    model = getattr(contestant, "for_decoding", lambda m: m)(model)
    idx = seeded_tokens(shape, spec["batch"], spec["prompt"])
    n = spec["new_tokens"]
    out = contestant.generate(model, idx, min(8, n), spec["cache"])  # warm-up also checks the length
    if out.shape[1] != idx.shape[1] + min(8, n):
        raise RuntimeError(f"{contestant.name} produced {out.shape[1] - idx.shape[1]} tokens, expected {min(8, n)}")
    times = timed(lambda: contestant.generate(model, idx, n, spec["cache"]), spec["warmup"] - 1 if spec["warmup"] else 0,
                  spec["repeats"])
    return dict(times=times, values=[spec["batch"] * n / t for t in times], unit="tok/s")


def process_setup(contestant) -> None:
    """What the contestant's own train/eval command does to its process first (gptlab: keep_freed_memory)."""
    getattr(contestant, "process_setup", lambda: None)()


def run_train(spec: dict, contestant) -> dict:
    process_setup(contestant)
    shape = job_shape(spec)
    model = contestant.build(shape, torch.float32, True)
    model.train()
    opt = contestant.optimizer(model)
    x = seeded_tokens(shape, spec["batch"], spec["seq"])
    y = torch.roll(x, -1, dims=1)
    autocast = spec["dtype"] == "bfloat16"
    times = timed(lambda: contestant.train_step(model, opt, x, y, autocast), spec["warmup"], spec["repeats"])
    return dict(times=times, values=[x.numel() / t for t in times], unit="tok/s")


def run_eval(spec: dict, contestant) -> dict:
    process_setup(contestant)
    shape = job_shape(spec)
    model = contestant.build(shape, DTYPES[spec["dtype"]], False)
    model.eval()
    x = seeded_tokens(shape, spec["batch"], spec["seq"])
    y = torch.roll(x, -1, dims=1)
    # gptlab evaluates under inference_mode; the peers' own loops use no_grad
    ctx = torch.inference_mode if contestant.name == "gptlab" else torch.no_grad

    def step():
        with ctx():
            return contestant.eval_loss(model, x, y).item()

    times = timed(step, spec["warmup"], spec["repeats"])
    return dict(times=times, values=[x.numel() / t for t in times], unit="tok/s")


def data_folder(spec: dict, contestant) -> Path:
    return Path(spec["data_dir"]) / f"{contestant.name}-{spec['shape']}"


def run_save(spec: dict, contestant) -> dict:
    """Write the load job's input (random weights, the contestant's own format) in a process of its own."""
    folder = data_folder(spec, contestant)
    contestant.save(contestant.build(job_shape(spec), torch.float32, False), folder)
    return dict(times=[], values=[], unit="")


def run_load(spec: dict, contestant) -> dict:
    folder = data_folder(spec, contestant)
    if not folder.exists():
        raise RuntimeError(f"{folder} is missing; the harness writes it first (kind 'save')")
    base = peak_rss_mb()
    one_token = torch.zeros(1, 1, dtype=torch.long)

    def load_ready():
        # "ready" = answered one forward: loaders that map the file lazily pay their page-ins here
        model = contestant.load(folder, job_shape(spec)).eval()
        with torch.no_grad():
            contestant.logits(model, one_token)

    times = timed(load_ready, spec["warmup"], spec["repeats"])
    return dict(times=times, values=times, unit="s", rss_before_mb=base)


def run_load_tf(spec: dict, contestant) -> dict:
    # Writing an OpenAI-format checkpoint needs TensorFlow, which gptlab never depends on; point
    # GPTLAB_BENCH_TF_FOLDER at one (OpenAI's 124M download, or tests/fixtures/make_tf_checkpoint.py
    # DIR --124M run under TensorFlow) to time gptlab's TensorFlow-free reader on real shapes.
    folder = os.environ.get("GPTLAB_BENCH_TF_FOLDER")
    if not folder:
        return dict(status="skipped", reason="not available: set GPTLAB_BENCH_TF_FOLDER to a 124M OpenAI checkpoint")
    from gptlab.pretrained import load_pretrained

    times = timed(lambda: load_pretrained(folder), spec["warmup"], spec["repeats"])
    return dict(times=times, values=times, unit="s")


def run_prepare(spec: dict, contestant) -> dict:
    """MB/s of `gptlab prepare` (2 workers) on a corpus generated from the stdlib's pydoc topics."""
    from gptlab.data.prepare import prepare_dataset

    from .prepare_bench import make_corpus

    corpus = Path(spec["data_dir"]) / "prepare-corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        make_corpus(corpus, 8.0 if spec.get("quick", True) else 32.0, 4)
    n_bytes = sum(f.stat().st_size for f in corpus.glob("*.txt"))
    out = Path(spec["data_dir"]) / "prepare-out"

    def step():
        prepare_dataset([corpus], out, workers=min(2, os.cpu_count() or 1), force=True, progress=False)

    times = timed(step, spec["warmup"], spec["repeats"])
    return dict(times=times, values=[n_bytes / 1e6 / t for t in times], unit="MB/s")


def run_limits(spec: dict) -> dict:
    from .limits import measure_limits

    return dict(limits=measure_limits(small=spec.get("smoke", False)))


RUNNERS = {"save": run_save, "generate": run_generate, "train": run_train, "eval": run_eval, "load": run_load,
           "load_tf": run_load_tf, "prepare": run_prepare}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    out = Path(argv[1])
    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    t0 = time.perf_counter()
    try:
        if spec["kind"] == "limits":
            result = run_limits(spec)
        else:
            torch.manual_seed(0)
            result = RUNNERS[spec["kind"]](spec, CONTESTANTS[spec["contestant"]])
        result.setdefault("status", "ok")
    except Exception as exc:  # a failing contestant is a row in the table, not a crashed benchmark
        result = dict(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    result.update(peak_rss_mb=peak_rss_mb(), wall_s=time.perf_counter() - t0, torch=torch.__version__,
                  threads=torch.get_num_threads())
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
