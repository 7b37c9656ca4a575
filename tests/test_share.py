"""tlcli share: a copy of a bundle without the trainer's folders (tlcli.json recorded the absolute
image folder, --out, the cache, a local backbone and the exports; splits.json every image's
absolute path; a TensorBoard log inside the bundle names the host)."""

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli as run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone, colour_data):
    """A bundle as a user makes it: a TensorBoard log inside (the default), a cache, an export
    inside the bundle and one outside, and a skipped file recorded."""
    import tlcli

    root = tmp_path_factory.mktemp("share")
    bundle = root / "model"
    tlcli.train(colour_data, out=str(bundle), backbone=str(tiny_backbone), image_size=32, epochs=60, batch_size=8,
                cache_dir=str(root / "cache"))
    tlcli.export_tflite(bundle)
    tlcli.export_tflite(bundle, output=root / "elsewhere.tflite", data_dir=str(colour_data))
    meta = json.loads((bundle / "tlcli.json").read_text())
    meta["skipped"] = [{"path": str(colour_data / "red" / "notes.txt"), "reason": "not an image", "detail": None}]
    (bundle / "tlcli.json").write_text(json.dumps(meta))
    return root, bundle


@pytest.fixture(scope="module")
def shared(trained, tmp_path_factory):
    from tlcli.bundle.share import share

    out = tmp_path_factory.mktemp("shared") / "colours"
    return share(trained[1], out=out), out


def test_the_shared_copy_holds_no_absolute_path_and_no_host_name(trained, shared, colour_data, tiny_backbone):
    import socket

    root, bundle = trained
    result, out = shared
    secrets = [str(p).encode() for p in (root, colour_data, tiny_backbone, Path.home())]
    for f in out.rglob("*"):
        assert socket.gethostname() not in f.name
        if f.is_file():
            body = f.read_bytes()
            assert not [s for s in secrets if s in body], f
    assert (out / "saved_model.pb").is_file() and (out / "model.tflite").is_file()
    assert any(name.startswith("logs") for name in result.left_out) and not (out / "logs").exists()
    meta = json.loads((out / "tlcli.json").read_text())
    assert meta["data"]["train_dir"] is None and meta["config"]["data_dir"] == ""
    assert meta["config"]["out"] == "" and meta["config"]["cache_dir"] is None
    assert meta["backbone"]["handle"] == tiny_backbone.name and meta["training"]["tensorboard"] is None
    assert list(meta["exports"]) == ["model.tflite"] and meta["exports"]["model.tflite"]["path"] == "model.tflite"
    assert meta["skipped"][0]["path"] == "DIR/red/notes.txt"


def test_the_shared_copy_keeps_the_format_and_every_key(trained, shared):
    from tlcli.bundle import load

    original = json.loads((trained[1] / "tlcli.json").read_text())
    meta = json.loads((shared[1] / "tlcli.json").read_text())
    assert meta["format_version"] == original["format_version"] == 1
    assert set(meta) == set(original)
    for section in ("config", "data", "backbone", "training", "metrics"):
        assert set(meta[section]) == set(original[section]), section
    b = load(shared[1])
    assert b.labels == ["blue", "green", "red"] and b.meta.metrics.val_accuracy == original["metrics"]["val_accuracy"]


def test_the_shared_copy_predicts_as_the_original(trained, shared, colour_data):
    import tlcli

    images = sorted(str(p) for p in colour_data.rglob("*.png"))[:6]
    for engine in ("tflite", "tf"):
        mine = tlcli.predict(images, model_dir=trained[1], engine=engine)
        theirs = tlcli.predict(images, model_dir=shared[1], engine=engine)
        assert [p.predictions for p in theirs] == [p.predictions for p in mine]


def test_export_finds_the_recorded_splits_under_data(trained, shared, colour_data, tmp_path, monkeypatch):
    import tlcli

    splits = json.loads((shared[1] / "splits.json").read_text())
    original = json.loads((trained[1] / "splits.json").read_text())
    assert [p for p, _ in splits["val"]] == [str(Path(p).relative_to(colour_data)) for p, _ in original["val"]]
    copy = tmp_path / "colours"
    shutil.copytree(shared[1], copy)
    r = tlcli.export_tflite(copy, output=tmp_path / "a.tflite", data_dir=str(colour_data))
    assert r.parity_images == len(splits["val"]) and r.agreement == 1.0
    assert r.parity_data == f"validation images recorded in splits.json, found in {colour_data}"
    monkeypatch.chdir(colour_data)  # relative paths are never looked up from the current folder
    r = tlcli.export_tflite(copy, output=tmp_path / "b.tflite")
    assert r.parity_images == 0


def test_share_refuses_an_out_inside_the_bundle_and_an_existing_one(trained, shared, tmp_path):
    bundle = trained[1]
    r = run("share", "--model", bundle, "--out", bundle / "inside")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "--out" in r.output and "choose another --out, outside it" in r.output
    r = run("share", "--model", bundle, "--out", shared[1])
    assert r.exit_code != 0 and "already exists" in r.output and r.output.count("\n") == 1
    r = run("share", "--model", bundle, "--out", tmp_path / "again", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["path"] == str((tmp_path / "again").absolute())
