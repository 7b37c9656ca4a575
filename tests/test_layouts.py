"""Dataset layouts besides one folder per class: DIR/{train,val,test}/<class>/ read as the splits,
and class folders one level too deep refused in one line."""

import shutil

import pytest

from tests.helpers import make_colour_dataset
from tlcli import data
from tlcli.config import TrainConfig
from tlcli.errors import DatasetError, UsageError

TWO = {"blue": (20, 40, 220), "red": (220, 30, 30)}


def split_dataset(root, names=("train", "val", "test"), per_class=(6, 3, 2)):
    for name, n in zip(names, per_class):
        make_colour_dataset(root / name, per_class=n, colours=TWO, start=100 * len(name))
    return root


def scanned(root, **options):
    events = []
    splits = data.scan_splits(TrainConfig(data_dir=str(root), **options), image_size=8, progress=events.append)
    return splits, events


def test_split_folders_are_the_splits_said_in_one_line(tmp_path):
    root = split_dataset(tmp_path / "hymenoptera_data")
    splits, events = scanned(root)
    assert splits.labels == ["blue", "red"]
    assert splits.counts(splits.train) == {"blue": 6, "red": 6}
    assert splits.counts(splits.val) == {"blue": 3, "red": 3}
    assert splits.counts(splits.test) == {"blue": 2, "red": 2}
    assert all("/train/" in s.path for s in splits.train) and all("/val/" in s.path for s in splits.val)
    assert all("/test/" in s.path for s in splits.test)
    infos = [e.message for e in events if e.kind == "info"]
    assert infos == [f"DIR {root}: split folders found; using train/ for training, val/ for validation, "
                     "test/ for a final test report"]
    counts = next(e for e in events if e.kind == "counts")
    assert counts.test == {"blue": 2, "red": 2}
    assert splits.recorded().keys() == {"train", "val"}  # splits.json keeps its two keys


def test_valid_and_validation_and_any_case_name_the_validation_folder(tmp_path):
    for name in ("valid", "Validation"):
        root = split_dataset(tmp_path / name, names=("Train", name))
        splits, _ = scanned(root)
        assert splits.labels == ["blue", "red"] and len(splits.val) == 6 and splits.test == []
        assert splits.layout.val.name == name


def test_train_and_test_only_split_train_for_validation(tmp_path):
    root = split_dataset(tmp_path / "ds", names=("train", "test"), per_class=(10, 2))
    splits, _ = scanned(root, val_split=0.2)
    assert len(splits.train) == 16 and len(splits.val) == 4 and len(splits.test) == 4
    assert {s.path for s in splits.val} <= {str(p) for p in (root / "train").rglob("*.*")}


def test_two_validation_folders_are_refused(tmp_path):
    root = split_dataset(tmp_path / "ds", names=("train", "val", "validation"), per_class=(4, 2, 2))
    with pytest.raises(DatasetError, match=r"holds val/ and validation/, two val folders; keep one"):
        scanned(root)


def test_val_dir_beside_a_validation_folder_is_refused_in_one_line(tmp_path):
    root = split_dataset(tmp_path / "ds")
    other = make_colour_dataset(tmp_path / "other", per_class=2, colours=TWO)
    with pytest.raises(UsageError) as err:
        scanned(root, val_dir=str(other))
    message = str(err.value)
    assert message.startswith(f"--val-dir {other}: DIR {root} has its own validation folder {root / 'val'}")
    assert f"give {root / 'train'} as DIR" in message and "\n" not in message


def test_val_dir_serves_a_layout_without_a_validation_folder(tmp_path):
    root = split_dataset(tmp_path / "ds", names=("train", "test"), per_class=(4, 2))
    other = make_colour_dataset(tmp_path / "other", per_class=3, colours=TWO, start=50)
    splits, _ = scanned(root, val_dir=str(other))
    assert len(splits.val) == 6 and all(s.path.startswith(str(other)) for s in splits.val)
    assert len(splits.test) == 4


def test_a_test_image_copied_from_train_is_warned_about(tmp_path):
    root = split_dataset(tmp_path / "ds")
    src = sorted((root / "train" / "red").iterdir())[0]
    shutil.copy(src, root / "test" / "red" / "copied.png")
    splits, _ = scanned(root)
    assert [w for w in splits.warnings if "test images are also training images" in w] == [
        f"1 of the 5 test images are also training images (same content): DIR {root / 'test'} overlaps DIR "
        f"{root / 'train'}, so the test accuracy overstates how the model does on new images; remove the copies"]


