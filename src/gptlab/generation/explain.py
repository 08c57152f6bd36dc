"""The sampling explainer (`gptlab sampling-plot`): what temperature, top-k and top-p do to one
next-token distribution, as a table and as one bar chart per setting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError
from .sampling import check_sampling_args, next_token_probs


@dataclass
class SamplingPanel:
    """One setting's probabilities over the shared candidates (and draw counts when sampled)."""

    label: str
    temperature: float
    top_k: int | None
    top_p: float | None
    probs: list[float]  # probability of each candidate under this setting
    counts: list[int] | None = None  # how often each candidate was drawn in `samples` draws
    other: float = 0.0  # probability of every token outside the candidates


@dataclass
class SamplingTable:
    prompt: str
    candidate_ids: list[int]
    candidate_texts: list[str]
    panels: list[SamplingPanel]
    samples: int = 0


def explain_sampling(
    logits: Tensor,
    candidate_texts_of,
    prompt: str = "",
    temperatures: list[float] = (0.1, 1.0, 5.0),
    top_k: int | None = None,
    top_p: float | None = None,
    candidates: int = 10,
    samples: int = 0,
    generator: torch.Generator | None = None,
) -> SamplingTable:
    """Next-token probabilities of the `candidates` most likely tokens under each setting.

    `logits` is one position's (V,) logits; `candidate_texts_of(ids)` turns ids into display text.
    Settings: each temperature alone, then (when given) each temperature with top-k and/or top-p.
    With `samples` > 0, each panel also counts how often every candidate is drawn in that many draws.
    """
    if logits.dim() != 1:
        raise UsageError(f"explain_sampling needs one position's logits (V,), got {tuple(logits.shape)}")
    if not temperatures:
        raise UsageError("give at least one temperature")
    for t in temperatures:
        check_sampling_args(t, top_k, top_p)
    if candidates < 1:
        raise UsageError(f"candidates must be at least 1, got {candidates}")
    if samples < 0:
        raise UsageError(f"samples must be 0 or more, got {samples}")
    n = min(candidates, logits.shape[-1])
    # Candidates are ranked by the untempered logits: every setting keeps this order.
    cand = torch.topk(logits.float(), n).indices
    settings = [(t, None, None) for t in temperatures]
    if top_k is not None or top_p is not None:
        settings += [(t, top_k, top_p) for t in temperatures]
    panels = []
    for t, k, p in settings:
        probs = next_token_probs(logits[None], t, k, p)[0]
        counts = None
        if samples:
            draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
            counts = [int((draws == c).sum()) for c in cand]
        cand_probs = probs[cand]
        panels.append(
            SamplingPanel(
                label=_label(t, k, p),
                temperature=t,
                top_k=k,
                top_p=p,
                probs=cand_probs.tolist(),
                counts=counts,
                other=max(0.0, 1.0 - float(cand_probs.sum())),
            )
        )
    ids = cand.tolist()
    return SamplingTable(prompt, ids, list(candidate_texts_of(ids)), panels, samples)


def _label(t: float, k: int | None, p: float | None) -> str:
    parts = [f"T={t:g}"]
    if k is not None:
        parts.append(f"top-k={k}")
    if p is not None:
        parts.append(f"top-p={p:g}")
    return ", ".join(parts)


def format_table(table: SamplingTable) -> str:
    """The figure's numbers as a plain-text table: one row per candidate, one column per setting."""
    shown = [repr(t)[1:-1] for t in table.candidate_texts]  # newlines and tabs escaped: one line per row
    width = max(9, *(len(t) for t in shown)) + 2
    col = max(12, *(len(pnl.label) for pnl in table.panels)) + 2
    lines = [f"next-token probabilities after {table.prompt!r}"]
    lines.append(f"{'rank':<5}{'id':>7}  {'token':<{width}}" + "".join(f"{pnl.label:>{col}}" for pnl in table.panels))
    for i, (tid, text) in enumerate(zip(table.candidate_ids, shown, strict=True)):
        cells = []
        for pnl in table.panels:
            cell = f"{pnl.probs[i]:.4f}"
            if pnl.counts is not None:
                cell += f" ({pnl.counts[i]})"
            cells.append(f"{cell:>{col}}")
        lines.append(f"{i + 1:<5}{tid:>7}  {text:<{width}}" + "".join(cells))
    lines.append(f"{'':<5}{'':>7}  {'(all others)':<{width}}" + "".join(f"{pnl.other:>{col}.4f}" for pnl in table.panels))
    if table.samples:
        lines.append(f"(n) = times drawn in {table.samples} samples")
    return "\n".join(lines)


def display_token(text: str) -> str:
    """A token's text made visible on an axis: quoted, with spaces and newlines shown."""
    return repr(text)[1:-1].replace(" ", "\u2423") or "''"


def plot_sampling(table: SamplingTable, out_path) -> None:
    """Draw one bar chart per setting (candidates on the x axis) into a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from ..storage.files import atomic_path

    n_panels = len(table.panels)
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    n = len(table.candidate_ids)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    labels = [display_token(t) for t in table.candidate_texts]
    for ax, pnl in zip(axes.flat, table.panels, strict=False):
        bars = ax.bar(range(n), pnl.probs, color="tab:blue", label="probability")
        ax.set_title(pnl.label, fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("probability", fontsize=8)
        if pnl.counts is not None and table.samples:
            freq = [c / table.samples for c in pnl.counts]
            ax.plot(range(n), freq, "o", color="tab:orange", label=f"drawn / {table.samples}")
            ax.legend(fontsize=7)
        for bar, prob in zip(bars, pnl.probs, strict=True):
            if prob >= 0.01:
                ax.text(bar.get_x() + bar.get_width() / 2, prob, f"{prob:.2f}", ha="center", va="bottom", fontsize=6)
    for ax in list(axes.flat)[n_panels:]:
        ax.axis("off")
    fig.suptitle(f"next token after {table.prompt[-60:]!r}", fontsize=11)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
