"""The package's shape: the command line on top of the library, no import circles, short functions and modules."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import SRC

PACKAGE = Path(SRC) / "gptlab"
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every gptlab module `name` imports, at the top or inside functions, plus the packages those live in."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # importing a.b.c runs a.b's __init__ too (gptlab's own __init__ imports lazily: left out);
            # a module's own packages are already being imported when it runs, so they are no edge
            while target and target != "gptlab":
                if target != name and not name.startswith(target + "."):
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def test_the_library_never_imports_the_command_line():
    command_line = ("gptlab.cli", "gptlab.__main__")  # `python -m gptlab` is the command line too
    offenders = {name: sorted(i for i in imports_of(name) if i.startswith("gptlab.cli"))
                 for name in MODULES if not name.startswith(command_line)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circles():
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_functions_and_modules_stay_short():
    long_functions, long_modules = [], []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append((name, node.name, length))
    assert long_functions == [] and long_modules == []


def test_the_top_level_reads_like_a_table_of_contents():
    plain = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(plain) <= MAX_TOP_LEVEL_MODULES, plain
    assert {"cli", "data", "generation", "pretrained", "storage", "training"} <= set(packages)
