"""Contracts with one owner each: the folder walk, the batch decode, the options, the labels and
the Python API's names."""

import enum
from pathlib import Path

import numpy as np
import pytest

import tlcli
from tests.helpers import solid_image
from tlcli import labels
from tlcli.config import TrainConfig
from tlcli.data import images, walk
from tlcli.errors import ImageError


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    solid_image((200, 0, 0)).save(root / "a" / "1.png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    solid_image((0, 200, 0)).save(outside / "2.png")
    (root / "b").symlink_to(outside, target_is_directory=True)  # leads outside: followed
    (root / "a" / "back").symlink_to(root, target_is_directory=True)  # back into the tree: a loop
    (root / ".hidden").mkdir()
    solid_image((0, 0, 200)).save(root / ".hidden" / "3.png")
    return root


def test_predict_and_train_walk_folders_by_one_rule(tmp_path):
    root = _tree(tmp_path)
    found = [Path(p).relative_to(root).as_posix() for p in walk.expand([root])]
    assert found == ["a/1.png", "b/2.png"]
    listed = [p.relative_to(root).as_posix() for d in (root / "a", root / "b")
              for p, _, _ in walk.Walker(root).files(d)]
    assert listed == found


def test_expand_keeps_what_it_cannot_list_so_each_gets_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert walk.expand([tmp_path / "missing.jpg", empty]) == [str(tmp_path / "missing.jpg"), str(empty)]


def test_decode_batch_stacks_the_good_items_and_pairs_rows_back_in_order():
    def decode(item):
        if item < 0:
            raise ImageError(f"item{item}", "corrupt")
        return np.full((2, 2, 3), item, np.float32)

    x, errors = images.decode_batch([1, -1, 3, -2], decode)
    assert x.shape == (2, 2, 2, 3) and x[1, 0, 0, 0] == 3
    assert [e is None for e in errors] == [True, False, True, False]
    assert images.paired(errors, ["row1", "row3"]) == ["row1", None, "row3", None]
    none, all_bad = images.decode_batch([-1], decode)
    assert none is None and images.paired(all_bad, None) == [None]


class Choice(enum.Enum):
    MIRRORED = "mirrored"


def test_a_config_is_built_from_the_options_a_command_received(tmp_path):
    cfg = TrainConfig.from_options({"data_dir": tmp_path, "strategy": Choice.MIRRORED, "out_dir": tmp_path / "m",
                                    "json_out": True, "epochs": 7}, renamed={"out_dir": "out"})
    assert (cfg.data_dir, cfg.strategy, cfg.out, cfg.epochs) == (str(tmp_path), "mirrored", str(tmp_path / "m"), 7)
    assert cfg.fine_tune is False, "what was not given keeps its default"


def test_labels_round_trip_through_their_text_form():
    names = ["a\u2028b", "c\x85d", "e"]
    assert labels.from_text(labels.to_text(names).encode()) == names
    assert labels.label_problem("a\nb") and labels.label_problem("") and labels.label_problem(3)
    assert labels.ordered(["b", "a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("name", ["train", "predict", "export_tflite", "evaluate", "audit", "serve", "load_bundle",
                                  "AuditResult", "TrainResult", "Bundle", "BundleMeta", "TlcliError"])
def test_the_python_api_names_resolve_and_are_listed(name):
    assert callable(getattr(tlcli, name))
    assert name in dir(tlcli)
