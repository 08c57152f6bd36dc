"""The loss plot of a run: train and validation loss against steps, tokens seen on a second x axis."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .fileio import atomic_path


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
