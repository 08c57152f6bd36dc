"""The sampling explainer (`gptlab sampling-plot`): what temperature, top-k and top-p do to one
next-token distribution, as a table and as one bar chart per setting."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError
from ..tokenizer import token_label  # noqa: F401 - part of this module's API: how candidates are labelled
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
    candidate_labels: list[str] | None = None  # how each candidate is shown (default: its text, escaped)

    @property
    def labels(self) -> list[str]:
        return self.candidate_labels or [repr(t)[1:-1] for t in self.candidate_texts]


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
    candidate_labels_of=None,
) -> SamplingTable:
    """Next-token probabilities of the `candidates` most likely tokens under each setting.

    `logits` is one position's (V,) logits; `candidate_texts_of(ids)` turns ids into their text, and
    `candidate_labels_of(ids)` (optional) into how they are shown (e.g. `token_label` of their bytes).
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
    labels = list(candidate_labels_of(ids)) if candidate_labels_of is not None else None
    return SamplingTable(prompt, ids, list(candidate_texts_of(ids)), panels, samples, labels)


def _label(t: float, k: int | None, p: float | None) -> str:
    parts = [f"T={t:g}"]
    if k is not None:
        parts.append(f"top-k={k}")
    if p is not None:
        parts.append(f"top-p={p:g}")
    return ", ".join(parts)


def format_table(table: SamplingTable) -> str:
    """The figure's numbers as a plain-text table: one row per candidate, one column per setting."""
    shown = table.labels  # one line each: newlines escaped, partial characters as their bytes
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


def display_token(label: str) -> str:
    """A token label made visible on an axis: spaces shown as a visible mark, empty text as ''."""
    if label.startswith("<") and label.endswith(">"):  # the bytes of a partial character: keep as is
        return label
    return label.replace(" ", "\u2423") or "''"


def percent(p: float) -> str:
    """A probability as a percentage that stays readable when tiny (0.042%, 3.1e-05%)."""
    value = 100 * p
    if value == 0 or value >= 100:
        return f"{value:.0f}%"
    if value >= 10:  # one decimal, never rounded up to a misleading 100.0%
        return f"{min(value, 99.9):.1f}%"
    return f"{value:.2g}%" if value >= 1e-4 else f"{value:.1e}%"


def _font_families(texts: list[str]) -> tuple[list[str], set[str]]:
    """matplotlib's default font, then installed fonts that draw characters it lacks (e.g. CJK), and the
    characters no installed font draws.

    Looks at matplotlib's own font list first, then at the system's font files (a font installed after
    matplotlib built its cache is not in that list).
    """
    from matplotlib import font_manager, ft2font

    default = font_manager.FontProperties(family=["sans-serif"])
    covered = set(ft2font.FT2Font(font_manager.findfont(default)).get_charmap())
    missing = {ch for text in texts for ch in text if ord(ch) not in covered and not ch.isspace()}
    families = [default.get_family()[0]]
    known = {entry.fname: entry.name for entry in font_manager.fontManager.ttflist}
    for path in [*known, *(p for p in font_manager.findSystemFonts() if p not in known)]:
        if not missing:
            break
        if "LastResort" in path:  # matplotlib's placeholder font: it "has" every character as an empty box
            continue
        try:
            charmap = ft2font.FT2Font(path).get_charmap()
        except (OSError, RuntimeError):
            continue
        drawn = {ch for ch in missing if ord(ch) in charmap}
        if not drawn:
            continue
        if path not in known:
            font_manager.fontManager.addfont(path)
            known[path] = font_manager.FontProperties(fname=path).get_name()
        families.append(known[path])
        missing -= drawn
    return families, missing


def _escape(text: str, undrawable: set[str]) -> str:
    return "".join(f"\\u{ord(ch):04x}" if ch in undrawable else ch for ch in text)


def plot_sampling(table: SamplingTable, out_path) -> None:
    """Draw one bar chart per setting (candidates, then "(all others)", on the x axis) into a PNG, atomically.

    Labels in scripts the default font lacks are drawn with an installed font that has them (a CJK font,
    where the system has one); characters no font has are shown escaped, never as empty boxes.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from ..storage.files import atomic_path

    labels = [display_token(t) for t in table.labels] + ["(all others)"]
    title = f"next token after {table.prompt[-60:]!r}"
    families, undrawable = _font_families(labels + [title])
    labels, title = [_escape(t, undrawable) for t in labels], _escape(title, undrawable)
    n_panels = len(table.panels)
    cols = min(3, n_panels)
    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)  # its per-call notes about a fallback font's weights are noise here
    try:
        with plt.rc_context({"font.family": families}):
            rows = math.ceil(n_panels / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows), squeeze=False)
            for ax, pnl in zip(axes.flat, table.panels, strict=False):
                _draw_panel(ax, pnl, labels, table.samples, FuncFormatter(lambda y, _: f"{100 * y:g}%"))
            for ax in list(axes.flat)[n_panels:]:
                ax.axis("off")
            fig.suptitle(title, fontsize=11)
            fig.tight_layout()
            with atomic_path(out_path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    finally:
        font_log.setLevel(level)


def _draw_panel(ax, pnl: SamplingPanel, labels: list[str], samples: int, formatter) -> None:
    """One setting: a bar per candidate and a grey one for the rest, on an axis scaled to the largest bar."""
    values = [*pnl.probs, pnl.other]
    n = len(values)
    colors = ["tab:blue"] * (n - 1) + ["tab:gray"]
    bars = ax.bar(range(n), values, color=colors, label="probability")
    ax.set_title(pnl.label, fontsize=10)
    top = max(max(values), 1e-12)
    shown = [v for v in pnl.probs if v > 0]
    if shown and max(shown) < 0.05 * top:  # candidates far below "(all others)": a log axis shows both
        ax.set_yscale("log")
        ax.set_ylim(min(shown) / 2, top * 2)
    else:  # scaled to the data, so a distribution of small probabilities stays visible
        ax.set_ylim(0, top * 1.18)
    ax.yaxis.set_major_formatter(formatter)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("probability", fontsize=8)
    if pnl.counts is not None and samples:
        freq = [c / samples for c in pnl.counts]
        ax.plot(range(n - 1), freq, "o", color="tab:orange", label=f"drawn / {samples}")
        ax.legend(fontsize=7)
    for bar, prob in zip(bars, values, strict=True):
        if prob > 0:
            ax.text(bar.get_x() + bar.get_width() / 2, prob, percent(prob), ha="center", va="bottom", fontsize=6)
