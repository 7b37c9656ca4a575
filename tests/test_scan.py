"""Scanning a dataset folder: hidden files, symlinks, bad files, strict mode, dataset errors,
the split, and a training run on a folder that mixes good and bad files."""

import json
import os
import shutil
import struct
import zlib

import pytest
from PIL import Image
from typer.testing import CliRunner

from tlcli import data
from tlcli.data import image_files, images
from tlcli.errors import DatasetError

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def good(path, colour=(200, 50, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def make_classes(root, per_class=5, classes=("cats", "dogs")):
    for c in classes:
        for i in range(per_class):
            good(root / c / f"{c}_{i}.png")
    return root


def truncated_jpeg(path):
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-400])
    return path


def pixel_bomb(path):
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def add_bad_files(class_dir):
    """One of each kind of unusable file; returns {path: reason}. Also hidden junk to be ignored."""
    class_dir.mkdir(parents=True, exist_ok=True)
    (class_dir / "empty.jpg").write_bytes(b"")
    (class_dir / "letter.jpg").write_text("Dear Sir,\n")
    truncated_jpeg(class_dir / "download.jpg")
    pixel_bomb(class_dir / "bomb.png")
    os.symlink(class_dir / "moved-away.jpg", class_dir / "broken-link.jpg")
    (class_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(512))
    (class_dir / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (class_dir / ".thumbnails").mkdir()
    (class_dir / ".thumbnails" / "t.jpg").write_text("not an image")
    return {str(class_dir / "empty.jpg"): image_files.ZERO_BYTES,
            str(class_dir / "letter.jpg"): image_files.NOT_AN_IMAGE,
            str(class_dir / "download.jpg"): image_files.TRUNCATED,
            str(class_dir / "bomb.png"): image_files.OVER_PIXEL_LIMIT,
            str(class_dir / "broken-link.jpg"): image_files.BROKEN_SYMLINK}


def scan(root, **kw):
    return data.scan(root, image_size=16, **kw)


def one_line_error(root, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        scan(root, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- files -------------------------------------------------------------------------------------

def test_scan_keeps_good_files_and_skips_bad_ones_with_their_reason(tmp_path):
    root = make_classes(tmp_path / "ds")
    bad = add_bad_files(root / "dogs")
    folder = scan(root)
    assert folder.labels == ["cats", "dogs"]
    assert folder.counts() == {"cats": 5, "dogs": 5}
    assert {s.path: s.reason for s in folder.skipped} == bad
    assert all(".DS_Store" not in s.path and "._" not in s.path and ".thumbnails" not in s.path
               for s in folder.samples + folder.skipped)
    assert folder.warnings == []


def test_digest_is_the_content_hash(tmp_path):
    root = make_classes(tmp_path / "ds", per_class=2)
    shutil.copy(root / "cats" / "cats_0.png", root / "dogs" / "copy.png")
    Image.new("RGB", (12, 10), (1, 2, 3)).save(root / "dogs" / "other.png")
    digests = {os.path.basename(s.path): s.digest for s in scan(root).samples}
    assert digests["copy.png"] == digests["cats_0.png"] != digests["other.png"]


def test_symlink_loops_neither_hang_nor_duplicate(tmp_path):
    root = make_classes(tmp_path / "ds", per_class=3)
    os.symlink(root / "cats", root / "cats" / "again")  # a folder linking to itself
    os.symlink(root, root / "dogs" / "up")               # back to the dataset root: every class again
    os.symlink(tmp_path, root / "dogs" / "way-up")        # to a folder above the dataset
    os.symlink(root / "cats" / "cats_0.png", root / "dogs" / "stolen.png")  # a cat file, linked
    folder = scan(root)
    paths = sorted(os.path.relpath(s.path, root) for s in folder.samples)
    assert paths == [f"cats/cats_{i}.png" for i in range(3)] + [f"dogs/dogs_{i}.png" for i in range(3)]
    assert folder.skipped == []


def test_symlinked_folders_outside_the_dataset_are_followed_once(tmp_path):
    root = make_classes(tmp_path / "ds", per_class=2)
    extra = tmp_path / "elsewhere" / "more-cats"
    good(extra / "x.png")
    os.symlink(extra, root / "cats" / "linked")
    os.symlink(extra, root / "cats" / "linked-twice")
    os.symlink(extra.parent, extra / "loop")  # a loop outside the dataset
    folder = scan(root)
    assert folder.counts() == {"cats": 3, "dogs": 2}
    assert str(root / "cats" / "linked" / "x.png") in [s.path for s in folder.samples]


def test_a_class_folder_may_itself_be_a_symlink(tmp_path):
    root = make_classes(tmp_path / "ds", per_class=2, classes=("cats",))
    for i in range(2):
        good(tmp_path / "store" / f"d{i}.png")
    os.symlink(tmp_path / "store", root / "dogs")
    assert scan(root).counts() == {"cats": 2, "dogs": 2}


def test_files_directly_in_dir_beside_class_folders_are_listed_as_skipped(tmp_path):
    root = make_classes(tmp_path / "ds")
    good(root / "stray.png")
    folder = scan(root)
    assert [(s.path, s.reason) for s in folder.skipped] == [(str(root / "stray.png"), data.NOT_IN_CLASS_FOLDER)]
    scan(root, strict=True)  # not an unusable image: strict still trains


def test_strict_names_every_bad_file_in_one_error(tmp_path):
    root = make_classes(tmp_path / "ds")
    bad = add_bad_files(root / "cats") | add_bad_files(root / "dogs")
    message = one_line_error(root, strict=True)
    assert "--strict" in message and f"{len(bad)} unusable file(s)" in message
    for path, reason in bad.items():
        assert f"{path} ({reason})" in message


def test_progress_reports_every_file(tmp_path):
    root = make_classes(tmp_path / "ds", per_class=3)
    calls = []
    scan(root, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


def test_max_pixels_is_applied_by_the_scan(tmp_path):
    root = make_classes(tmp_path / "ds")
    Image.new("RGB", (100, 100)).save(root / "cats" / "large.png")
    folder = scan(root, max_pixels=5000)
    assert [(os.path.basename(s.path), s.reason) for s in folder.skipped] == [
        ("large.png", image_files.OVER_PIXEL_LIMIT)]


# ---- dataset errors ----------------------------------------------------------------------------

def test_missing_dir(tmp_path):
    message = one_line_error(tmp_path / "nope")
    assert message.startswith(f"DIR {tmp_path / 'nope'}: no such directory")


def test_dir_that_is_a_file(tmp_path):
    (tmp_path / "f.zip").write_bytes(b"PK")
    assert "not a directory" in one_line_error(tmp_path / "f.zip")


def test_no_class_folders(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / ".DS_Store").write_bytes(b"Bud1")
    message = one_line_error(tmp_path / "ds")
    assert str(tmp_path / "ds") in message and "no class folders" in message and "subfolder per class" in message


def test_images_directly_in_dir(tmp_path):
    for i in range(3):
        good(tmp_path / "ds" / f"img{i}.png")
    message = one_line_error(tmp_path / "ds")
    assert str(tmp_path / "ds") in message
    assert "3 file(s) sit directly in this folder" in message and "move the images into one subfolder" in message


def test_only_one_class(tmp_path):
    root = make_classes(tmp_path / "ds", classes=("cats",))
    message = one_line_error(root)
    assert str(root) in message and "only one class folder (cats)" in message and "at least two" in message


def test_class_without_a_usable_image(tmp_path):
    root = make_classes(tmp_path / "ds", classes=("cats",))
    add_bad_files(root / "dogs")
    message = one_line_error(root)
    assert message.startswith(f"DIR {root / 'dogs'}: no usable image in this class folder")
    assert "5 unusable file(s)" in message and "add images or remove the folder" in message
    (root / "birds").mkdir()
    shutil.rmtree(root / "dogs")
    assert "birds: no usable image in this class folder (it is empty)" in one_line_error(root)


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    root = make_classes(tmp_path / "ds")
    locked = root / "dogs" / "private"
    good(locked / "x.png")
    real_scandir = os.scandir

    def scandir(path):  # chmod does not stop root, so refuse the way the OS would
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    message = one_line_error(root)
    assert message.startswith(f"{locked}: cannot read this folder (Permission denied)")
    assert "permissions" in message


def test_few_images_in_a_class_give_a_warning(tmp_path):
    root = make_classes(tmp_path / "ds", per_class=5)
    for i in range(3, 5):
        os.remove(root / "dogs" / f"dogs_{i}.png")
    folder = scan(root)
    assert folder.warnings == ["class 'dogs' has only 3 image(s); add more for a reliable model"]


def test_validation_folder_must_use_the_model_labels(tmp_path):
    root = make_classes(tmp_path / "val", classes=("cats", "dogs", "owls"))
    message = one_line_error(root, labels=["cats", "dogs"], option="--val-dir")
    assert message.startswith(f"--val-dir {root}: class folder(s) owls are not labels")
    shutil.rmtree(root / "owls")
    shutil.rmtree(root / "dogs")
    folder = scan(root, labels=["cats", "dogs"], option="--val-dir")
    assert folder.labels == ["cats", "dogs"] and folder.counts() == {"cats": 5, "dogs": 0}
    assert folder.warnings == [f"label 'dogs' has no folder in {root}"]


# ---- split -------------------------------------------------------------------------------------

def samples(counts):
    return [data.Sample(f"c{label}/{i:02d}.png", label, f"{label}-{i}")
            for label, n in enumerate(counts) for i in range(n)]


def test_split_is_stratified_complete_and_deterministic():
    items = samples([10, 5, 2, 1])
    rest, held = data.split(items, 0.2, seed=3)
    assert sorted(rest + held, key=lambda s: s.path) == sorted(items, key=lambda s: s.path)
    held_per_class = [sum(s.label == c for s in held) for c in range(4)]
    assert held_per_class == [2, 1, 1, 0]  # rounded share, >= 1 when a class has 2, never its last
    assert data.split(list(reversed(items)), 0.2, seed=3) == (rest, held)  # input order is irrelevant
    assert data.split(items, 0.0, seed=3) == (items, [])


def test_split_depends_on_the_seed():
    items = samples([40, 40])
    helds = {tuple(s.path for s in data.split(items, 0.25, seed=seed)[1]) for seed in range(5)}
    assert len(helds) == 5


# ---- training on a messy folder ---------------------------------------------------------------

def messy_copy(colour_data, dst):
    shutil.copytree(colour_data, dst, symlinks=True)
    bad = add_bad_files(dst / "red")
    (dst / "green" / "report.jpg").write_bytes(b"PK\x03\x04" + bytes(100))  # a renamed .docx
    bad[str(dst / "green" / "report.jpg")] = image_files.NOT_AN_IMAGE
    (dst / "blue" / "[raw]").mkdir()  # brackets: Rich markup must not eat them in messages
    (dst / "blue" / "[raw]" / "IMG_1.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    bad[str(dst / "blue" / "[raw]" / "IMG_1.jpg")] = image_files.TRUNCATED
    (dst / ".DS_Store").write_bytes(b"Bud1")
    return bad


def test_training_on_a_messy_folder_succeeds_and_records_exactly_the_bad_files(tmp_path, colour_data,
                                                                                train_args):
    import tlcli

    root = tmp_path / "images"
    bad = messy_copy(colour_data, root)
    result = tlcli.train(root, out=str(tmp_path / "model"), cache_dir=str(tmp_path / "cache"), **train_args)
    meta = json.loads((tmp_path / "model" / "tlcli.json").read_text())
    assert {s["path"]: s["reason"] for s in meta["skipped"]} == bad
    details = {os.path.basename(s["path"]): s["detail"] for s in meta["skipped"]}
    assert details["letter.jpg"] == "text" and "ZIP" in details["report.jpg"]
    assert "60000x60000" in details["bomb.png"] and "moved-away.jpg" in details["broken-link.jpg"]
    assert result.skipped == meta["skipped"]
    assert sum(result.train_counts.values()) + sum(result.val_counts.values()) == 24
    assert result.val_accuracy == 1.0


def test_train_strict_fails_before_training_naming_every_bad_file(tmp_path, colour_data, tiny_backbone):
    from tlcli.cli.commands import app

    root = tmp_path / "images"
    bad = messy_copy(colour_data, root)
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["train", str(root), "--backbone", str(tiny_backbone), "--image-size", "32",
                                      "--out", str(out), "--strict"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "--strict" in text
    for path, reason in bad.items():
        assert f"{path} ({reason})" in text
    assert not out.exists()
    assert not list(tmp_path.glob(".model*")), "training work files were created"


def test_skipped_table_shows_paths_and_reasons_literally():
    from rich.console import Console

    from tlcli.cli.render import skipped_table

    console = Console(record=True, width=200)
    console.print(skipped_table([{"path": "ds/[raw]/a.jpg", "reason": "truncated", "detail": "ends early"},
                                 {"path": "ds/cats/b.jpg", "reason": "zero bytes", "detail": ""}]))
    text = console.export_text()
    assert "Skipped 2 unusable file(s)" in text
    assert "ds/[raw]/a.jpg" in text and "truncated (ends early)" in text
    assert "ds/cats/b.jpg" in text and "zero bytes" in text and "zero bytes (" not in text


def test_a_file_check_given_up_before_it_starts_decodes_nothing(tmp_path):
    # train() starts the check beside the backbone's download; a failed download sets stopping,
    # and the check must end before decoding anything (it used to list every file and decode a
    # window of them before its first progress report looked).
    import threading

    from tests.helpers import make_colour_dataset
    from tlcli.config import TrainConfig
    from tlcli.errors import Interrupted

    root = make_colour_dataset(tmp_path / "images", per_class=4)
    stopping, kept = threading.Event(), images.KeptPixels(32)
    stopping.set()
    with pytest.raises(Interrupted):
        data.scan_splits(TrainConfig(data_dir=str(root)), image_size=32, stopping=stopping, keep=kept)
    assert kept.used == 0
    ran = threading.Event()
    assert data.scan_splits(TrainConfig(data_dir=str(root)), image_size=32, stopping=ran, keep=kept).labels
    assert kept.used > 0  # the same check, not given up, decodes and keeps
