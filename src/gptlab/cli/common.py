"""Argument helpers shared by the CLI verbs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a command runs, so --help and argument errors stay fast
    import torch

from ..config import DEVICE_CHOICES

# What --model means, the same in every verb (pretrained/resolve.py).
MODEL_HELP = ("a GPT-2 name (gpt2-small ... gpt2-xl: OpenAI's trained weights, downloaded once), a model, run, "
              "Hugging Face or OpenAI folder or a weights file (those weights), or a small preset (gpt-nano, "
              "gpt-micro, gpt-mini) or a config.json (random weights; random:NAME for any architecture)")


def whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'at least 1' if low == 1 else f'{low} or more'}, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def batch_size_arg(text: str) -> int | str:
    """A positive whole number, or `auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None
    return whole_number(str(value), 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction_open(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="where to run (auto: cuda, then mps, then cpu)"
    )


def pick_device(args: argparse.Namespace, quiet: bool = False) -> torch.device:
    """Resolve --device and tell the user (on stderr, so --json output stays clean)."""
    from ..hardware import resolve_device

    device = resolve_device(args.device)
    if not quiet:
        print(f"device: {device}", file=sys.stderr)
    return device


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def rate(text: str) -> float:
    """A number in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def names(text: str) -> list[str]:
    """A comma-separated list of names."""
    return [part.strip() for part in text.split(",") if part.strip()]


# How a settings field's "kind" (training/settings.py `setting`) is parsed on the command line.
_PARSERS = {"positive": positive_int, "batch": batch_size_arg, "count": non_negative_int, "number": non_negative_float,
            "positive_number": positive_float, "fraction": fraction_open, "rate": rate, "text": str,
            "names": names}


def _help(field) -> str:
    text = field.metadata["help"]
    if "default" in text or field.default is None or field.default is dataclasses.MISSING or field.default is False:
        return text
    return f"{text} (default {field.default})"


def add_settings_options(groups: dict[str, argparse._ArgumentGroup], *settings_classes,
                         skip: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """One `--field-name` option per command-line field of the given settings dataclasses (but `skip`).

    Every option defaults to None, so that a resumed run can tell which options were given now.
    `helps` replaces the help text of some fields (a verb whose defaults differ from the dataclass's).
    """
    for cls in settings_classes:
        for field in dataclasses.fields(cls):
            meta = field.metadata
            if not meta.get("cli") or field.name in skip:
                continue
            flag = "--" + field.name.replace("_", "-")
            group = groups[meta["group"]]
            kind, text = meta["kind"], (helps or {}).get(field.name) or _help(field)
            if kind == "flag":
                group.add_argument(flag, action="store_true", default=None, help=text)
            elif kind == "choice":
                group.add_argument(flag, choices=meta["choices"], help=text)
            elif kind == "paths":
                group.add_argument(flag, nargs="+", metavar="PATH", help=text)
            else:
                group.add_argument(flag, type=_PARSERS[kind], help=text)


def settings_given(args: argparse.Namespace, *settings_classes) -> dict:
    """The settings fields given on the command line (not None), by field name."""
    names = [f.name for cls in settings_classes for f in dataclasses.fields(cls) if f.metadata.get("cli")]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# --- what `gptlab train` and `gptlab finetune` share -------------------------------------------------


def add_run_folder_options(group: argparse._ArgumentGroup, verb: str) -> None:
    group.add_argument("--out", metavar="DIR", help="run folder (runs/<date>-<time>)")
    group.add_argument("--resume", action="store_true", help=f"continue the {verb} run in --out from its checkpoint")
    group.add_argument("--force", action="store_true", help="overwrite the run already in --out")


def check_run_folder_args(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    if args.resume and args.force:
        raise UsageError("--resume and --force contradict each other; give one of them")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR, the run to continue")


def run_job(start):
    """Run `start()` (a training run, maybe one rank of a torchrun job) and leave the job cleanly.

    Returns its result on rank 0 (and in a single process), None on the other ranks.
    """
    from ..training.distributed import cleanup, is_main_process

    ok = False
    try:
        result = start()
        main = is_main_process()  # before cleanup(), which leaves the process group
        ok = True
    finally:
        cleanup(sync=ok)
    return result if main else None


def report_stop(result, verb: str) -> bool:
    """Say how to continue an interrupted run (True if it was interrupted)."""
    if result.interrupted:
        print(f"stopped at step {result.state.step}; continue with: gptlab {verb} --out {result.out_dir} --resume",
              file=sys.stderr)
    return result.interrupted
