"""Finding the methods and bank kinds a package's files declare, without importing them.

Adding an attribution method or a K-FAC bank kind is one new file in
``engine/attribution/methods/`` (docs/architecture.md §9 and §8).  A registry that imported every
module there to see what registers itself would import torch, curvlinops and open_clip just to
list names (the CLI checks ``--methods`` against them), and one module with a missing optional
dependency would hide every other method.  So the registries read the files' source with ``ast``:

* a method is a top-level class decorated ``@register`` whose body sets ``name = "<literal>"``
  (and may set ``order = <int>``, its place in lists; 100 when absent);
* a bank kind is a top-level call ``register_bank_kind("<literal>", ...)``; a literal ``note="..."``
  keyword anywhere in that call (``BankKind(..., note="int8 on disk")``) is its one-line description.

A module is imported only when one of its names is asked for; importing it runs the same
``register`` call that the scan read, so what the scan lists is what the import provides
(``tests/test_method_registry.py`` checks both agree for every shipped file).

A contributor's mistake in one file (a syntax error, a class without a literal name, a name that
another file declares too) must not take the other methods down with it (QA round 19: one such file
stopped every command, ``--help`` included, and the app).  So the scan never raises: it leaves that
file or class out and records a problem naming the file, which the CLI prints as a warning and the
app shows (``Scan.problems``).  Of two files declaring one name, the first in file order keeps it.
"""

from __future__ import annotations

import ast
import functools
import threading
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ORDER = 100
# ast.parse is not safe to run in two threads at once in CPython 3.11 ("SystemError: AST constructor recursion
# depth mismatch"), and the app's page runs (threads) scan the package on their first run: one parse at a time
_PARSE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Declared:
    """One name a module declares: ``module`` (file stem in the package), ``cls`` (None for calls);
    ``title`` and ``kind``: the class's literals, so that a method whose module then fails to import is
    still listed under its own words (for a call, ``title`` is its literal ``note=``); ``needs_gradient``:
    its literal, inherited like them (the base class's True), None when no class sets one."""

    name: str
    module: str
    cls: str | None = None
    order: int = DEFAULT_ORDER
    title: str | None = None
    kind: str | None = None
    needs_gradient: bool | None = None


@dataclass(frozen=True)
class Scan:
    """What a package's files declare, and what could not be read: one line per problem, naming its file."""

    declared: tuple[Declared, ...]
    problems: tuple[str, ...]


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


def _parsed(package_dir: Path, problems: list[str]) -> list[tuple[Path, ast.Module]]:
    """Every module's syntax tree; a file that cannot be read or parsed is left out, with a problem."""
    out = []
    for path in _modules(package_dir):
        try:
            text = path.read_text(encoding="utf-8")
            with _PARSE_LOCK:
                out.append((path, ast.parse(text, str(path))))
        except (SyntaxError, UnicodeDecodeError, OSError) as e:
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
            problems.append(f"{path}: cannot be read{where}: {type(e).__name__}: {getattr(e, 'msg', None) or e}; "
                            "what it declares is left out")
    return out


@functools.cache
def scan_classes(package_dir: Path, decorator: str = "register") -> Scan:
    """Every top-level class decorated ``@decorator`` in the package's modules, by (order, name).

    A class without a literal ``name`` (the registry could not list it) or with a non-int ``order``
    is left out, and so is a second class declaring a name; each is a problem naming its file."""
    found: dict[str, Declared] = {}
    problems: list[str] = []
    parsed = _parsed(package_dir, problems)
    # every top-level class's literals and bases, so that a class inheriting its title or kind from another
    # class of the package (D-TRAK from TRAK) is listed with them
    classes = {node.name: (_literals(node.body), [_call_name(b) for b in node.bases])
               for _, tree in parsed for node in tree.body if isinstance(node, ast.ClassDef)}

    def inherited(cls_name: str, key: str, seen: frozenset = frozenset()) -> object:
        lit, bases = classes.get(cls_name, ({}, []))
        if key in lit:
            return lit[key]
        for b in bases:
            if b and b not in seen:
                v = inherited(b, key, seen | {cls_name})
                if v is not None:
                    return v
        return None

    for path, tree in parsed:
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            if decorator not in (_call_name(d) for d in node.decorator_list):
                continue
            lit = _literals(node.body)
            name, order = lit.get("name"), lit.get("order", DEFAULT_ORDER)
            if not isinstance(name, str) or not name:
                problems.append(f"{path}: class {node.name} is @{decorator} but sets no literal name = '...'; "
                                "it is left out")
                continue
            if not isinstance(order, int):
                problems.append(f"{path}: class {node.name}'s order must be an int literal; it is left out")
                continue
            if name in found:
                problems.append(f"{path}: class {node.name} declares the name {name!r}, which "
                                f"{found[name].module}.py declares already; it is left out (rename one of them)")
                continue
            title, kind = inherited(node.name, "title"), inherited(node.name, "kind")
            grad = inherited(node.name, "needs_gradient")
            found[name] = Declared(name, path.stem, node.name, order,
                                   title if isinstance(title, str) else None, kind if isinstance(kind, str) else None,
                                   grad if isinstance(grad, bool) else None)
    return Scan(tuple(sorted(found.values(), key=lambda d: (d.order, d.name))), tuple(problems))


@functools.cache
def scan_calls(package_dir: Path, function: str) -> Scan:
    """Every top-level ``function("<literal>", ...)`` call in the package's modules, in file order.

    A call whose first argument is not a string literal, or that repeats a name an earlier file
    registers, is left out, with a problem naming its file."""
    found: dict[str, Declared] = {}
    problems: list[str] = []
    for path, tree in _parsed(package_dir, problems):
        for node in tree.body:
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
                continue
            call = node.value
            if _call_name(call) != function or not call.args:
                continue
            first = call.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                problems.append(f"{path}:{node.lineno}: {function} needs a literal name as its first argument; "
                                "the call is left out")
                continue
            if first.value in found and found[first.value].module != path.stem:
                problems.append(f"{path}:{node.lineno}: {function}({first.value!r}) repeats a name that "
                                f"{found[first.value].module}.py registers already; it is left out (rename it)")
                continue
            note = next((k.value.value for n in ast.walk(call) if isinstance(n, ast.Call) for k in n.keywords
                         if k.arg == "note" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)),
                        None)
            found.setdefault(first.value, Declared(first.value, path.stem, title=note))
    return Scan(tuple(found.values()), tuple(problems))


def declared_classes(package_dir: Path, decorator: str = "register") -> tuple[Declared, ...]:
    """``scan_classes(...).declared``."""
    return scan_classes(package_dir, decorator).declared


def declared_calls(package_dir: Path, function: str) -> tuple[Declared, ...]:
    """``scan_calls(...).declared``."""
    return scan_calls(package_dir, function).declared


def forget() -> None:
    """Drop the scans (after a file was added or removed while running: tests)."""
    scan_classes.cache_clear()
    scan_calls.cache_clear()


__all__ = ["DEFAULT_ORDER", "Declared", "Scan", "declared_calls", "declared_classes", "forget", "scan_calls",
           "scan_classes"]
