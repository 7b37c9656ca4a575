"""The bundle owns its format: BundleMeta (the schema of tlcli.json), save / load / record_export,
bundles written by earlier releases, and the one atomic writer every file goes through."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli
from tlcli import bundle, files
from tlcli.bundle.format import BundleMeta
from tlcli.errors import BundleError, TlcliError

RELEASE_0_1_0 = Path(__file__).parent / "data" / "bundle-0.1.0"  # tlcli.json etc. as 0.1.0 wrote them


@pytest.fixture
def old_bundle(tmp_path):
    """The metadata of a bundle trained and exported once by release 0.1.0 (no SavedModel:
    ``load`` reads only the metadata)."""
    return Path(shutil.copytree(RELEASE_0_1_0, tmp_path / "model"))


def edit_meta(model: Path, change) -> dict:
    meta = json.loads((model / "tlcli.json").read_text())
    change(meta)
    (model / "tlcli.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only, and refuse to create files in it the way the OS then does (chmod
    does not stop root, who runs the tests in some containers). Restored after the test."""
    folders = []

    def make(folder: Path):
        folders.append(folder)
        folder.chmod(0o555)
        real_open = os.open

        def open_(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and Path(path).parent == folder:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_a_bundle_written_by_release_0_1_0_loads_with_every_field(old_bundle):
    b = bundle.load(old_bundle)
    assert b.labels == ["blue", "green", "red"] and b.image_size == 32 and b.max_pixels == 128_000_000
    assert isinstance(b.meta, BundleMeta) and b.meta.format_version == 1 and b.meta.tlcli_version == "0.1.0"
    assert b.meta.backbone.feature_dim == 11 and b.meta.backbone.preset is None
    assert b.meta.data.train_counts == {"blue": 6, "green": 6, "red": 6}
    assert b.meta.metrics.val_accuracy == 1.0 and b.meta.metrics.val["count"] == 6
    assert b.meta.training.head_epochs == 33 and len(b.meta.training.history["head"]) == 60
    assert b.meta.exports["model.tflite"]["agreement"] == 1.0
    assert b.meta.input["shape"] == [None, 32, 32, 3] and "serving_bytes" in b.meta.signatures
    assert len(b.splits()["train"]) == 18 and len(b.splits()["val"]) == 6
    # Written back, the file is what the release wrote, key for key and in the same order.
    written = json.loads((RELEASE_0_1_0 / "tlcli.json").read_text())
    assert b.meta.to_dict() == written and list(b.meta.to_dict()) == list(written)


def test_keys_this_tlcli_does_not_know_are_kept_at_every_level(old_bundle):
    def add(meta):
        meta["provenance"] = {"by": "a newer tlcli"}
        meta["backbone"]["license"] = "apache-2.0"
        meta["training"]["energy_kwh"] = 0.1
        meta["config"]["future_option"] = 3

    edit_meta(old_bundle, add)
    b = bundle.load(old_bundle)
    assert b.meta.extra == {"provenance": {"by": "a newer tlcli"}}
    assert b.meta.backbone.extra == {"license": "apache-2.0"}
    assert bundle.record_export(b, "other.tflite", {"quantize": "none"}) is None
    again = json.loads((old_bundle / "tlcli.json").read_text())
    assert again["provenance"] == {"by": "a newer tlcli"} and again["backbone"]["license"] == "apache-2.0"
    assert again["training"]["energy_kwh"] == 0.1 and again["config"]["future_option"] == 3
    assert set(again["exports"]) == {"model.tflite", "other.tflite"}


def test_a_key_missing_from_an_older_file_takes_its_default(tmp_path):
    (tmp_path / "tlcli.json").write_text(json.dumps({"labels": ["cat", "dog"], "image_size": 224}))
    b = bundle.load(tmp_path)
    assert b.labels == ["cat", "dog"] and b.splits() == {"train": [], "val": []}
    assert b.meta.format_version == 0 and b.meta.tlcli_version is None and b.meta.python_version is None
    assert b.meta.backbone.handle is None and b.meta.exports == {} and b.meta.signatures == {}


@pytest.mark.parametrize("change, field", [
    (lambda m: m["backbone"].update(feature_dim="eleven"), '"backbone"."feature_dim" must be int | None'),
    (lambda m: m.update(training=[1, 2]), '"training" must be an object'),
    (lambda m: m["metrics"].update(val_accuracy="high"), '"metrics"."val_accuracy" must be float | None'),
    (lambda m: m.update(mirror_average="yes"), '"mirror_average" must be bool'),
    (lambda m: m.update(skipped={}), '"skipped" must be list[dict]'),
    (lambda m: m["data"].update(train_counts=[6, 6, 6]), '"data"."train_counts" must be dict'),
])
def test_a_field_of_the_wrong_type_is_one_line_naming_it(old_bundle, change, field):
    edit_meta(old_bundle, change)
    with pytest.raises(BundleError) as info:
        bundle.load(old_bundle)
    message = str(info.value)
    assert "\n" not in message and field in message
    assert message.startswith(f"{old_bundle / 'tlcli.json'}: corrupt bundle metadata") and "retrain" in message


def test_a_newer_format_names_the_release_to_use_and_no_package_index(old_bundle):
    edit_meta(old_bundle, lambda m: m.update(format_version=bundle.FORMAT_VERSION + 1, tlcli_version="9.0"))
    with pytest.raises(BundleError, match="made by a newer tlcli") as info:
        bundle.load(old_bundle)
    assert "pip install" not in str(info.value) and "release or checkout" in str(info.value)
    with pytest.raises(BundleError, match="newer tlcli"):
        BundleMeta.from_dict(json.loads((old_bundle / "tlcli.json").read_text()))


def test_save_writes_what_load_reads_back(tmp_path):
    meta = BundleMeta(labels=["cat", "dog", "owl"], image_size=64, input=bundle.input_spec(64),
                      backbone=bundle.BackboneMeta(handle="https://example/hub", feature_dim=5),
                      config={"max_pixels": 1000, "seed": 3},
                      training=bundle.TrainingMeta(head_epochs=7, history={"head": [{"epoch": 1, "loss": 0.5}]}))
    splits = {"train": [["/data/cat/1.jpg", 0], ["/data/owl/1.jpg", 2]], "val": [["/data/dog/1.jpg", 1]]}
    bundle.save(tmp_path, meta, splits=splits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "splits.json", "tlcli.json"]
    assert (tmp_path / "labels.txt").read_text() == "cat\ndog\nowl\n"
    b = bundle.load(tmp_path)
    assert b.meta == meta and b.splits() == splits and b.max_pixels == 1000
    assert b.meta.format_version == bundle.FORMAT_VERSION and b.meta.tlcli_version and b.meta.python_version


def test_record_export_keeps_an_export_recorded_since_the_bundle_was_loaded(old_bundle):
    first, second = bundle.load(old_bundle), bundle.load(old_bundle)
    assert bundle.record_export(first, "a.tflite", {"quantize": "float16"}) is None
    assert bundle.record_export(second, "/elsewhere/b.tflite", {"quantize": "int8"}) is None
    exports = bundle.load(old_bundle).meta.exports
    assert set(exports) == {"model.tflite", "a.tflite", "/elsewhere/b.tflite"}
    assert second.meta.exports["/elsewhere/b.tflite"] == {"quantize": "int8"}


def test_record_export_reports_a_read_only_bundle_and_changes_nothing(old_bundle, read_only):
    before = (old_bundle / "tlcli.json").read_bytes()
    read_only(old_bundle)
    warning = bundle.record_export(bundle.load(old_bundle), "/elsewhere/m.tflite", {"quantize": "none"})
    assert warning and "not recorded" in warning and "Permission denied" in warning
    assert str(old_bundle / "tlcli.json") in warning and "\n" not in warning
    assert (old_bundle / "tlcli.json").read_bytes() == before
    assert sorted(p.name for p in old_bundle.iterdir()) == ["labels.txt", "splits.json", "tlcli.json"]


def test_exporting_a_read_only_bundle_elsewhere_succeeds_and_warns_why_it_is_not_recorded(
        bundle_copy, tmp_path, read_only):
    before = (bundle_copy / "tlcli.json").read_bytes()
    read_only(bundle_copy)
    out = tmp_path / "elsewhere"
    out.mkdir()
    result = run_cli("export", "--tflite", "--model", bundle_copy, "--output", out / "m.tflite")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "not recorded" in result.stderr and "Permission denied" in result.stderr
    assert "top-1 agreement" in result.stdout
    as_json = run_cli("export", "--tflite", "--model", bundle_copy, "--output", out / "m.tflite", "--json", "--force")
    assert as_json.exit_code == 0, as_json.output
    warnings = json.loads(as_json.stdout)["warnings"]
    assert len(warnings) == 1 and "Permission denied" in warnings[0]
    assert (out / "m.tflite").stat().st_size > 0 and not (out / "m.labels.txt").exists()
    assert (bundle_copy / "tlcli.json").read_bytes() == before


def test_an_export_that_is_recorded_has_no_warning(bundle_copy, tmp_path):
    import tlcli

    result = tlcli.export_tflite(bundle_copy, output=tmp_path / "m.tflite")
    assert result.warnings == []
    entry = bundle.load(bundle_copy).meta.exports[str(tmp_path / "m.tflite")]
    assert entry["agreement"] == result.agreement and "warnings" not in entry


def fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def test_the_atomic_writer_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "tlcli.json"
    files.write_atomic(target, b"old")
    assert target.read_bytes() == b"old" and target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        files.write_atomic(target, b"new")
    with pytest.raises(TlcliError, match=r"tlcli.json: cannot write \(No space left on device\); free some"):
        files.write_json(target, {"a": 1})
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["tlcli.json"]


def test_mistakes_csv_and_cache_entries_are_written_atomically(tmp_path, monkeypatch):
    from tlcli import metrics
    from tlcli.features import store as feature_store
    from tlcli.insight import evaluation

    mistake = metrics.Mistake(path="a.jpg", true_label="cat", predicted_label="dog", probability=0.9)
    csv_path = evaluation.write_mistakes([mistake], tmp_path / "mistakes.csv")
    assert csv_path.read_text().splitlines() == ["path,true_label,predicted_label,probability",
                                                 "a.jpg,cat,dog,0.900000"]
    cache = feature_store.model_store(tmp_path / "cache", "m", dim=3)
    cache.put("ab" * 16, np.ones(3, np.float32))
    cache.flush()
    fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        evaluation.write_mistakes([], csv_path)
    cache.put("ab" * 16, np.zeros(3, np.float32))  # a failing disk must not stop training
    cache.put("cd" * 16, np.zeros(3, np.float32))
    cache.flush()
    assert csv_path.read_text().count("\n") == 2, "the previous report was damaged"
    reread = feature_store.model_store(tmp_path / "cache", "m", dim=3)
    np.testing.assert_array_equal(reread.get("ab" * 16), np.ones(3, np.float32))
    assert reread.get("cd" * 16) is None
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
