"""Finding the methods and bank kinds a package's files declare, without importing them.

Adding an attribution method or a K-FAC bank kind is one new file in
``engine/attribution/methods/`` (docs/architecture.md §9 and §8).  A registry that imported every
module there to see what registers itself would import torch, curvlinops and open_clip just to
list names (the CLI checks ``--methods`` against them), and one module with a missing optional
dependency would hide every other method.  So the registries read the files' source with ``ast``:

* a method is a top-level class decorated ``@register`` whose body sets ``name = "<literal>"``
  (and may set ``order = <int>``, its place in lists; 100 when absent);
* a bank kind is a top-level call ``register_bank_kind("<literal>", ...)``.

A module is imported only when one of its names is asked for; importing it runs the same
``register`` call that the scan read, so what the scan lists is what the import provides
(``tests/test_method_registry.py`` checks both agree for every shipped file).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ORDER = 100


@dataclass(frozen=True)
class Declared:
    """One name a module declares: ``module`` (file stem in the package), ``cls`` (None for calls)."""

    name: str
    module: str
    cls: str | None = None
    order: int = DEFAULT_ORDER


def _call_name(node: ast.expr) -> str | None:
    """``f`` for ``f``, ``x.f`` and ``f(...)`` (a decorator or a call's function)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _literals(body: list[ast.stmt]) -> dict[str, object]:
    """Class-body assignments of literals: ``name = "kfac"``, ``order: int = 0``."""
    out: dict[str, object] = {}
    for stmt in body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = stmt.value.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(stmt.value, ast.Constant):
                out[stmt.target.id] = stmt.value.value
    return out


def _modules(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.glob("*.py") if not p.name.startswith("_"))


@functools.cache
def declared_classes(package_dir: Path, decorator: str = "register") -> tuple[Declared, ...]:
    """Every top-level class decorated ``@decorator`` in the package's modules, by (order, name).

    ValueError for such a class without a literal ``name`` (the registry could not list it) and
    for two classes declaring one name."""
    found: dict[str, Declared] = {}
    for path in _modules(package_dir):
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            if decorator not in (_call_name(d) for d in node.decorator_list):
                continue
            lit = _literals(node.body)
            name, order = lit.get("name"), lit.get("order", DEFAULT_ORDER)
            if not isinstance(name, str) or not name:
                raise ValueError(f"{path}: class {node.name} is @{decorator} but sets no literal name = '...'")
            if not isinstance(order, int):
                raise ValueError(f"{path}: class {node.name}'s order must be an int literal")
            if name in found:
                raise ValueError(f"{path}: method name {name!r} is declared twice ({found[name].module}.py too)")
            found[name] = Declared(name, path.stem, node.name, order)
    return tuple(sorted(found.values(), key=lambda d: (d.order, d.name)))


@functools.cache
def declared_calls(package_dir: Path, function: str) -> tuple[Declared, ...]:
    """Every top-level ``function("<literal>", ...)`` call in the package's modules, in file order."""
    found: list[Declared] = []
    for path in _modules(package_dir):
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
                continue
            call = node.value
            if _call_name(call) != function or not call.args:
                continue
            first = call.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                raise ValueError(f"{path}:{node.lineno}: {function} needs a literal name as its first argument")
            found.append(Declared(first.value, path.stem))
    return tuple(found)


def forget() -> None:
    """Drop the scans (after a file was added or removed while running: tests)."""
    declared_classes.cache_clear()
    declared_calls.cache_clear()


__all__ = ["DEFAULT_ORDER", "Declared", "declared_calls", "declared_classes", "forget"]
