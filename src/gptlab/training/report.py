"""What a run shows and leaves behind besides the checkpoint: the progress bar and log lines, metrics.jsonl, loss.png."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..hardware import mfu
from ..storage.files import atomic_open, atomic_path
from .distributed import get_world_size, is_main_process

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class Reporter:
    """A tqdm bar (loss, lr, tokens/s) on a terminal unless quiet; log lines that do not break the bar.

    Written to a file or a pipe, a bar would only fill the log with carriage-return frames: there the
    log lines (evaluations, samples) are the record.
    """

    def __init__(self, quiet: bool, total: int, initial: int, flops_per_token: float = 0.0,
                 peak_tflops: float | None = None) -> None:
        self.bar = None
        self.main = is_main_process()  # only rank 0 of a torchrun job reports
        self.flops_per_token = flops_per_token  # with a known peak the bar shows MFU
        self.peak_tflops = peak_tflops
        if not quiet and self.main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            total_steps = None if math.isinf(total) else total
            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def log(self, message: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def step(self, loss: float, lr: float, tokens: int) -> None:
        self._tokens += tokens
        if self.bar is not None:
            rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
            extra = {}
            if self.peak_tflops:
                extra["mfu"] = f"{mfu(rate, self.flops_per_token, self.peak_tflops, get_world_size()):.1%}"
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", **extra, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_metrics(path: Path, metrics: list[dict]) -> None:
    """metrics.jsonl: one JSON object per evaluation, rewritten atomically."""
    with atomic_open(path) as fh:
        for record in metrics:
            fh.write(json.dumps(record) + "\n")


def plot_losses(metrics: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw `metrics` (records with step, tokens_seen, train_loss, val_loss) into a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    tokens = [m["tokens_seen"] for m in metrics]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    try:
        ax1.plot(steps, [m["train_loss"] for m in metrics], label="Training loss")
        ax1.plot(steps, [m["val_loss"] for m in metrics], linestyle="-.", label="Validation loss")
        ax1.set_xlabel("Steps")
        ax1.set_ylabel("Loss")
        ax1.legend(loc="upper right")
        if title:
            ax1.set_title(title)
        # A second x axis for tokens seen: an invisible plot that only sets its scale, as in the book.
        ax2 = ax1.twiny()
        ax2.plot(tokens, [m["train_loss"] for m in metrics], alpha=0)
        ax2.set_xlabel("Tokens seen")
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
