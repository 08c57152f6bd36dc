"""Profile gptlab's train step or eval forward with torch.profiler and print the top operators.

  python -m bench.profile_model train [--dtype bfloat16] [--steps 3] [--shape gpt2-small]
  python -m bench.profile_model eval

Also reports user/system CPU seconds per step (getrusage), which shows page-fault time in the kernel.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from .contestants import SHAPES, Gptlab, Shape  # noqa: E402


def make_step(job: str, shape: Shape, dtype: str, batch: int, seq: int):
    shape = Shape(**{**shape.__dict__, "context_length": seq})
    torch.manual_seed(0)
    x = torch.randint(0, shape.vocab_size, (batch, seq))
    y = torch.roll(x, -1, dims=1)
    if job == "train":
        model = Gptlab.build(shape, torch.float32, True).train()
        opt = Gptlab.optimizer(model)
        return lambda: Gptlab.train_step(model, opt, x, y, dtype == "bfloat16")
    model = Gptlab.build(shape, getattr(torch, dtype), False).eval()

    def step():
        with torch.inference_mode():
            return Gptlab.eval_loss(model, x, y).item()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_model")
    p.add_argument("job", choices=["train", "eval"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    batch = args.batch or (4 if args.job == "train" else 8)
    step = make_step(args.job, SHAPES[args.shape], args.dtype, batch, args.seq)
    step()  # warm-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    n = args.steps
    print(f"per step: wall {wall / n:.3f} s, user {(r1.ru_utime - r0.ru_utime) / n:.3f} s, "
          f"sys {(r1.ru_stime - r0.ru_stime) / n:.3f} s, minor faults {(r1.ru_minflt - r0.ru_minflt) / n:.0f}, "
          f"{batch * args.seq * n / wall:.0f} tok/s (profiler on)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
