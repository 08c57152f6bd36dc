"""Same-process A/B alternation of gptlab train/eval variants (judging changes on a noisy, shared CPU).

  python -m bench.ab train --shape small --rounds 3
Variants run in turns A B A B ...; per variant it prints the median wall time, CPU seconds in user and
kernel mode, and minor page faults per step (the last two hardly depend on other processes' load).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from .contestants import SHAPES, Gptlab, Shape, autocast_ctx, gptlab_optimizer  # noqa: E402


def plain_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def lean_loss(model, x, y):
    return model.loss(x, y)


def variants(job: str, model, x, y, autocast: bool) -> dict:
    """name -> step function; each variant changes one thing against 'plain'."""
    if job == "eval":
        def ev(loss_fn):
            def step():
                with torch.inference_mode(), autocast_ctx(autocast):
                    return loss_fn(model, x, y).item()
            return step
        return {"plain logits + F.cross_entropy": ev(plain_loss), "model.loss (chunked)": ev(lean_loss)}
    opt = gptlab_optimizer(model)

    def tr(loss_fn, set_to_none):
        def step():
            with autocast_ctx(autocast):
                loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        return step
    return {"plain, zero_grad(None)": tr(plain_loss, True), "plain, zero_grad(fill 0)": tr(plain_loss, False),
            "model.loss, zero_grad(None)": tr(lean_loss, True)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab")
    p.add_argument("job", choices=["train", "eval"])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--keep-freed-memory", action="store_true", help="call gptlab.hardware.keep_freed_memory() first")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        from gptlab.hardware import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    shape = Shape(**{**SHAPES[args.shape].__dict__, "context_length": args.seq})
    model = Gptlab.build(shape, torch.float32, args.job == "train")
    model.train(args.job == "train")
    if args.job == "eval" and args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    x = torch.randint(0, shape.vocab_size, (args.batch, args.seq))
    y = torch.roll(x, -1, dims=1)
    steps = variants(args.job, model, x, y, args.job == "train" and args.dtype == "bfloat16")
    stats = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in steps.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            stats[name].append((time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                                r1.ru_minflt - r0.ru_minflt))
    tokens = args.batch * args.seq
    for name, rows in stats.items():
        wall, user, sys_, flt = (statistics.median(c) for c in zip(*rows, strict=True))
        print(f"{name:32s} wall {wall:.3f} s ({tokens / wall:.0f} tok/s)  user {user:.3f} s  sys {sys_:.3f} s  "
              f"faults {flt:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
