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


def test_a_registered_class_without_a_literal_name_or_twice_is_refused(tmp_path):
    _write(tmp_path, "a.py", "@register\nclass A(Base):\n    name = make_name()\n")
    with pytest.raises(ValueError, match="class A is @register but sets no literal name"):
        plugins.declared_classes(tmp_path)
    _write(tmp_path, "a.py", "@register\nclass A(Base):\n    name = 'x'\n")
    _write(tmp_path, "b.py", "@register\nclass B(Base):\n    name = 'x'\n")
    with pytest.raises(ValueError, match="declared twice"):
        plugins.declared_classes(tmp_path)


def test_calls_need_a_literal_name(tmp_path):
    _write(tmp_path, "k.py", "register_bank_kind('one', K())\nregister_bank_kind('two', K())\nother('x')\n")
    assert [(d.name, d.module) for d in plugins.declared_calls(tmp_path, "register_bank_kind")] == [
        ("one", "k"), ("two", "k")]
    _write(tmp_path, "k.py", "register_bank_kind(NAME, K())\n")
    with pytest.raises(ValueError, match="literal name"):
        plugins.declared_calls(tmp_path, "register_bank_kind")


KIND = '''
from ..bank_kinds import BankKind, register_bank_kind


def _build(method, ctx, factors, progress):
    raise RuntimeError("not built in this test")


register_bank_kind("zz-test", BankKind(build=_build, stored=False))
'''


def test_a_bank_kind_is_one_file(methods_package_file, capsys):
    from engine.cli.parser import main

    module = methods_package_file("zz_test_bank_kind", KIND)
    try:
        shipped = ("auto", "stored", "streamed", "compressed")
        assert tuple(k for k in bank_kinds.bank_modes() if k in shipped) == shipped
        assert "zz-test" in bank_kinds.bank_modes() and module not in sys.modules  # listed, not imported
        with pytest.raises(SystemExit):
            main(["query", "--help"])
        assert "zz-test" in " ".join(capsys.readouterr().out.split())  # --kfac-bank's help offers it (QA14 A4)
        assert module not in sys.modules
        kind = bank_kinds.bank_kind("zz-test")
        assert kind.stored is False and module in sys.modules
        with pytest.raises(ValueError, match="kfac_bank must be one of .*zz-test"):
            bank_kinds.bank_kind("nope")
    finally:
        bank_kinds._KINDS.pop("zz-test", None)
