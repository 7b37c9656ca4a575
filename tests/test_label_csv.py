"""Labels from a CSV (`tlcli train labels.csv`): the same photos as folders or as a CSV give the
same model, a bad row is skipped naming its line, and a malformed file is one line naming it."""

import json
import shutil
from pathlib import Path

import pytest

import tlcli
from tests.helpers import make_colour_dataset, run_cli
from tlcli import data
from tlcli.errors import DatasetError


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _listing(root: Path) -> list[str]:
    return [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.rglob("*.*")) if p.suffix != ".csv"]


def test_the_same_photos_as_folders_or_as_a_csv_give_the_same_model(tmp_path, train_args):
    root = make_colour_dataset(tmp_path / "images", per_class=6)
    rows = _listing(root)
    csv = _csv(root / "labels.csv", ["path,label", *reversed(rows)])  # row order does not matter
    options = dict(cache_dir=str(tmp_path / "cache"), extractor="tf", **train_args)
    folders = tlcli.train(root, out=str(tmp_path / "folders"), **options)
    listed = tlcli.train(csv, out=str(tmp_path / "csv"), **options)
    assert listed.labels == folders.labels == ["blue", "green", "red"]
    assert (listed.val_accuracy, listed.val_loss, listed.train_counts) == \
        (folders.val_accuracy, folders.val_loss, folders.train_counts)
    a = tlcli.predict([root], model_dir=tmp_path / "folders", engine="tf", top_k=3)
    b = tlcli.predict([root], model_dir=tmp_path / "csv", engine="tf", top_k=3)
    assert [p.predictions for p in a] == [p.predictions for p in b]
    splits = [json.loads((tmp_path / name / "splits.json").read_text()) for name in ("folders", "csv")]
    assert splits[0] == splits[1]


def test_a_row_whose_file_is_unusable_is_skipped_naming_its_line(tmp_path):
    root = make_colour_dataset(tmp_path / "images", per_class=3, colours={"a": (200, 0, 0), "b": (0, 0, 200)})
    (root / "a" / "junk.jpg").write_text("not an image")
    csv = _csv(root / "labels.csv", ["path,label", *_listing(root)])
    line = 1 + 1 + _listing(root).index("a/junk.jpg,a")
    folder = data.scan(csv, image_size=8)
    assert [(Path(s.path).name, s.reason, s.detail) for s in folder.skipped] == \
        [("junk.jpg", "not an image", f"CSV line {line}: text")]
    assert folder.labels == ["a", "b"] and folder.counts() == {"a": 3, "b": 3}


@pytest.mark.parametrize("lines, message", [
    (["file,label", "a/x.png,a"], r"line 1: the header must be path,label or path,labels \(and optionally split\), not "
                                   r"file,label"),
    (["path,label", 'a/x.png,"a'], r"line 2: not valid CSV"),
    (["path,label", "a/x.png,"], r"line 2: the label .* is empty"),
    (["path,label", "a/x.png,a", "b/y.png,b", "a/x.png,b"], r"line 4: .*x.png is also on line 2 with another label"),
    (["path,label,split", "a/x.png,a,training"], r"line 2: split 'training' is none of train, val, test"),
    (["path,label", "a/x.png,a,extra"], r"line 2: 3 field\(s\) where the header has 2"),
    (["path,label"], r"no rows below the header"),
])
def test_a_malformed_csv_is_one_line_naming_the_line(tmp_path, lines, message):
    csv = _csv(tmp_path / "labels.csv", lines)
    with pytest.raises(DatasetError, match=message) as err:
        data.scan(csv, image_size=8)
    assert str(err.value).startswith(f"DIR {csv}: ") and "\n" not in str(err.value)


def test_a_split_column_gives_the_splits_and_a_test_report(tmp_path, train_args):
    root = make_colour_dataset(tmp_path / "images", per_class=6)
    rows = [f"{r},{'val' if i % 6 == 0 else 'test' if i % 6 == 1 else 'train'}" for i, r in enumerate(_listing(root))]
    csv = _csv(tmp_path / "labels.csv", ["path,label,split", *[f"images/{r}" for r in rows]])
    r = tlcli.train(csv, out=str(tmp_path / "m"), cache_dir=str(tmp_path / "cache"), extractor="tf", **train_args)
    assert r.val_counts == {"blue": 1, "green": 1, "red": 1} and r.test_counts == {"blue": 1, "green": 1, "red": 1}
    assert r.train_counts == {"blue": 4, "green": 4, "red": 4} and r.test_accuracy is not None


def test_evaluate_and_the_cli_take_a_csv(tmp_path, trained_bundle, colour_data):
    root = tmp_path / "copy"
    shutil.copytree(colour_data, root)
    csv = _csv(tmp_path / "eval.csv", ["path,label", *[f"copy/{r}" for r in _listing(root)]])
    ev = tlcli.evaluate(csv, model_dir=trained_bundle, engine="tf")
    assert ev.report.count == sum(1 for _ in root.rglob("*.*")) and ev.report.accuracy == 1.0
    cli = run_cli("evaluate", csv, "--model", trained_bundle, "--engine", "tf", "--json")
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["report"]["count"] == ev.report.count


def test_audit_takes_a_csv(tmp_path, train_args):
    root = make_colour_dataset(tmp_path / "images", per_class=6)
    csv = _csv(root / "labels.csv", ["path,label", *_listing(root)])
    a = tlcli.audit(csv, backbone=train_args["backbone"], image_size=32, cache_dir=tmp_path / "cache",
                    batch_size=8, extractor="tf")
    assert a.labels == ["blue", "green", "red"] and sum(a.class_counts["train"].values()) + \
        sum(a.class_counts["val"].values()) == 18
