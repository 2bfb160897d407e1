"""The draws of a TRUE measurement (a retrained model's loss) have one default, ``config.TRUE_MC_SAMPLES``: the
CLI's --true-mc-samples of retrain-top, group-retrain and lds-ablation, the evaluation functions and
``MeasureSpec`` all take it (QA 30b, constants #1: 1024 was typed in 12 places that could drift apart, and a
drift would make two commands' cached measurements of one model miss each other)."""

from __future__ import annotations

import inspect

from engine.cli.parser import build_parser
from engine.config import TRUE_MC_SAMPLES


def _subparser(parser, name):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices[name]


def test_every_default_of_the_true_measurements_draws_is_the_one_constant():
    from engine.evaluation import group_retrain, retrain_top, retrain_top_run, runs

    parser = build_parser()
    for command, dest in (("retrain-top", "mc_samples"), ("group-retrain", "true_mc_samples"),
                          ("lds-ablation", "mc_samples")):
        sub = _subparser(parser, command)
        action = next(a for a in sub._actions if a.dest == dest)
        assert "--true-mc-samples" in action.option_strings and action.default == TRUE_MC_SAMPLES, command
        assert f"default {TRUE_MC_SAMPLES}" in action.help
    lds = next(a for a in _subparser(parser, "lds")._actions if a.dest == "mc_samples")
    assert lds.default is None and f"default {TRUE_MC_SAMPLES}; quick 64" in lds.help  # None: quick or not, below
    assert runs.MeasureSpec().mc_samples == TRUE_MC_SAMPLES
    assert retrain_top_run.RetrainTopConfig(queries=("gallery:0",)).mc_samples == TRUE_MC_SAMPLES
    functions = [f for module in (retrain_top, group_retrain) for f in vars(module).values()
                 if inspect.isfunction(f) and f.__module__ == module.__name__]
    functions += [m for c in vars(retrain_top).values() if inspect.isclass(c) and c.__module__ == retrain_top.__name__
                  for m in vars(c).values() if inspect.isfunction(m)]
    defaults = [p.default for f in functions for name, p in inspect.signature(f).parameters.items()
                if name == "mc_samples"]
    assert len(defaults) >= 4 and set(defaults) == {TRUE_MC_SAMPLES}, defaults
