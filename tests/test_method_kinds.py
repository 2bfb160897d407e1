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


def test_a_registered_method_is_named_in_the_clis_words(capsys):
    assert names_of_kind("influence") == ["kfac", "trak", "dtrak"]  # the shipped files' declarations
    assert names_of_kind("similarity") == ["clip", "pixel"]
    register(Likeness)
    register(Leverage)
    try:
        assert names_of_kind("similarity")[-1] == "likeness" and names_of_kind("influence")[-1] == "leverage"
        for argv in (["query", "--help"], ["--help"]):  # the subcommands' one-line help is in the list
            try:
                main(argv)
            except SystemExit:  # argparse's --help exits
                pass
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        assert "Influence scores (kfac, trak, dtrak, leverage)" in out, out
        assert "The similarities (clip, pixel, likeness) rank by likeness" in out, out
        assert "build each method's attribution cache (kfac, trak, dtrak, clip, pixel, likeness, leverage;" in out
        assert main(["copy-check", "--method", "likeness"]) == 2
        assert "use an influence method (kfac, trak, dtrak, leverage)" in capsys.readouterr().err
    finally:
        unregister("likeness")
        unregister("leverage")
