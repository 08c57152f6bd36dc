"""`gptlab` command line: one sub-command per verb, each in its own module of gptlab.cli.

Errors the user can fix print one line on stderr (`gptlab VERB: error: ...`) and exit with 2 (usage)
or 1 (runtime); `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import GptlabError

# Verb -> module in gptlab.cli. Each module has `register(subparsers)` and sets `func`.
COMMANDS = {
    "info": "info",
    "download": "download",
    "convert": "convert",
    "tokenizer": "tokenizer",
    "prepare": "prepare",
    "train": "train",
    "finetune": "finetune",
    "eval": "eval",
    "generate": "generate",
    "classify": "classify",
    "sampling-plot": "sampling_plot",
    "serve": "serve",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (usage errors exit with status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gptlab", description="Pretrain, evaluate and sample GPT-2-style language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module_name in COMMANDS.values():
        importlib.import_module(f"gptlab.cli.{module_name}").register(sub)
    return parser


def _rank_tag() -> str:
    """' (rank N)' inside a torchrun job of several processes, so each error line says whose it is."""
    import os

    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and os.environ.get("RANK"):
        return f" (rank {os.environ['RANK']})"
    return ""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one plain line on stderr, not Python's two-line format with a source path."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in argv
    try:
        return int(args.func(args) or 0)
    except GptlabError as exc:
        if debug:
            raise
        print(f"gptlab {args.command}{_rank_tag()}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        if debug:
            raise
        print(f"gptlab {args.command}: error: out of memory; use a smaller model or batch size", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
