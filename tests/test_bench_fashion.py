"""bench/fashion_mnist.py's split and files, on a fake package tarball (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from bench import fashion_mnist as fm


def fake_classes(per_class: int = 9) -> list[list[list[int]]]:
    """Ten classes of distinct random images, each with a repeat of its first image and an empty
    row; class 1's last image is also class 0's (an image under two labels)."""
    rng = np.random.default_rng(5)
    classes = []
    for _ in range(10):
        rows = [rng.integers(0, 256, 784).tolist() for _ in range(per_class)]
        classes.append([*rows, rows[0], []])
    classes[1].append(classes[0][3])
    return classes


def fake_tarball(path, classes) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for k, rows in enumerate(classes):
            blob = json.dumps({"data": rows}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{k}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_split_is_deterministic_disjoint_and_keeps_each_image_once():
    classes = [fm.as_rows(rows) for rows in fake_classes()]
    split = fm.draw(classes, 3, 4, seed=0)
    assert split == fm.draw(classes, 3, 4, seed=0)
    assert split != fm.draw(classes, 3, 4, seed=1)
    pixels = []
    for k, (train, test) in enumerate(split):
        assert len(train) == 3 and len(test) == 4 and not set(train) & set(test)
        assert 9 not in train + test and 10 not in train + test  # the repeat and the empty row
        pixels += [classes[k][i].tobytes() for i in train + test]
    assert 3 not in split[0][0] + split[0][1]  # under two labels: in neither class
    assert 11 not in split[1][0] + split[1][1]
    assert len(set(pixels)) == len(pixels)
    with pytest.raises(ValueError, match="class T-shirt/top: 8 unique images, needs 9"):
        fm.draw(classes, 5, 4, seed=0)


def test_set_is_written_as_class_folders_of_the_package_pixels(tmp_path):
    fake_tarball(tmp_path / "fake.tgz", fake_classes())
    classes = fm.read_classes(tmp_path / "fake.tgz")
    digest = fm.write_set(classes, tmp_path / "a", 2, 3, seed=0)
    assert fm.write_set(classes, tmp_path / "b", 2, 3, seed=0) == digest
    assert fm.write_set(classes, tmp_path / "c", 2, 3, seed=7) != digest
    names = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert names == sorted(["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                            "bag", "ankle_boot"])
    for part, n in (("train", 2), ("test", 3)):
        files = sorted((tmp_path / "a" / part / "bag").glob("*.png"))
        assert len(files) == n
        for f in files:
            img = Image.open(f)
            assert img.mode == "RGB" and img.size == (28, 28)
            row = int(f.stem.rsplit("_", 1)[1])
            grey = np.asarray(img)
            assert (grey == grey[:, :, :1]).all()
            assert np.array_equal(grey[:, :, 0].ravel(), classes[8][row])


def test_a_tarball_that_is_not_the_pinned_one_is_refused(tmp_path):
    (tmp_path / fm.TARBALL).write_bytes(b"not the package")
    with pytest.raises(ValueError, match="sha256"):
        fm.fetch(tmp_path)
