"""Real pretrained weights from ../shared (opt-in: `make test-heavy`, i.e. pytest -m heavy).

They skip with a message when ../shared is absent.
"""

import os

import pytest

import tlcli
from bench._common import HYMENOPTERA, MOBILENET_V2, REPO, SHARED

pytestmark = pytest.mark.heavy

HUB_CACHE = SHARED / "tfhub_cache"


def need(*paths):
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A TF Hub cache with real symlinks to the shared one's modules (whose entries may be files
    holding a relative path, as after a copy that flattens symlinks)."""
    need(HUB_CACHE)
    cache = tmp_path / "tfhub"
    cache.mkdir()
    for entry in HUB_CACHE.iterdir():
        if entry.name.endswith(".descriptor.txt"):
            (cache / entry.name).write_bytes(entry.read_bytes())
        else:
            target = entry if entry.is_dir() else (HUB_CACHE / entry.read_text().strip())
            os.symlink(target.resolve(), cache / entry.name)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    return cache


def test_default_preset_resolves_offline_and_learns_the_sample_data(tmp_path, hub_cache):
    out = tmp_path / "model"
    result = tlcli.train(REPO / "sample_data" / "images", out=str(out), tensorboard=None)
    assert result.val_accuracy == 1.0 and result.train_accuracy == 1.0
    preds = tlcli.predict([REPO / "sample_data" / "images" / "red_discs"], model_dir=out, engine="tf")
    assert {p.predictions[0]["label"] for p in preds} == {"red_discs"}


def test_hymenoptera_head_only_reaches_95_percent(tmp_path):
    need(MOBILENET_V2, HYMENOPTERA)
    result = tlcli.train(HYMENOPTERA / "train", val_dir=str(HYMENOPTERA / "val"), backbone=str(MOBILENET_V2),
                         image_size=224, out=str(tmp_path / "model"), cache_dir=str(tmp_path / "cache"),
                         tensorboard=None)
    assert result.val_accuracy >= 0.95


def test_backbone_auto_on_hymenoptera_keeps_mobilenet_v2_over_the_tiny_one(tmp_path, hub_cache):
    need(HYMENOPTERA)
    result = tlcli.train(HYMENOPTERA, backbone="auto", out=str(tmp_path / "model"),
                         cache_dir=str(tmp_path / "cache"), tensorboard=None)
    choice = result.backbone_choice
    assert {c["name"] for c in choice["candidates"]} == {
        "mobilenet_v2_100_224", "mobilenet_v1_025_224", "mobilenet_v2_100_224 + mobilenet_v1_025_224"}
    assert choice["winner"] == "mobilenet_v2_100_224" and result.val_accuracy >= 0.95
