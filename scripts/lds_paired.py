"""Paired LDS differences between two entries of LDS result files: does one really beat the other?

Why: two LDS values computed on the same queries, subsets and retrained models share most of their
noise, so their intervals overlap even where one is reliably ahead.  Whether A beats B is read from
the per-query difference of their Spearman correlations, bootstrapped over the queries (2,000
resamples, seed 0, like every interval in the result files):

    d_q = LDS_q(A) - LDS_q(B),   mean_q d_q  with a 95% percentile interval over resampled queries.

An "A > B" claim holds where that interval excludes 0.  Each operand is ``FILE:KEY``: KEY is a method
of the file (``kfac``, ``kfac[loss]``) or a slash path to any entry that holds ``per_query``
(``variants/plain/methods/kfac`` in an ablation file).  ``--first N`` pairs the first N queries of
each, e.g. a Q = 128 run against a Q = 32 run of the same gallery (a run asked for more queries keeps
the ones it measured first).  The script says where the two files' settings differ.

    python scripts/lds_paired.py --pair assets/results/lds_digits_elbo.json:dtrak assets/results/lds_digits_elbo.json:trak
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# the settings that make two files' per-query values pairable when they agree (the queries' order included)
PAIRING = ("preset", "num_train", "subsets", "subset_seed", "fraction", "measurement",
           "true_measurement_mc_samples", "true_measurement_seed", "query_source", "targets_digest")


def resolve(operand: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(the file's record, the entry with ``per_query``, a label) for ``FILE:KEY``."""
    path, sep, key = operand.partition(".json:")
    if not sep or not key:
        raise SystemExit(f"{operand!r}: expected FILE.json:KEY, e.g. assets/results/lds_digits_loss.json:kfac")
    file = Path(path + ".json")
    if not file.is_file():
        raise SystemExit(f"{file}: no such file")
    record = json.loads(file.read_text())
    parts = key.split("/") if "/" in key else ["methods", key]
    entry: Any = record
    for p in parts:
        if not isinstance(entry, dict) or p not in entry:
            have = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise SystemExit(f"{file}: no {p!r} on the path {key!r} (there: {have})")
        entry = entry[p]
    if not isinstance(entry, dict) or entry.get("per_query") is None:
        raise SystemExit(f"{file}:{key} holds no per-query LDS values (files written before they were kept)")
    return record, entry, f"{file.name}:{key}"


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The pairing settings on which two files' configs differ (missing keys count only when both have one)."""
    ca, cb = a.get("config", {}), b.get("config", {})
    return [f"{k}: {ca[k]!r} vs {cb[k]!r}" for k in PAIRING if k in ca and k in cb and ca[k] != cb[k]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), required=True,
                        help="two FILE.json:KEY operands; prints A - B (repeatable)")
    parser.add_argument("--first", type=int, default=None, help="pair the first N queries of each")
    args = parser.parse_args(argv)

    from engine.evaluation.lds_ablation import paired_difference

    failed = False
    for a_op, b_op in args.pair:
        rec_a, a, la = resolve(a_op)
        rec_b, b, lb = resolve(b_op)
        pa, pb = list(a["per_query"]), list(b["per_query"])
        if args.first is not None:
            pa, pb = pa[: args.first], pb[: args.first]
        if len(pa) != len(pb):
            print(f"{la} - {lb}: {len(pa)} against {len(pb)} queries; pass --first N to pair the first N",
                  file=sys.stderr)
            failed = True
            continue
        diffs = config_differences(rec_a, rec_b)
        if diffs:
            print(f"  (settings differ: {'; '.join(diffs)})")
        d = paired_difference(pa, pb, lb)
        lo, hi = d["ci95"]
        verdict = "A > B" if lo > 0 else "A < B" if hi < 0 else "not separated"
        mean = lambda v: sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v))  # noqa: E731
        print(f"{la} - {lb}: {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] over {d['queries']} queries "
              f"(A {mean(pa):.3f}, B {mean(pb):.3f}): {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
