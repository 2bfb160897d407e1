"""The CLI's words about which methods are influences and which similarities come from the registry: a method
added in one file appears in them (QA 30b #3: `build`'s help, `query`'s description and copy-check's refusal
typed the shipped names by hand, so a new method was left out of them)."""

from __future__ import annotations

from distance_methods import PixelDistance

from engine.attribution.methods import names_of_kind, register, unregister
from engine.cli.parser import main


class Likeness(PixelDistance):
    name = "likeness"
    title = "Likeness"
    kind = "similarity"


class Leverage(PixelDistance):
    name = "leverage"
    title = "Leverage"
    kind = "influence"


def _in_order(names: list[str], out: str, prefix: str, end: str) -> None:
    """``out`` holds ``prefix``, a comma list, then ``end``, and that list holds ``names`` in this order: a method
    file dropped into the package may sit among them (docs/architecture.md §9: the tests name the shipped
    methods as a subsequence, so ``make test`` stays green with such a file; QA 31b)."""
    start = out.index(prefix) + len(prefix)
    listed = out[start : out.index(end, start)].split(", ")
    assert [n for n in listed if n in names] == names, (names, listed)


def test_a_registered_method_is_named_in_the_clis_words(capsys):
    influence, similarity = names_of_kind("influence"), names_of_kind("similarity")
    # the shipped files' declarations, in order (another file in the package may add its own among them)
    assert [n for n in influence if n in ("kfac", "trak", "dtrak")] == ["kfac", "trak", "dtrak"]
    assert [n for n in similarity if n in ("clip", "pixel")] == ["clip", "pixel"]
    register(Likeness)
    register(Leverage)
    try:
        assert names_of_kind("similarity") == [*similarity, "likeness"]
        assert names_of_kind("influence") == [*influence, "leverage"]
        for argv in (["query", "--help"], ["--help"]):  # the subcommands' one-line help is in the list
            try:
                main(argv)
            except SystemExit:  # argparse's --help exits
                pass
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        _in_order([*influence, "leverage"], out, "Influence scores (", ")")
        _in_order([*similarity, "likeness"], out, "The similarities (", ") rank by likeness")
        _in_order(["kfac", "trak", "dtrak", "clip", "pixel", "likeness", "leverage"], out,
                  "build each method's attribution cache (", ";")
        assert main(["copy-check", "--method", "likeness"]) == 2
        _in_order([*influence, "leverage"], capsys.readouterr().err, "use an influence method (", ")")
    finally:
        unregister("likeness")
        unregister("leverage")
