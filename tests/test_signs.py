"""The one sign classification behind every influence heading (engine.attribution.signs)."""

from engine.attribution.signs import end_signs, removed_words, reverse_caveat


def test_each_end_counts_the_sign_its_heading_claims():
    hi = end_signs([3.0, 1.0, -0.5, 0.0], highest=True)
    assert (hi.n, hi.agreeing, hi.opposite) == (4, 2, 1)
    assert hi.heading() == "highest scores (2 of 4 not positive: not proponents)"
    lo = end_signs([-3.0, -1.0], highest=False)
    assert lo.all_agree and lo.heading() == "opponents"
    lo = end_signs([0.5, 0.1], highest=False)
    assert lo.all_opposite and lo.heading() == "lowest scores (none negative: no opponents)"


def test_zero_is_neither_proponent_nor_opponent():
    """A score of exactly 0 predicts no change: the CLI said "none positive" over [0, -1] while the
    app said "the positive ones are proponents" (there were none) and "all negative" only without zeros."""
    hi = end_signs([0.0, -1.0], highest=True)
    assert hi.agreeing == 0 and not hi.all_agree and not hi.all_opposite
    assert hi.heading() == "highest scores (none positive: no proponents)"
    assert end_signs([0.0, 0.0], highest=False).heading() == "lowest scores (none negative: no opponents)"
    assert end_signs([], highest=True).heading() == "proponents"


def test_reverse_caveat_names_the_changes_that_are_no_support():
    assert reverse_caveat([2.0, 1.0]) is None
    assert reverse_caveat([2.0, 0.0, -1.0]).startswith("2 of these 3 changes are not positive")
    assert reverse_caveat([-1.0, -2.0]).startswith("none of these 2 changes is positive")
    assert "removing the group would" in reverse_caveat([1.0, -1.0], removed_words(5))
    assert "removing the image would" in reverse_caveat([1.0, -1.0], removed_words(1))
