"""The import graph of engine/ (parsed with ``ast``, nothing imported): the layering that
docs/architecture.md describes, checked on every module.

* no import cycles among engine modules (function-level imports count too: a cycle hidden
  in a function is still a cycle);
* the library never imports the CLI: only ``engine.cli.*`` and ``engine.__main__`` may;
* no module imports a layer above its own (model <- attribution <- evaluation <- bench <- cli);
* the engine never imports the app (``explorer``);
* only the CLI parses arguments: no library module imports ``argparse`` or exits the process
  (``sys.exit``/``SystemExit``), so a script driving the library keeps control of its errors;
* no import fallbacks: no ``except ImportError``/``ModuleNotFoundError`` around an import of
  a module that exists in the repository.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(mod: str, path: Path, known: set[str]) -> set[str]:
    """Engine modules (and ``explorer``) that ``mod`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("engine", "explorer"):
                out.add(t)
    out.discard(mod)
    return out


def graph() -> dict[str, set[str]]:
    mods = engine_modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m not in g:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_engine_has_no_import_cycles():
    g = graph()
    assert len(g) > 30
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_never_imports_the_cli():
    bad = {
        m: sorted(t for t in ts if t == "engine.cli" or t.startswith("engine.cli."))
        for m, ts in graph().items()
        if not (m == "engine.cli" or m.startswith("engine.cli.") or m == "engine.__main__")
    }
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"library modules import the CLI: {bad}"


def test_only_the_cli_parses_arguments_or_exits():
    bad = {}
    for mod, path in engine_modules().items():
        if mod == "engine.cli" or mod.startswith("engine.cli.") or mod == "engine.__main__":
            continue
        found = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"import {n}" for n in names if n.split(".")[0] == "argparse"]
            elif isinstance(node, ast.Name) and node.id == "SystemExit":
                found.append("SystemExit")
            elif isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys":
                found.append("sys.exit")
        if found:
            bad[mod] = found
    assert not bad, f"library modules parse arguments or exit the process: {bad}"


def test_engine_never_imports_the_app():
    bad = {m: sorted(t for t in ts if t.split(".")[0] == "explorer") for m, ts in graph().items()}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"engine modules import explorer: {bad}"


def _swallowed_imports(path: Path) -> list[str]:
    """Modules imported inside a ``try`` whose handler catches ImportError/ModuleNotFoundError."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = set()
        for h in node.handlers:
            for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]) if h.type else []:
                if isinstance(t, ast.Name):
                    names.add(t.id)
        if not names & {"ImportError", "ModuleNotFoundError"}:
            continue
        for sub in ast.walk(ast.Module(body=node.body, type_ignores=[])):
            if isinstance(sub, ast.ImportFrom) and sub.level:
                found.append("." * sub.level + (sub.module or ""))
            elif isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] in ("engine", "explorer"):
                found.append(sub.module)
            elif isinstance(sub, ast.Import):
                found += [a.name for a in sub.names if a.name.split(".")[0] in ("engine", "explorer")]
            elif isinstance(sub, ast.Call) and getattr(sub.func, "attr", "") == "import_module":
                found.append(ast.unparse(sub))
    return found


def test_no_import_fallbacks_for_our_own_modules():
    files = list(ENGINE.rglob("*.py")) + list((ROOT / "explorer").rglob("*.py"))
    bad = {str(p.relative_to(ROOT)): s for p in files if (s := _swallowed_imports(p))}
    assert not bad, f"imports of our own modules guarded by except ImportError: {bad}"


def test_the_cli_parser_does_not_import_torch():
    """``attribution-engine --help`` and argparse errors took 2.5 s for torch's import (0.26 s without it):
    the parser's modules import torch only inside the handlers that need it."""
    import subprocess
    import sys

    code = "import sys, engine.cli.parser; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    # nor a command that refuses its options before it needs torch (the threads were set by importing it)
    code = ("import sys; from engine.cli.parser import main; rc = main(['query', '--query', 'gallery:0', "
            "'--methods', 'bogus']); sys.exit(1 if 'torch' in sys.modules or rc != 2 else 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0 and "unknown method(s) bogus" in done.stderr, done.stderr


LAYERS = ("model", "attribution", "evaluation", "bench", "cli")  # docs/architecture.md §1, lowest first


def layer_of(mod: str) -> int:
    """The layer of an engine module: its subpackage's place in LAYERS; a top-level module (config, paths,
    files, jsonio, ...) sits below all of them (-1), and ``engine`` / ``engine.__main__`` above (len)."""
    parts = mod.split(".")
    if mod in ("engine", "engine.__main__"):
        return len(LAYERS)
    return LAYERS.index(parts[1]) if len(parts) >= 2 and parts[1] in LAYERS else -1


def test_no_module_imports_a_layer_above_its_own():
    """model <- attribution <- evaluation <- bench <- cli, with the top-level modules below all of them:
    a model module importing attribution (or evaluation importing bench) would make the lower layer need
    the upper one, which the design document promises it never does."""
    g = graph()
    assert {layer_of(m) for m in g} >= {-1, 0, 1, 2, 3, 4}  # every layer holds modules (no silent renames)
    upward = sorted(
        f"{m} -> {t}" for m, targets in g.items() for t in targets
        if t in g and t.startswith("engine.") and layer_of(t) > layer_of(m)
    )
    assert upward == []


MAX_MODULE_LINES = 1000  # docs/architecture.md §1: the ceiling, so the figure there cannot go stale


def test_no_module_passes_the_size_ceiling():
    """docs/architecture.md §1: most modules stay under about 450 lines and none passes ``MAX_MODULE_LINES``
    (QA 30b #5: the doc's "499 to 681 lines" had gone stale; a rule checked here cannot)."""
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for top in ("engine", "explorer") for p in (ROOT / top).rglob("*.py")
    }
    assert len(sizes) > 50
    assert {f: n for f, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def _plugin_stems(folder: Path) -> set[str]:
    """The files in ``folder`` that declare a method (``@register``) or a bank kind (``register_bank_kind``)."""
    from engine.attribution.plugins import declared_calls, declared_classes

    return {d.module for d in (*declared_classes(folder), *declared_calls(folder, "register_bank_kind"))}


def _unmapped(doc: str, modules: list[Path], root: Path) -> list[str]:
    """The modules §1 of ``doc`` does not name, but for a method's or bank kind's own file in
    engine/attribution/methods/: adding one is adding that file only (§9), so the map lists the shipped ones
    for a reader, and a contributor's is not held to it (QA 70 F1: each dropped-in method failed this test)."""
    tree = doc[doc.index("## 1."):doc.index("## 2.")]
    words = set(tree.replace(",", " ").replace("(", " ").replace(")", " ").replace(":", " ").split())
    methods = root / "engine" / "attribution" / "methods"
    plugins = _plugin_stems(methods)
    return sorted(
        str(p.relative_to(root)) for p in modules
        if p.name not in ("__init__.py", "__main__.py") and p.name not in words and p.stem not in words
        and not (p.parent == methods and p.stem in plugins)
    )


def test_the_map_of_section_1_names_every_module():
    """docs/architecture.md §1 is "the tree a newcomer needs": every module of engine/ and explorer/ is named in
    it (QA 31b #10: six modules were missing, among them the exiting flag every long pass reads)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert _unmapped(doc, [p for top in ("engine", "explorer") for p in (ROOT / top).rglob("*.py")], ROOT) == []


def test_the_map_does_not_hold_a_dropped_in_method_file_but_does_hold_other_modules(tmp_path):
    """A method or bank-kind file added to methods/ needs no line in the map; any other new module does, there
    or elsewhere (a helper beside the methods is not a plugin)."""
    import shutil

    root = tmp_path / "repo"
    methods = root / "engine" / "attribution" / "methods"
    shutil.copytree(ROOT / "engine" / "attribution" / "methods", methods, ignore=shutil.ignore_patterns("__pycache__"))
    (methods / "zz_grad_dot.py").write_text(
        "@register\nclass GradDot(AttributionMethod):\n    name = 'zz_grad_dot'\n    title = 'Gradient dot product'\n")
    (methods / "zz_half_bank.py").write_text("register_bank_kind('zz_half', None)\n")
    (methods / "zz_helper.py").write_text("def helper():\n    return 1\n")
    (root / "engine" / "zz_new_module.py").write_text("X = 1\n")
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert _unmapped(doc, sorted(root.rglob("*.py")), root) == [
        "engine/attribution/methods/zz_helper.py", "engine/zz_new_module.py"]
