"""Developer-only fault injection, so crash safety can be tested for real (not for users).

Set `GPTLAB_FAULT` to a comma-separated list of `KIND:N`:

- `kill-during-save:N`   SIGKILL inside the N-th checkpoint save (1-based, counted per process), after the
                         temporary file is partly written and before it is renamed over checkpoint.pt;
- `kill-during-write:N`  the same inside the N-th atomic file write of any kind (weights, metrics, config);
- `kill-at-step:N`       SIGKILL right after optimizer step N (between steps);
- `enospc-during-save:N` raise OSError(ENOSPC) inside the N-th checkpoint save (a full disk);
- `nan-at-step:N`        make the loss of optimizer step N NaN (a diverging batch);
- `slow-step:MS`         sleep MS milliseconds after every step (to signal or lock a run mid-way in tests);
- `oom-above:N`          a `--batch-size auto` probe of a micro-batch above N runs out of memory (a
                         simulated device memory limit).

Nothing here runs when the variable is unset: each hook is one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

ENV = "GPTLAB_FAULT"
KINDS = ("kill-during-save", "kill-during-write", "kill-at-step", "enospc-during-save", "nan-at-step", "slow-step",
         "oom-above")

_plan: dict[str, set[int]] | None = None
_counts = {"save": 0, "write": 0}
_step = 0


def plan() -> dict[str, set[int]]:
    """The faults asked for in GPTLAB_FAULT (parsed once per process)."""
    global _plan
    if _plan is None:
        _plan = {}
        for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
            kind, _, n = item.partition(":")
            if kind not in KINDS or not n.isdigit():
                raise SystemExit(f"{ENV}: bad fault {item!r}; use KIND:N with KIND in {', '.join(KINDS)}")
            _plan.setdefault(kind, set()).add(int(n))
    return _plan


def _kill_now(partial: Path | None = None) -> None:
    if partial is not None and partial.exists():
        # Leave the temporary file half-written, as a crash in the middle of writing would.
        with open(partial, "r+b") as fh:
            fh.truncate(partial.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def during_write(tmp: Path) -> None:
    """Called by storage.files.atomic_path after the temporary file is written, before fsync and rename."""
    faults = plan()
    if not faults:
        return
    _counts["write"] += 1
    if _counts["write"] in faults.get("kill-during-write", ()):
        _kill_now(tmp)


def during_save(tmp: Path) -> None:
    """Called by checkpoint.save_checkpoint after torch.save wrote the temporary file."""
    faults = plan()
    if not faults:
        return
    _counts["save"] += 1
    if _counts["save"] in faults.get("kill-during-save", ()):
        _kill_now(tmp)
    if _counts["save"] in faults.get("enospc-during-save", ()):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def begin_step(step: int) -> None:
    """The optimizer step about to run (1-based), for nan-at-step."""
    global _step
    _step = step


def poison_loss(loss: Any) -> Any:
    """The loss, made NaN when nan-at-step names the current step."""
    faults = plan()
    if faults and _step in faults.get("nan-at-step", ()):
        return loss * float("nan")
    return loss


def after_step(step: int) -> None:
    """Called after optimizer step `step` finished (and was saved, when due)."""
    faults = plan()
    if not faults:
        return
    if step in faults.get("kill-at-step", ()):
        _kill_now()
    for ms in faults.get("slow-step", ()):
        time.sleep(ms / 1000)


def simulate_out_of_memory(batch: int) -> None:
    """Called by the micro-batch probe (training/autobatch.py): raise the device's out-of-memory error
    for batches above oom-above's N."""
    limits = plan().get("oom-above")
    if limits and batch > min(limits):
        import torch

        raise torch.OutOfMemoryError(f"simulated: a micro-batch of {batch} is over the limit of {min(limits)}")


def check_nonfinite(loss: float, step: int, skipped: int, allowed: int, log) -> int:
    """A NaN/inf loss at `step` (already kept off the weights): skip it while `allowed` permits, else stop.

    Returns the new count of skipped batches; raises GptlabError naming the step and the usual fixes.
    """
    from .errors import GptlabError

    if skipped < allowed:
        log(f"warning: the loss is {loss} at step {step}; skipped that batch ({skipped + 1} of {allowed} allowed)")
        return skipped + 1
    raise GptlabError(
        f"training diverged: the loss is {loss} at step {step}; the last saved checkpoint is intact. Fixes: lower "
        "--lr, keep --grad-clip at 1.0, train in --dtype float32, or skip rare bad batches with --skip-nonfinite N"
    )
