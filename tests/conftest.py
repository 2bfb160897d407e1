"""Shared fixtures: a tiny U-Net and a small slice of the digits data, fast on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

from engine.config import DataConfig, ModelConfig, Preset, TrainConfig
from engine.model.data import load_digits
from engine.model.diffusion import Diffusion
from engine.model.unet import build_model

TINY_MODEL = ModelConfig(
    image_size=8,
    in_channels=1,
    base_channels=8,
    channel_mults=(1, 1),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_groups=4,
)


# One intra-op thread everywhere, in-process CLI calls and subprocesses included (engine.threads
# honours it): caches rebuilt with another thread count sum in another order (~1e-5 relative in
# float32), which would make the byte- and score-equality tests depend on the machine's load.
os.environ.setdefault("ATTRIBUTION_THREADS", "1")
torch.set_num_threads(1)  # also for module-scoped fixtures, which run before the per-test fixture below


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Decoded image folders are cached in a folder of this session (``engine.model.folder_cache``), never in the
    user's ~/.cache; session-wide, and set before any fixture, so that module-scoped data and the CLI's
    subprocesses use it too."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ATTRIBUTION_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _main_module():
    """``sys.modules["__main__"]`` as it was before the test: Streamlit's AppTest runs its page as
    ``__main__`` and leaves it there, and a later ``torch.multiprocessing.spawn`` (the torchrun tests)
    re-runs the main module in each child, where ``AppTest.from_function``'s page script fails
    (NameError: ``__args``); whether a spawn test failed depended on the tests before it."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture
def tiny_preset() -> Preset:
    return Preset(
        name="tiny",
        model=TINY_MODEL,
        data=DataConfig(name="digits"),
        train=TrainConfig(steps=50, batch_size=32, lr=2e-3, log_every=10, checkpoint_every=20),
    )


@pytest.fixture
def tiny_model(tiny_preset: Preset) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_preset.model).eval()


@pytest.fixture
def diffusion() -> Diffusion:
    return Diffusion()


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def digits_small(digits):
    """First 64 digits: enough for attribution tests, small enough for CI."""
    return digits.subset(list(range(64)))


@pytest.fixture(scope="session")
def load_script():
    """``load_script("name")`` imports ``scripts/name.py`` as a module (the diagnostics are scripts, not package code)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


SHIPPED_METHODS = ("kfac", "trak", "dtrak", "clip", "pixel")  # the shipped methods, in display order


@pytest.fixture
def shipped_methods_only() -> None:
    """Skip a test that scripts the first start of the shipped methods (which columns answer, which build, in
    which order, with which words) when the package also holds a method a contributor's file adds: its page then
    rightly differs (QA 70: with one method file dropped in, these tests failed where the app was right).  Every
    other test holds with such a file in the package (docs/architecture.md §9)."""
    from engine.attribution.methods import method_names

    extra = [n for n in method_names() if n not in SHIPPED_METHODS]
    if extra:
        pytest.skip(f"scripts the shipped methods' first start; the package also holds {', '.join(extra)}")


@pytest.fixture
def methods_package_file(tmp_path, monkeypatch):
    """``write(stem, text) -> module name``: a new file among engine/attribution/methods/'s, the one-file rule's
    unit, seen by the registries' scans and importable as ``engine.attribution.methods.<stem>``; the file, its
    module and the scans are dropped after the test.

    The file goes into a folder of links to the package's files that the scans read for this test
    (``_PACKAGE_DIR``, ``bank_kinds._KIND_DIR``) and that the package's ``__path__`` reaches, not into the
    package itself: a file dropped there was read by every CLI a test on the other pytest-xdist worker ran
    meanwhile, whose one-line error checks then failed on its "warning: ... cannot be read" line."""
    import importlib
    import sys
    from pathlib import Path

    import engine.attribution.methods as pkg
    from engine.attribution import bank_kinds, plugins

    folder = tmp_path / "methods_package"
    folder.mkdir()
    for path in Path(pkg.__file__).resolve().parent.glob("*.py"):
        (folder / path.name).symlink_to(path)
    monkeypatch.setattr(pkg, "_PACKAGE_DIR", folder)
    monkeypatch.setattr(bank_kinds, "_KIND_DIR", folder)
    pkg.__path__.append(str(folder))  # after the package's own folder: the shipped modules still load from there
    plugins.forget()
    written: list[Path] = []

    def write(stem: str, text: str) -> str:
        path = folder / f"{stem}.py"
        path.write_text(text)
        written.append(path)
        plugins.forget()
        importlib.invalidate_caches()
        return f"engine.attribution.methods.{stem}"

    yield write
    pkg.__path__.remove(str(folder))
    for path in written:
        sys.modules.pop(f"engine.attribution.methods.{path.stem}", None)
    plugins.forget()
