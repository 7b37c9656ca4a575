import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.helpers import make_colour_dataset, make_tiny_backbone  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_home_cache(tmp_path_factory):
    """Module- and session-scoped fixtures run before the per-test cache below: they too must
    never write into the user's ~/.cache/tlcli."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLCLI_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TLCLI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    return make_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny")


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture
def train_args(tiny_backbone):
    """Fast settings for the tiny backbone, as keyword arguments of tlcli.train."""
    return dict(backbone=str(tiny_backbone), image_size=32, epochs=60, batch_size=8, tensorboard=None)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, tiny_backbone, colour_data):
    """One head-only bundle trained on the colour data, shared read-only by many tests.
    Tests that modify a bundle copy it first (``bundle_copy``)."""
    import tlcli

    out = tmp_path_factory.mktemp("bundle") / "model"
    cache = tmp_path_factory.mktemp("bundle-cache")
    tlcli.train(colour_data, out=str(out), backbone=str(tiny_backbone), image_size=32, epochs=60,
                batch_size=8, tensorboard=None, cache_dir=str(cache))
    return out


@pytest.fixture
def bundle_copy(trained_bundle, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(trained_bundle, dst)
    return dst
