"""A method defined in one file and registered here only: the session, the CLI's query JSON and
an LDS run pick it up with no other edit (methods describe themselves; no lists of names)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHIPPED_METHODS
from distance_methods import PixelDistance
from test_session import TINY_ATTRIBUTION, tiny_checkpoint

import engine.attribution.session
from engine.attribution.methods import METHODS, method_names, parse_methods, register, unregister
from engine.attribution.session import AttributionSession
from engine.cli.parser import main

SHIPPED = list(SHIPPED_METHODS)  # in display order


class ToyDistance(PixelDistance):
    """Minus the mean squared pixel distance to the query: a stand-in "influence" in one class."""

    name = "toy"
    title = "Toy distance"


@pytest.fixture
def toy():
    register(ToyDistance)
    yield ToyDistance
    unregister("toy")
    assert "toy" not in METHODS


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits_small):
    folder = tmp_path_factory.mktemp("registry_ckpt")
    tiny_checkpoint(folder, digits_small, gallery=0)
    return folder


def test_registry_lists_builtins_then_registered(toy):
    # the shipped methods in their display order (a method added to the package in one file may sit between)
    assert [n for n in method_names() if n in SHIPPED] == SHIPPED
    assert method_names()[-1] == "toy" and METHODS["toy"] is ToyDistance
    assert parse_methods("pixel,toy") == ["pixel", "toy"]
    with pytest.raises(ValueError, match="valid methods: .*toy"):
        parse_methods("nope")
    assert ToyDistance(TINY_ATTRIBUTION).default_damping is None  # no damping_field


def test_toy_method_in_the_session(toy, folder, digits_small, tmp_path):
    s = AttributionSession(
        "digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION, dataset=digits_small
    )
    assert "toy" in s.method_names() and s.method_info()["toy"]["title"] == "Toy distance"
    assert s.status()["toy"]["built"]
    res = s.query(s.parse_query("train:5"), methods=["toy", "pixel"])
    toy_scores = res.methods["toy"].scores
    assert res.methods["toy"].status == "ok" and int(np.argmax(toy_scores)) == 5  # the query itself
    assert res.methods["toy"].damping is None


def _cli_query(method: str, index: int, folder, digits_small, cache, monkeypatch, capsys) -> dict:
    """``attribution-engine query --query train:INDEX --methods METHOD --json``: the method's record."""
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    rc = main([
        "query", "--query", f"train:{index}", "--methods", method, "--json", "--top-k", "3",
        "--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(cache),
    ])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)["methods"][method]


def test_toy_method_in_the_cli_query_json(toy, folder, digits_small, tmp_path, monkeypatch, capsys):
    m = _cli_query("toy", 7, folder, digits_small, tmp_path, monkeypatch, capsys)
    assert m["status"] == "ok" and m["kind"] == "influence" and m["top"][0]["index"] == 7