def test_class_folders_one_level_too_deep_are_refused_naming_the_layout(tmp_path):
    root = split_dataset(tmp_path / "ds", names=("train", "val", "extra"), per_class=(4, 2, 2))
    with pytest.raises(DatasetError) as err:
        scanned(root)
    message = str(err.value)
    assert message.startswith(f"DIR {root}: the folders extra/, train/, val/ hold only folders (blue, red): those "
                              "are the classes, one level down, not extra, train, val; give one of them as DIR, "
                              f"such as {root / 'train'}")
    assert "train/, val/ (or valid/, validation/) and test/" in message and "\n" not in message


def test_evaluating_a_dataset_root_is_refused_too(tmp_path):
    root = split_dataset(tmp_path / "ds", names=("train", "val"), per_class=(2, 2))
    with pytest.raises(DatasetError, match=r"--data .*hold only folders \(blue, red\).*give one of them as --data"):
        data.scan(root, image_size=8, labels=["blue", "red"], option="--data")


def test_a_class_stored_in_one_subfolder_each_is_still_a_class(tmp_path):
    root = tmp_path / "ds"
    for label in TWO:
        make_colour_dataset(root / label, per_class=3, colours={"images": TWO[label]})
    folder = data.scan(root, image_size=8)
    assert folder.labels == ["blue", "red"] and folder.counts() == {"blue": 3, "red": 3}


def test_a_train_folder_of_images_is_a_class_not_a_split(tmp_path):
    root = make_colour_dataset(tmp_path / "ds", per_class=3, colours={"train": (1, 2, 3), "val": (200, 0, 0)})
    splits, events = scanned(root)
    assert splits.labels == ["train", "val"] and splits.layout is None
    assert not [e for e in events if e.kind == "info"]


def test_train_on_a_dataset_root_trains_its_classes_and_reports_on_test(tmp_path, train_args):
    import tlcli
    from tests.helpers import run_cli
    from tlcli import bundle

    root = tmp_path / "hymenoptera_data"
    for name, n in (("train", 8), ("val", 3), ("test", 3)):
        make_colour_dataset(root / name, per_class=n, start=100 * len(name))
    events = []
    r = tlcli.train(root, out=str(tmp_path / "model"), progress=events.append, **train_args)
    assert r.labels == ["blue", "green", "red"]
    assert r.train_counts == {"blue": 8, "green": 8, "red": 8} and r.val_counts == {"blue": 3, "green": 3, "red": 3}
    assert r.test_counts == {"blue": 3, "green": 3, "red": 3} and r.test_accuracy == 1.0
    assert f"DIR {root}: split folders found" in [e.message for e in events if e.kind == "info"][0]
    meta = bundle.load(tmp_path / "model").meta
    assert meta.labels == ["blue", "green", "red"] and meta.metrics.test_accuracy == 1.0
    assert meta.metrics.test["count"] == 9 and meta.data.test_dir == str((root / "test").absolute())
    assert meta.data.train_dir == str((root / "train").absolute()) and meta.data.val_dir == str(root / "val")

    result = run_cli("train", root, "--out", tmp_path / "cli-model", *[f"--{k.replace('_', '-')}={v}" for k, v in
                                                                      dict(train_args, tensorboard="none").items()])
    assert result.exit_code == 0, result.output
    assert f"DIR {root}: split folders found; using train/ for training, val/ for validation, test/ for a " \
           "final test report" in result.output
    words = " ".join(result.output.replace("│", " ").split())
    assert "test accuracy 100.0% on 9 test images (the final report)" in words
    assert "┃ class ┃ train ┃ val ┃ test ┃" in result.output


def test_evaluate_on_a_dataset_root_is_one_line_naming_the_folder_to_give(tmp_path, trained_bundle):
    from tests.helpers import run_cli

    root = tmp_path / "ds"
    for name in ("train", "val"):
        make_colour_dataset(root / name, per_class=2)
    result = run_cli("evaluate", root, "--model", trained_bundle)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (
        f"error: DIR {root}: the folders train/, val/ hold only folders (blue, green, red): those are the classes, "
        f"one level down, not train, val; give one of them as DIR, such as {root / 'val'}")


def test_classes_in_shared_subfolders_are_refused_with_the_fix_for_each_reading(tmp_path):
    root = tmp_path / "ds"
    for label in TWO:
        for part in ("day", "night"):
            make_colour_dataset(root / label, per_class=2, colours={part: TWO[label]})
    with pytest.raises(DatasetError) as err:
        data.scan(root, image_size=8)
    assert str(err.value) == (f"DIR {root}: the folders blue/, red/ hold only the folders day, night, so the classes "
                              "are ambiguous; if day, night are the classes, give one of blue/, red/ as DIR; if blue, "
                              "red are, move each one's images out of its sub-folders")
