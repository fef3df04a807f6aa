#!/usr/bin/env python3
"""Report functions over 60 lines and modules over 500 lines (issue #36).

Usage: ``python scripts/check_sizes.py [FOLDER ...]`` (default: dicomnode inference
training scripts benchmarks, relative to the repository root). A function's size is
counted from its first decorator (or ``def``) to its last line, nested functions
included; a module's size is its number of lines. Prints a table of every item over
the limit and exits 1 if there is one, 0 otherwise. There is no allow-list: fix the
code instead.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
DEFAULT_FOLDERS = ("dicomnode", "inference", "training", "scripts", "benchmarks")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Oversize:
    """One function or module over its limit."""

    path: str
    name: str
    lines: int
    limit: int


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first decorator (or ``def``) to the end of the body."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return (node.end_lineno or node.lineno) - first + 1


def _qualified_functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method in ``tree`` with a dotted name (``Class.method``)."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def check_file(path: Path, shown: str) -> list[Oversize]:
    """Oversized functions and the oversized module itself in one Python file."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    found: list[Oversize] = []
    n_lines = len(text.splitlines())
    if n_lines > MAX_MODULE_LINES:
        found.append(Oversize(shown, "<module>", n_lines, MAX_MODULE_LINES))
    for name, node in _qualified_functions(tree):
        size = _function_lines(node)
        if size > MAX_FUNCTION_LINES:
            found.append(Oversize(shown, name, size, MAX_FUNCTION_LINES))
    return found


def check_folders(folders: list[Path], root: Path = REPO_ROOT) -> list[Oversize]:
    """Check every ``*.py`` file under ``folders`` (sorted, so the output is stable)."""
    found: list[Oversize] = []
    for folder in folders:
        base = folder if folder.is_absolute() else root / folder
        if not base.exists():
            raise FileNotFoundError(f"no such folder: {base} (pass folders that exist)")
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for path in files:
            try:
                shown = str(path.relative_to(root))
            except ValueError:
                shown = str(path)
            found.extend(check_file(path, shown))
    return found


def format_table(found: list[Oversize]) -> str:
    """A plain-text table: lines, limit, path, name."""
    rows = [f"{'lines':>5}  {'limit':>5}  path::name"]
    rows += [f"{o.lines:>5}  {o.limit:>5}  {o.path}::{o.name}" for o in found]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=list(DEFAULT_FOLDERS),
                        help="folders or files to check, relative to the repository root")
    args = parser.parse_args(argv)
    try:
        found = check_folders([Path(f) for f in args.folders])
    except (FileNotFoundError, SyntaxError) as exc:
        print(f"check_sizes: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"OK: no function over {MAX_FUNCTION_LINES} lines, no module over "
              f"{MAX_MODULE_LINES} lines in {' '.join(args.folders)}")
        return 0
    print(format_table(found))
    print(f"{len(found)} over the limit (functions > {MAX_FUNCTION_LINES} lines, "
          f"modules > {MAX_MODULE_LINES} lines)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
