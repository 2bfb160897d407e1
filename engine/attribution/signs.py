"""Which images at each end of an influence ranking are proponents and which opponents: one rule for
every heading (the CLI's text, the app's grids, the app's PNG export), and one wording of what removing them
does (``removal_effect``).

A score is the predicted change of the query's measurement if the image were removed (eq. 6; sign and
scale in docs/architecture.md §4): positive = a proponent (removing it raises the measurement: for a
likelihood-like one, it makes the query less likely), negative = an opponent, exactly 0 = neither.  The k highest scores need not be positive, nor the k
lowest negative: on a barely trained model every image can raise the query's loss, with the trajectory
measurement every score can be negative, and ``--top-k 1000`` on digits reaches 320 negative scores.
A heading that said "proponents" over them would state the opposite of what the numbers predict, so
each end is classified here and the CLI and the app render the same classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EndSigns:
    """The signs of one end of a ranking: the k highest (``highest``) or the k lowest scores."""

    highest: bool
    n: int  # scores at this end
    agreeing: int  # positive at the highest end (proponents), negative at the lowest (opponents)
    opposite: int  # the other sign; the remaining n - agreeing - opposite are exactly 0

    @property
    def word(self) -> str:
        return "proponents" if self.highest else "opponents"

    @property
    def sign(self) -> str:
        """The sign this end's images need to be ``word``."""
        return "positive" if self.highest else "negative"

    @property
    def end(self) -> str:
        return "highest" if self.highest else "lowest"

    @property
    def all_agree(self) -> bool:
        """Every score has this end's sign (an empty end is trivially so)."""
        return self.agreeing == self.n

    @property
    def all_opposite(self) -> bool:
        """Every score has the other end's sign (no zeros among them)."""
        return self.n > 0 and self.opposite == self.n

    def heading(self, measurement: str | None = None) -> str:
        """The plain-text heading: the word itself when it holds for every score, else which do not.
        ``measurement``: the one the scores predict the change of; given, a heading whose word holds says what
        removing the images does (``removal_effect``: the PNG export's titles, QA 64 F2), in the page's words."""
        if self.all_agree:
            if measurement is None:
                return self.word
            effect = removal_effect(measurement)
            return f"{self.word} (removing them {effect.positive if self.highest else effect.negative})"
        if self.agreeing == 0:
            return f"{self.end} scores (none {self.sign}: no {self.word})"
        return f"{self.end} scores ({self.n - self.agreeing} of {self.n} not {self.sign}: not {self.word})"


# the measurements that are no likelihood proxy (engine/model/measurements.py, whose catalogue says so: D-TRAK's
# mean square of the noise prediction), with the name a sentence gives them; every other measurement is loss-like,
# lower = more likely.  Here, not in that module, because the CLI's headings must not import torch.
NOT_LIKELIHOOD = {"square-norm": "square norm"}


def likelihood_like(measurement: str) -> bool:
    """Whether a lower ``measurement`` means a more likely query: every one but the square norm."""
    return str(measurement) not in NOT_LIKELIHOOD


@dataclass(frozen=True)
class Removal:
    """What removing training images does to a query's ``measurement``, in words: ``positive`` for images with
    a positive score (proponents), ``negative`` for a negative one, ``slight`` for a positive score among the
    lowest (the bottom of a ranking whose every score is positive)."""

    positive: str
    negative: str
    slight: str


def removal_effect(measurement: str, subject: str = "the query") -> Removal:
    """The words for what removal does to ``subject``'s ``measurement``, for every heading and caption that
    says it (the app's grids, its Groups and retraining captions, the PNG export).  "Less likely" holds for a
    likelihood-like measurement only: over the square norm (D-TRAK's, whatever is asked) it claimed a change of
    likelihood that measurement does not measure (QA 64 F2); there a positive score means removing the image
    raises the square norm (docs/architecture.md §4)."""
    name = NOT_LIKELIHOOD.get(str(measurement))
    if name is None:
        return Removal(f"makes {subject} less likely", f"makes {subject} more likely",
                       f"also makes {subject} less likely, if slightly")
    return Removal(f"raises {subject}'s {name}", f"lowers {subject}'s {name}",
                   f"also raises {subject}'s {name}, if slightly")


def end_signs(scores: Sequence[float], highest: bool) -> EndSigns:
    """Classify one end's scores: how many are ``> 0`` and ``< 0`` (the highest end counts the positive
    ones as agreeing, the lowest end the negative ones)."""
    pos = sum(1 for v in scores if v > 0)
    neg = sum(1 for v in scores if v < 0)
    return EndSigns(highest, len(scores), pos if highest else neg, neg if highest else pos)


def reverse_caveat(changes: Sequence[float], removed: str = "the group") -> str | None:
    """The reverse view ranks samples by the predicted change of their measurement if a group were
    removed, largest first, under "what the group supports most".  A change that is not positive is no
    support: removing the group would not raise that sample's measurement.  None when every listed
    change is positive, else the sentence both the CLI and the app show under the heading.  ``removed``
    names what is removed: "the image" for a group of one (``reverse --train N``)."""
    signs = end_signs(changes, highest=True)
    if signs.all_agree:
        return None
    if signs.agreeing == 0:
        return (f"none of these {signs.n} changes is positive: removing {removed} would raise no listed "
                "sample's measurement, so it supports none of them")
    return (f"{signs.n - signs.agreeing} of these {signs.n} changes are not positive: removing {removed} "
            "would not raise those samples' measurement")


def removed_words(size: int) -> str:
    """How the reverse view names what is removed: one training image, or a group."""
    return "the image" if size == 1 else "the group"
