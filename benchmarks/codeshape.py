"""Code shape (issue 9): the longest functions and the biggest classes of the project's source.

Read with ``ast`` only (nothing is imported or run). Scanned: the packages ``cleanroom``,
``coordinator``, ``site_agent``, ``simulations`` and ``models`` under ``--root`` (tests,
benchmarks and examples are left out). Printed:

* the ``--top`` longest functions and methods, in lines from ``def`` to the last line of the
  body (decorators and the docstring included, nested functions counted inside their parent
  and again on their own);
* the ``--top`` longest classes, with their attribute count: the names a class body annotates
  or assigns (dataclass and pydantic fields, class constants) together with every
  ``self.NAME`` a method assigns, each name once;
* totals: files, lines, functions, and how many functions are longer than 50 and 100 lines.

Run: ``python -m benchmarks codeshape [--root PATH] [--top 10]``. To compare with an older
revision, check it out beside this one (``git worktree add --detach /tmp/old COMMIT``) and
pass ``--root /tmp/old``.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("cleanroom", "coordinator", "site_agent", "simulations", "models")
SKIP_PARTS = frozenset({"__pycache__", "tests", "data"})


@dataclass(frozen=True)
class Function:
    """One function or method: where it is and how long it is."""

    path: str
    name: str
    lines: int


@dataclass(frozen=True)
class Klass:
    """One class: where it is, how long it is and how many attributes it has."""

    path: str
    name: str
    lines: int
    attributes: int


def _span(node: ast.AST) -> int:
    end = getattr(node, "end_lineno", None) or node.lineno  # type: ignore[attr-defined]
    return end - node.lineno + 1  # type: ignore[attr-defined]


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _target_names(element)]
    return []


def _self_names(target: ast.expr) -> list[str]:
    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
            and target.value.id == "self"):
        return [target.attr]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _self_names(element)]
    return []


def class_attributes(node: ast.ClassDef) -> set[str]:
    """Names the class body annotates or assigns, and every ``self.NAME`` a method assigns."""
    names: set[str] = set()
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign):
            names.update(_target_names(statement.target))
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                names.update(_target_names(target))
    names.discard("__slots__")
    names.discard("model_config")
    for statement in node.body:
        if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(statement):
            if isinstance(inner, ast.Assign):
                for target in inner.targets:
                    names.update(_self_names(target))
            elif isinstance(inner, (ast.AnnAssign, ast.AugAssign)):
                names.update(_self_names(inner.target))
    return names


def scan_file(path: Path, root: Path) -> tuple[list[Function], list[Klass], int]:
    """The functions and classes of one file, with qualified names, and its line count."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    relative = path.relative_to(root).as_posix()
    functions: list[Function] = []
    classes: list[Klass] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(Function(relative, prefix + child.name, _span(child)))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                classes.append(Klass(relative, prefix + child.name, _span(child),
                                     len(class_attributes(child))))
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return functions, classes, len(source.splitlines())


def scan(root: Path) -> tuple[list[Function], list[Klass], int, int]:
    """Every function and class under the project's packages; files and lines scanned."""
    functions: list[Function] = []
    classes: list[Klass] = []
    files = lines = 0
    for package in PACKAGES:
        folder = root / package
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            if SKIP_PARTS.intersection(path.relative_to(root).parts):
                continue
            found_functions, found_classes, count = scan_file(path, root)
            functions.extend(found_functions)
            classes.extend(found_classes)
            files += 1
            lines += count
    return functions, classes, files, lines


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    line = "  ".join(f"{{:<{width}}}" if index < 2 else f"{{:>{width}}}"
                     for index, width in enumerate(widths))
    print(line.format(*header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line.format(*row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks codeshape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="checkout to measure (default: the current folder)")
    parser.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not any((root / package).is_dir() for package in PACKAGES):
        print(f"{root}: none of {', '.join(PACKAGES)} found; pass --root CHECKOUT")
        return 2
    functions, classes, files, lines = scan(root)
    print(f"code shape of {root}: {files} files, {lines} lines, {len(functions)} functions, "
          f"{sum(f.lines > 50 for f in functions)} over 50 lines, "
          f"{sum(f.lines > 100 for f in functions)} over 100")
    print("\nlongest functions")
    longest = sorted(functions, key=lambda f: (-f.lines, f.path, f.name))[:args.top]
    _print_table(("file", "function", "lines"),
                 [(f.path, f.name, str(f.lines)) for f in longest])
    print("\nbiggest classes")
    biggest = sorted(classes, key=lambda c: (-c.lines, c.path, c.name))[:args.top]
    _print_table(("file", "class", "lines", "attributes"),
                 [(c.path, c.name, str(c.lines), str(c.attributes)) for c in biggest])
    print("\nmost attributes")
    crowded = sorted(classes, key=lambda c: (-c.attributes, c.path, c.name))[:args.top]
    _print_table(("file", "class", "lines", "attributes"),
                 [(c.path, c.name, str(c.lines), str(c.attributes)) for c in crowded])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
