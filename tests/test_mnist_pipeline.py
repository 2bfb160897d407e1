"""The mnist pipeline at 28x28 end to end on a tiny U-Net: train, gallery, sample and query with
every gradient method, through the CLI, on 20 of the shipped digits (2 per class)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli.parser import main
from engine.config import ModelConfig, get_preset

pytestmark = pytest.mark.slow  # ~15 s of CPU (a minute on the loaded shared machine)

TINY_28 = ModelConfig(
    image_size=28,
    in_channels=1,
    base_channels=4,
    channel_mults=(1, 2, 2),  # 28 -> 14 -> 7 and back: 28 = 4 x 7
    num_res_blocks=1,
    attn_resolutions=(),
    num_groups=2,
)


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    preset = get_preset("mnist").replace(
        name="tiny-mnist",
        model=TINY_28,
        diffusion={"num_timesteps": 20},
        data={"per_class": 2},
        train={"steps": 4, "batch_size": 8, "checkpoint_every": 1000},
        attribution={"mc_samples": 2, "trak_dim": 16},
    )
    path = root / "preset.json"
    path.write_text(preset.to_json())
    ckpt = root / "ckpt"
    assert main(["train", "--preset", str(path), "--out", str(ckpt)]) == 0
    from engine.model.checkpoint import load_checkpoint
    from engine.model.gallery import make_gallery

    model, _, _ = load_checkpoint(ckpt)
    make_gallery(model, preset, ckpt, dataset=None, n=2, seed=3)  # mnist labels come from the shipped half
    return path, ckpt, root


def test_gallery_has_28x28_trajectories_and_labels(tiny_mnist):
    _, ckpt, _ = tiny_mnist
    with np.load(ckpt / "gallery.npz") as z:
        assert z["images"].shape == (2, 1, 28, 28)
        assert z["trajectory"].shape == (2, 21, 1, 28, 28)
        assert z["labels"].shape == (2,) and set(z["labels"].tolist()) <= set(range(10))


def test_sample_and_query_every_method(tiny_mnist, tmp_path, capsys):
    path, ckpt, root = tiny_mnist
    out = tmp_path / "s.npz"
    assert main(["sample", "--preset", str(path), "--checkpoint", str(ckpt), "--n", "3", "--seed", "4242",
                 "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["images"].shape == (3, 1, 28, 28)
    capsys.readouterr()
    args = ["query", "--preset", str(path), "--checkpoint", str(ckpt), "--query", "gallery:0",
            "--methods", "kfac,trak,dtrak,pixel", "--json", "--cache-root", str(root / "cache")]
    assert main(args + ["--auto-build"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert sorted(res["methods"]) == ["dtrak", "kfac", "pixel", "trak"]
    for name, entry in res["methods"].items():
        assert entry["status"] == "ok", (name, entry.get("reason"))
        top = entry["top"]
        assert len(top) == 10 and all(0 <= item["index"] < 20 for item in top)
    assert main(args) == 0  # the second query, without --auto-build, finds every cache built
    again = json.loads(capsys.readouterr().out)
    assert all(e["status"] == "ok" for e in again["methods"].values())
    assert [x["index"] for x in again["methods"]["kfac"]["top"]] == [x["index"] for x in res["methods"]["kfac"]["top"]]
