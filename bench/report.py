"""Turn child results into derived numbers (ratios, fraction of the machine's limit), Markdown and a chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from .contestants import SHAPES, Shape
from .jobs import CONTESTANT_NAMES

BYTES = {"float32": 4, "bfloat16": 2}


def summary(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


def train_flops_per_token(shape: Shape, seq: int, forward_only: bool) -> float:
    """6N (2N forward only) for the matmul weights, plus attention's QK^T and AV: 12*L*T*C (4*L*T*C)."""
    n = shape.matmul_params()
    attn = shape.n_layers * seq * shape.emb_dim
    return 2 * n + 4 * attn if forward_only else 6 * n + 12 * attn


def limit_for(spec: dict, limits: dict) -> tuple[float | None, str]:
    """The machine's ceiling for this job in the job's own unit, and how it was derived."""
    if not limits:
        return None, ""
    shape = SHAPES[spec["shape"]]
    kind, dtype = spec["kind"], spec["dtype"]
    if kind == "generate" and spec.get("cache"):
        weight_bytes = shape.matmul_params() * BYTES[dtype]
        bound = spec["batch"] * limits["read_gbs"] * 1e9 / weight_bytes
        return bound, f"{weight_bytes / 1e6:.0f} MB weights/token at {limits['read_gbs']:.1f} GB/s"
    if kind in ("train", "eval"):
        fpt = train_flops_per_token(shape, spec["seq"], forward_only=kind == "eval")
        peak = limits[f"matmul_gflops_{dtype}"] * 1e9
        return peak / fpt, f"{fpt / 1e9:.2f} GFLOP/token at {peak / 1e9:.0f} GFLOP/s ({dtype} matmul)"
    return None, ""


def group_rows(results: list[dict], limits: dict) -> list[dict]:
    """One row per (job, dtype) with every contestant's summary, ratios and fraction of the limit."""
    rows: dict[tuple, dict] = {}
    for r in results:
        spec = r["spec"]
        key = (spec["id"], spec["dtype"])
        row = rows.setdefault(key, dict(id=spec["id"], title=spec["title"], dtype=spec["dtype"], kind=spec["kind"],
                                        unit=None, cells={}, spec=spec))
        cell = dict(status=r["status"], peak_rss_mb=r.get("peak_rss_mb"), reason=r.get("reason", ""))
        if r["status"] == "ok" and r.get("values"):
            cell.update(summary(r["values"]))
            row["unit"] = r["unit"]
        row["cells"][spec["contestant"]] = cell
    for row in rows.values():
        lower_better = row["unit"] == "s"
        mine = row["cells"].get("gptlab", {})
        row["ratios"] = {}
        for peer in CONTESTANT_NAMES[1:]:
            other = row["cells"].get(peer, {})
            if "median" in mine and "median" in other:
                a, b = mine["median"], other["median"]
                row["ratios"][peer] = b / a if lower_better else a / b
        bound, how = limit_for(row["spec"], limits)
        row["limit"], row["limit_how"] = bound, how
        row["fraction"] = mine["median"] / bound if bound and "median" in mine else None
    return list(rows.values())


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def cell_text(cell: dict) -> str:
    if not cell:
        return "-"
    if cell["status"] == "skipped":
        return f"skipped ({cell['reason']})"
    if cell["status"] != "ok":
        return f"error: {cell['reason'][:80]}"
    if "median" not in cell:
        return "-"
    return f"**{fmt(cell['median'])}** ({fmt(cell['min'])}-{fmt(cell['max'])})"


def markdown(rows: list[dict], limits: dict, meta: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}"
        f"{', ' + meta['note'] if meta.get('note') else ''}.",
        "",
        "Cells: median (min-max) over the timed repeats; tok/s (higher is better) or seconds (lower is better).",
        "Ratios > 1 mean gptlab is better. 'of limit' = gptlab's median / the machine's limit from this run.",
        "llms-from-scratch's KV-cache rows use its `kv_cache.gpt2` model with the causal-mask slicing bug of",
        "release 1.0.19 patched inside the benchmark (see bench/README.md).",
        "",
        "| job | dtype | gptlab | transformers | llms-from-scratch | vs transformers | vs llms-f-s | of limit"
        " | peak RSS MB (gptlab / transformers / llms-f-s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["cells"]
        ratios = [f"{row['ratios'][p]:.2f}x" if p in row["ratios"] else "-" for p in CONTESTANT_NAMES[1:]]
        frac = f"{100 * row['fraction']:.0f}% of {fmt(row['limit'])}" if row["fraction"] else "-"
        rss = " / ".join(f"{c[p]['peak_rss_mb']:.0f}" if p in c and c[p].get("peak_rss_mb") else "-"
                         for p in CONTESTANT_NAMES)
        unit = f" [{row['unit']}]" if row["unit"] else ""
        lines.append(f"| {row['title']}{unit} | {row['dtype']} | " + " | ".join(cell_text(c.get(p, {})) for p in
                     CONTESTANT_NAMES) + f" | {' | '.join(ratios)} | {frac} | {rss} |")
    if limits:
        lines += [
            "",
            "Machine limits (same run, best of repeats): "
            f"matmul {limits['matmul_gflops_float32']:.0f} GFLOP/s float32, "
            f"{limits['matmul_gflops_bfloat16']:.0f} GFLOP/s bfloat16 ({limits['matmul_n']}^3); "
            f"read bandwidth {limits['read_gbs']:.1f} GB/s (sum of {limits['read_mbytes']} MB), "
            f"matrix-vector {limits['gemv_gbs']:.1f} GB/s.",
            "Limits used: generate with KV cache = weight bytes per step / read bandwidth; train = MFU with "
            "6N + 12*L*T*C FLOPs per token; eval = 2N + 4*L*T*C (N = matmul weights incl. the LM head).",
        ]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    """One small panel per (job, dtype): the contestants' medians with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if any("median" in c for c in r["cells"].values())]
    cols = min(4, max(1, len(shown)))
    nrows = max(1, (len(shown) + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    colors = {"gptlab": "#2a7", "transformers": "#e93", "llms-from-scratch": "#57c"}
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown, strict=False):
        names = [n for n in CONTESTANT_NAMES if "median" in row["cells"].get(n, {})]
        med = [row["cells"][n]["median"] for n in names]
        err = [[m - row["cells"][n]["min"] for n, m in zip(names, med, strict=True)],
               [row["cells"][n]["max"] - m for n, m in zip(names, med, strict=True)]]
        ax.bar(range(len(names)), med, yerr=err, color=[colors[n] for n in names], capsize=3)
        ax.set_xticks(range(len(names)), [n.replace("llms-from-scratch", "llms-f-s") for n in names], fontsize=8)
        if row["limit"]:
            ax.axhline(row["limit"], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{row['title']}\n{row['dtype']} [{row['unit']}]", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
