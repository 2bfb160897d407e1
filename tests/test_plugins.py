"""engine.attribution.plugins: methods and bank kinds read from a package's source, and a bank kind
added as one file (the registry of kinds finds it without an edit elsewhere and imports it only on use)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.attribution import bank_kinds, plugins


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)
    plugins.forget()


def test_classes_are_read_in_order_with_their_literals(tmp_path):
    _write(tmp_path, "b.py", "@register\nclass B(Base):\n    name = 'bee'\n    order = 5\n")
    _write(tmp_path, "a.py", "@register\nclass A(Base):\n    name: str = 'ay'\n\nclass NotOne(Base):\n    name = 'no'\n")
    _write(tmp_path, "_private.py", "@register\nclass P(Base):\n    name = 'private'\n")
    found = plugins.declared_classes(tmp_path)
    assert [(d.name, d.module, d.cls, d.order) for d in found] == [("bee", "b", "B", 5), ("ay", "a", "A", 100)]


def test_a_class_without_a_literal_name_a_duplicate_or_a_broken_file_is_left_out_with_a_problem(tmp_path):
    """QA round 19: each of these raised from the scan, so one bad file stopped every command (--help too)
    and the app. Now the file or class is left out, with a problem naming it, and the rest is listed."""
    _write(tmp_path, "a.py", "@register\nclass A(Base):\n    name = make_name()\n")
    _write(tmp_path, "good.py", "@register\nclass G(Base):\n    name = 'g'\n    title = 'Good'\n    kind = 'similarity'\n")
    scan = plugins.scan_classes(tmp_path)
    assert [(d.name, d.title, d.kind) for d in scan.declared] == [("g", "Good", "similarity")]
    assert len(scan.problems) == 1 and "a.py: class A is @register but sets no literal name" in scan.problems[0]
    _write(tmp_path, "a.py", "@register\nclass A(Base):\n    name = 'g'\n")  # g again: a.py comes first
    scan = plugins.scan_classes(tmp_path)
    assert [(d.name, d.module) for d in scan.declared] == [("g", "a")]
    assert "good.py: class G declares the name 'g', which a.py declares already" in scan.problems[0]
    _write(tmp_path, "a.py", "@register\nclass A(Base)\n    name = 'a'\n")  # a syntax error
    _write(tmp_path, "b.py", "@register\nclass B(Base):\n    name = 'b'\n    order = 'first'\n")
    scan = plugins.scan_classes(tmp_path)
    assert [d.name for d in scan.declared] == ["g"]
    assert "a.py: cannot be read (line 2): SyntaxError" in scan.problems[0]
    assert "b.py: class B's order must be an int literal" in scan.problems[1]


def test_calls_need_a_literal_name_and_a_name_of_their_own(tmp_path):
    _write(tmp_path, "k.py", "register_bank_kind('one', K())\nregister_bank_kind('two', K())\nother('x')\n")
    assert [(d.name, d.module) for d in plugins.declared_calls(tmp_path, "register_bank_kind")] == [
        ("one", "k"), ("two", "k")]
    _write(tmp_path, "z.py", "register_bank_kind(NAME, K())\nregister_bank_kind('one', K())\n")
    scan = plugins.scan_calls(tmp_path, "register_bank_kind")
    assert [(d.name, d.module) for d in scan.declared] == [("one", "k"), ("two", "k")]  # k.py's 'one' stays
    assert "z.py:1: register_bank_kind needs a literal name" in scan.problems[0]
    assert "z.py:2: register_bank_kind('one') repeats a name that k.py registers already" in scan.problems[1]


def test_registering_a_bank_kind_twice_from_another_module_is_refused():
    """QA round 19: a second file registering 'stored' silently replaced the shipped bank."""
    from engine.attribution.methods import kfac_bank_kinds  # noqa: F401 - registers the shipped kinds

    def _build(method, ctx, factors, progress):
        raise RuntimeError

    with pytest.raises(ValueError, match="bank kind 'stored' is registered twice"):
        bank_kinds.register_bank_kind("stored", bank_kinds.BankKind(build=_build, stored=True))
    assert bank_kinds.bank_kind("stored").build.__module__ == "engine.attribution.methods.kfac_bank_kinds"


KIND = '''
from ..bank_kinds import BankKind, register_bank_kind


def _build(method, ctx, factors, progress):
    raise RuntimeError("not built in this test")


register_bank_kind("zz-test", BankKind(build=_build, stored=False, note="a test kind"))
'''


def test_a_bank_kind_is_one_file(methods_package_file, capsys, monkeypatch):
    from engine.cli.parser import main

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at the terminal's width, also inside 'zz-test'

    module = methods_package_file("zz_test_bank_kind", KIND)
    try:
        shipped = ("auto", "stored", "streamed", "compressed")
        assert tuple(k for k in bank_kinds.bank_modes() if k in shipped) == shipped
        assert "zz-test" in bank_kinds.bank_modes() and module not in sys.modules  # listed, not imported
        with pytest.raises(SystemExit):
            main(["query", "--help"])
        # --kfac-bank's help offers it (QA14 A4) with the note its own file gives (QA 19: notes were a CLI table)
        assert "zz-test (a test kind)" in " ".join(capsys.readouterr().out.split())
        assert module not in sys.modules
        kind = bank_kinds.bank_kind("zz-test")
        assert kind.stored is False and module in sys.modules
        with pytest.raises(ValueError, match="kfac_bank must be one of .*zz-test"):
            bank_kinds.bank_kind("nope")
    finally:
        bank_kinds._KINDS.pop("zz-test", None)


def test_the_scan_parses_one_file_at_a_time(tmp_path, monkeypatch):
    """CI run of 2026-12-06: two page runs of the app scanned the package at once and CPython 3.11's ast.parse
    raised "SystemError: AST constructor recursion depth mismatch" (its AST state is per interpreter, not per
    thread). Every parse of the scan holds one lock."""
    import ast

    _write(tmp_path, "a.py", "@register\nclass A(Base):\n    name = 'a'\n")
    held = []
    real = ast.parse
    monkeypatch.setattr(ast, "parse", lambda *a, **k: held.append(plugins._PARSE_LOCK.locked()) or real(*a, **k))
    assert [d.name for d in plugins.scan_classes(tmp_path).declared] == ["a"]
    assert held == [True]