def test_a_damping_for_an_influence_method_without_one_is_refused_not_reported(
    toy, folder, digits_small, tmp_path, monkeypatch, capsys
):
    """QA round 14 (A2): `--damping grad-dot=1e-3` on a damping-free influence method exited 0 and the table and
    JSON reported `damping 0.001`, while the scores ignored it; a similarity's damping was already refused."""
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    rc = main(["query", "--query", "train:7", "--methods", "toy", "--damping", "toy=1e-3",
               "--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.startswith("error: --damping 'toy=1e-3': toy has no damping"), err
    s = AttributionSession(
        "digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION, dataset=digits_small
    )
    res = s.query(s.parse_query("train:7"), methods=["toy"], damping={"toy": 1e-3})  # the library: not recorded
    assert res.methods["toy"].status == "ok" and res.methods["toy"].damping is None


@pytest.mark.slow
def test_toy_method_in_a_quick_lds_run(toy, tmp_path):
    out = tmp_path / "lds"
    rc = main([
        "lds", "--quick", "--out", str(out), "--subsets", "3", "--queries", "2", "--mc-samples", "8",
        "--methods", "toy", "--device", "cpu",
    ])
    assert rc == 0
    rec = json.loads((out / "results" / "lds_quick_loss.json").read_text())
    assert set(rec["methods"]) == {"toy"}
    assert rec["methods"]["toy"]["removal_prediction"] is True and -1 <= rec["methods"]["toy"]["lds"] <= 1
    assert rec["sweeps"] == {}  # not in_sweeps


DROP_IN = '''
import numpy as np

from . import register
from .base import AttributionMethod, FixedScores, no_progress


@register
class DropIn(AttributionMethod):
    name = "dropin"
    order = 1000
    title = "Dropped-in file"
    kind = "influence"
    caption = "minus the pixel distance, from a file put in the package"
    needs_gradient = False

    def build(self, ctx, progress=no_progress):
        return None

    def is_built(self, ctx):
        return True

    def query_measurement(self, measurement):
        return None

    def prepare(self, ctx, query, query_grad):
        d = ((ctx.dataset.images.flatten(1) - query.image.flatten()[None]) ** 2).mean(1)
        return FixedScores(scores=(-d).numpy().astype(np.float32))

    def score(self, prepared, damping=None):
        return prepared.scores
'''


@pytest.fixture
def dropped_in_file(methods_package_file):
    """One new file in engine/attribution/methods/ and nothing else: the one-file rule, literally."""
    module = methods_package_file("zz_test_dropin", DROP_IN)
    yield module
    unregister("dropin")


def test_a_method_file_dropped_into_the_package_is_listed_everywhere(
    dropped_in_file, folder, digits_small, tmp_path, monkeypatch, capsys
):
    import sys
    from types import SimpleNamespace

    from engine.attribution.group_attribution import check_influence_methods
    from explorer.runtime import influence_titles

    assert "dropin" in method_names() and method_names()[-1] == "dropin"  # order 1000: after the shipped ones
    assert dropped_in_file not in sys.modules  # listed from its source, not imported
    assert parse_methods("kfac,dropin") == ["kfac", "dropin"]
    assert METHODS["dropin"].__name__ == "DropIn"
    s = AttributionSession(
        "digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION, dataset=digits_small
    )
    assert "dropin" in check_influence_methods(s, None)  # the group commands' default: every influence method
    titles = influence_titles(SimpleNamespace(session=s))  # the app's wording: "K-FAC influence, TRAK, ... or X"
    assert titles.startswith("K-FAC") and ", D-TRAK" in titles and titles.endswith(" or Dropped-in file")
    assert _cli_query("dropin", 11, folder, digits_small, tmp_path, monkeypatch, capsys)["top"][0]["index"] == 11


def test_the_source_scan_agrees_with_the_imported_classes():
    """What the registry lists without importing is what importing each shipped file registers."""
    import importlib
    from pathlib import Path

    import engine.attribution.methods as pkg
    from engine.attribution.plugins import declared_classes

    declared = declared_classes(Path(pkg.__file__).resolve().parent)
    assert [d.name for d in declared if d.name in SHIPPED] == SHIPPED
    for d in declared:
        cls = getattr(importlib.import_module(f"engine.attribution.methods.{d.module}"), d.cls)
        assert (cls.name, cls.order) == (d.name, d.order) and METHODS[d.name] is cls
        assert (cls.title, cls.kind) == (d.title, d.kind)  # inherited ones too (D-TRAK's kind from TRAK)
        assert cls.needs_gradient is d.needs_gradient  # lds-ablation's "every gradient method" (QA 70 F3)


def test_the_pool_and_precomputed_paths_take_the_same_damping_rule(toy, folder, digits_small, tmp_path):
    """Review 47: the pool's matrices and the precomputed results had their own copy of the damping rule and
    still reported a damping the toy influence method (no damping_field) ignores; all three paths now ask
    ``damping_for``."""
    s = AttributionSession(
        "digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION, dataset=digits_small
    )
    assert s.damping_for("toy", {"toy": 1e-3}) is None
    assert s.damping_for("pixel", {}) is None
    assert s.damping_for("kfac", {"kfac": 1e-3}) == 1e-3
    assert s.damping_for("kfac", {}) == s.method("kfac").default_damping


BROKEN_SYNTAX = "from . import register\n\n@register\nclass Broken(Base)\n    name = 'broken'\n"
BROKEN_AT_IMPORT = '''
from . import register
from .pixel_cosine import PixelCosine

THRESHOLD = undefined_name + 1


@register
class FailsOnImport(PixelCosine):
    name = "failsonimport"
    title = "Fails on import"
    kind = "similarity"
    order = 1001
'''
MISSING_PACKAGE = '''
from . import register
from .pixel_cosine import PixelCosine
import zz_package_nobody_installed  # noqa: F401


@register
class NeedsPackage(PixelCosine):
    name = "needspackage"
    title = "Needs a package"
    order = 1003
'''
ABSTRACT = '''
from . import register
from .base import AttributionMethod


@register
class NoScore(AttributionMethod):
    name = "noscore"
    title = "No score"
    order = 1002
'''


def test_a_broken_method_file_leaves_the_other_methods_working(
    methods_package_file, folder, digits_small, tmp_path, monkeypatch, capsys
):
    """QA round 19: a method file with a syntax error stopped every command, --help included, and one that
    raised at import (a NameError) or declared an abstract class stopped every query and the app. Now each
    is a warning or an unavailable method that names its file; pixel and K-FAC answer as before."""
    from engine.attribution.methods import plugin_problems

    methods_package_file("zz_test_broken_syntax", BROKEN_SYNTAX)
    methods_package_file("zz_test_fails_on_import", BROKEN_AT_IMPORT)
    methods_package_file("zz_test_abstract", ABSTRACT)
    methods_package_file("zz_test_needs_package", MISSING_PACKAGE)
    try:
        (problem,) = plugin_problems()
        assert "zz_test_broken_syntax.py: cannot be read (line 4): SyntaxError" in problem
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        out, err = capsys.readouterr()
        assert exit_.value.code == 0 and "attribution-engine" in out
        assert err.startswith("warning: ") and "zz_test_broken_syntax.py: cannot be read" in err
        s = AttributionSession(
            "digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
            dataset=digits_small,
        )
        info = s.method_info()
        assert info["failsonimport"]["title"] == "Fails on import" and info["failsonimport"]["kind"] == "similarity"
        res = s.query(s.parse_query("train:5"), methods=["pixel", "failsonimport", "noscore"])
        assert res.methods["pixel"].status == "ok" and int(np.argmax(res.methods["pixel"].scores)) == 5
        bad = res.methods["failsonimport"]
        assert bad.status == "unavailable"
        assert "engine/attribution/methods/zz_test_fails_on_import.py failed to load: NameError" in bad.reason
        assert "engine/attribution/methods/zz_test_abstract.py failed to load: TypeError" in res.methods["noscore"].reason
        # a missing package quotes its import error, and names the file too (it did not: review of §9)
        missing = s.query(s.parse_query("train:5"), methods=["needspackage"]).methods["needspackage"]
        assert missing.status == "unavailable" and "cannot import the needspackage method (" in missing.reason
        assert "zz_test_needs_package.py): No module named 'zz_package_nobody_installed'" in missing.reason
        # the CLI query of a shipped method answers, with the warning on stderr
        assert _cli_query("pixel", 9, folder, digits_small, tmp_path, monkeypatch, capsys)["top"][0]["index"] == 9
    finally:
        unregister("failsonimport")
        unregister("noscore")
        unregister("needspackage")


def test_the_methods_command_lists_a_dropped_in_file_without_importing_it(dropped_in_file, capsys):
    """QA round 19: no command listed the methods (and group's, reverse's and lds's --help name none)."""
    import sys

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "dropin" in out and "Dropped-in file" in out and "engine/attribution/methods/zz_test_dropin.py" in out
    assert "stored: int8 on disk" in out
    assert dropped_in_file not in sys.modules
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in listed["methods"]}
    assert by_name["dtrak"] == {"name": "dtrak", "kind": "influence", "title": "D-TRAK",
                                "file": "engine/attribution/methods/trak.py"}
    assert by_name["dropin"]["kind"] == "influence"
    assert {"name": "compressed", "note": "per-layer projected, candidates re-ranked exactly"} in listed["kfac_bank_kinds"]


DAMPED = '''
from distance_methods import PixelDistance

from . import register


@register
class Damped(PixelDistance):
    name = "damped"
    order = 1003
    title = "Damped distance"
    kind = "influence"
    damping_default = 0.5
    damping_range = (1e-3, 1e2)

    def score(self, prepared, damping=None):
        return prepared.scores / (self.default_damping if damping is None else float(damping))
'''


def test_a_method_file_declares_its_own_default_damping(
    methods_package_file, folder, digits_small, tmp_path, monkeypatch, capsys
):
    """QA round 19: a damping needed an AttributionConfig field, an edit to engine/config.py, so a method with a
    damping was two files. ``damping_default`` in the method's own file is its default; the slider's steps,
    ``--damping NAME=VALUE`` and the reported damping follow it."""
    methods_package_file("zz_test_damped", DAMPED)
    try:
        s = AttributionSession(
            "digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=TINY_ATTRIBUTION,
            dataset=digits_small,
        )
        info = s.method_info()["damped"]
        assert info["default_damping"] == 0.5 and 0.5 in info["damping_steps"]
        assert s.damping_for("damped", {}) == 0.5 and s.damping_for("damped", {"damped": 2.0}) == 2.0
        q = s.parse_query("train:4")
        default = s.query(q, methods=["damped"]).methods["damped"]
        assert default.damping == 0.5
        moved = s.query(q, methods=["damped"], damping={"damped": 2.0}).methods["damped"]
        np.testing.assert_allclose(moved.scores * 4.0, default.scores, rtol=1e-6)
        monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
        rc = main(["query", "--query", "train:4", "--methods", "damped", "--damping", "damped=2", "--json",
                   "--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(tmp_path)])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert json.loads(out)["methods"]["damped"]["damping"] == 2.0
    finally:
        unregister("damped")


def test_query_says_on_stderr_which_named_method_did_not_score_and_writes_no_empty_scores_file(
    toy, folder, digits_small, tmp_path, monkeypatch, capsys
):
    """QA round 20: `query --methods kfac,pixel --json` with K-FAC not built exited 0 with nothing on stderr
    (the status was only inside the JSON); `--scores-out` was written when nothing scored; a second --query
    silently replaced the first."""
    monkeypatch.setattr(engine.attribution.session, "load_dataset", lambda cfg: digits_small)
    common = ["--checkpoint", str(folder), "--device", "cpu", "--cache-root", str(tmp_path / "empty")]
    rc = main(["query", "--query", "train:3", "--methods", "kfac,toy", "--json", *common])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["methods"]["toy"]["status"] == "ok"
    assert "warning: kfac unavailable: not built" in err
    scores = tmp_path / "s.npz"
    rc = main(["query", "--query", "train:3", "--methods", "kfac", "--scores-out", str(scores), *common])
    assert rc == 2 and not scores.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["query", "--query", "train:3", "--query", "train:4", "--methods", "toy", *common])
    assert exit_.value.code == 2 and "--query given twice" in capsys.readouterr().err
    rc = main(["query", "--query", "train:3", "--methods", "kfac", "--damping", "kfac=1e-6", "--damping",
               "kfac=1e-4", *common])
    assert rc == 2 and "kfac's damping is given twice" in capsys.readouterr().err


F16_KIND = '''
import torch

from ..bank import artefact_settings
from ..bank_build import build_bank
from ..bank_kinds import BankKind, register_bank_kind

NAME = "zz-test-f16-bank"


def _own(method, ctx):
    return {**method.factor_settings(ctx), "loss": "loss"}


def _args(method):
    return {"quantize": False, "chunk_size": method.chunk_size, "store_dtype": torch.float16}


def _cache_key(method, ctx):
    return NAME, artefact_settings(_own(method, ctx), **_args(method))


def _build(method, ctx, factors, progress):
    return build_bank(ctx.model, ctx.diffusion, ctx.dataset.images, ctx.train_draws, factors, ctx.params,
                      store=ctx.store, name=NAME, settings=_own(method, ctx), device=ctx.device,
                      progress=method.bank_progress(progress), consumers=method.gradient_consumers, **_args(method))


register_bank_kind("zz-f16", BankKind(build=_build, stored=True, cache_key=_cache_key, note="float16 rows (a test)"))
'''


def test_a_bank_kind_file_dropped_into_the_package_reports_itself_built(
    methods_package_file, folder, digits_small, tmp_path
):
    """QA 30b #1: a bank kind whose ``cache_key`` followed §9 (the factors' settings plus its own) was never
    "built": ``build_bank`` stores under more settings (``quantize``, ``chunk_size``), so ``is_built`` and
    ``status`` looked in a folder never written.  ``bank.artefact_settings`` gives the stored key; the kind
    also keeps its rows in float16 (``store_dtype``), scored in float32 at a tiny damping."""
    from engine.attribution import bank_kinds

    methods_package_file("zz_test_f16_bank", F16_KIND)
    assert "zz-f16" in bank_kinds.bank_modes()
    try:
        _check_the_float16_kind(folder, digits_small, tmp_path)
    finally:
        bank_kinds._KINDS.pop("zz-f16", None)  # registered on first use: later tests see the shipped kinds only


def _check_the_float16_kind(folder, digits_small, tmp_path) -> None:
    import dataclasses

    import torch

    from engine.attribution.bank import artefact_settings

    cfg = dataclasses.replace(TINY_ATTRIBUTION, kfac_bank="zz-f16")

    def session() -> AttributionSession:
        return AttributionSession("digits", checkpoint=folder, device="cpu", cache_root=tmp_path, config=cfg,
                                  dataset=digits_small)

    s = session()
    assert not s.status(["kfac"])["kfac"]["built"]
    assert s.build(["kfac"])["kfac"]["status"] == "ok"
    fresh = session()  # another process: is_built reads the store, not the built method
    assert fresh.status(["kfac"])["kfac"]["built"]
    kfac = fresh.method("kfac")
    assert kfac.is_built(fresh.ctx)
    name, key = kfac.cache_keys(fresh.ctx)[1]
    assert name == "zz-test-f16-bank" and key["store_dtype"] == "float16" and key["quantize"] is False
    own = {**kfac.factor_settings(fresh.ctx), "loss": "loss"}
    assert not fresh.ctx.store.exists(name, own)  # the key §9 used to describe: never written
    assert key == artefact_settings(own, quantize=False, chunk_size=kfac.chunk_size, store_dtype=torch.float16)
    arrays = fresh.ctx.store.load_arrays(name, key)
    assert all(a.dtype == np.float16 for a in arrays.values())
    res = fresh.query(fresh.parse_query("train:5"), methods=["kfac"], damping={"kfac": 1e-8})
    assert res.methods["kfac"].status == "ok" and np.isfinite(res.methods["kfac"].scores).all()
