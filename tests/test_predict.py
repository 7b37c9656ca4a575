"""predict over good and bad files: every input gets a result or its own error, and the exit code
is 0 only when every input succeeded. Uses the shared read-only ``trained_bundle``."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli as run
from tlcli.data import image_files


def json_rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def mixed(tmp_path, colour_data):
    """Good and bad inputs, in the order given to predict, with the expected label or reason."""
    red = colour_data / "red" / "red_0.jpg"
    blue = colour_data / "blue" / "blue_1.png"
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a photo\n")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(red.read_bytes()[:-300])
    folder = tmp_path / "folder [old]"  # brackets: Rich markup must not eat them
    folder.mkdir()
    Image.open(colour_data / "green" / "green_2.jpg").save(folder / "green.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    (folder / ".DS_Store").write_bytes(b"Bud1")
    missing = tmp_path / "missing.jpg"
    args = [red, tmp_path / "empty.jpg", blue, tmp_path / "notes.jpg", cut, missing, folder]
    expected = [(str(red), "red"), (str(tmp_path / "empty.jpg"), image_files.ZERO_BYTES), (str(blue), "blue"),
                (str(tmp_path / "notes.jpg"), image_files.NOT_AN_IMAGE), (str(cut), image_files.TRUNCATED),
                (str(missing), "no such file"), (str(folder / "broken.png"), image_files.TRUNCATED),
                (str(folder / "green.png"), "green")]
    return args, expected


def test_library_predict_gives_every_input_a_result_or_its_own_error(mixed, trained_bundle):
    import tlcli

    args, expected = mixed
    preds = tlcli.predict(args, model_dir=trained_bundle, engine="tf", top_k=2)
    assert [p.path for p in preds] == [path for path, _ in expected]
    for p, (path, want) in zip(preds, expected):
        if want in ("red", "green", "blue"):
            assert p.error is None
            assert len(p.predictions) == 2 and p.predictions[0]["label"] == want
        else:
            assert p.predictions == []
            assert p.error.startswith(f"{path}: {want}"), p.error


def test_cli_json_lines_carry_per_file_errors_and_exit_1(mixed, trained_bundle):
    args, expected = mixed
    result = run("predict", *args, "--model", trained_bundle, "--engine", "tf", "--json")
    assert result.exit_code == 1
    rows = json_rows(result)
    assert [r["path"] for r in rows] == [path for path, _ in expected]
    for r, (path, want) in zip(rows, expected):
        if want in ("red", "green", "blue"):  # the bundle's unknown detector adds its two fields
            assert set(r) == {"path", "predictions", "error", "unknown", "unknown_score"}
            assert r["error"] is None and r["predictions"][0]["label"] == want
        else:
            assert set(r) == {"path", "predictions", "error"}
            assert r["predictions"] == [] and r["error"].startswith(f"{path}: {want}")
    assert "5 of 8 input(s) failed" in result.stderr


def test_cli_table_shows_errors_literally_and_exits_1(mixed, trained_bundle):
    args, expected = mixed
    result = run("predict", *args, "--model", trained_bundle, "--engine", "tf", columns=400)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert list(rows) == [path for path, _ in expected]  # "folder [old]" is not eaten as markup
    for path, want in expected:
        if want in ("red", "green", "blue"):
            assert rows[path].startswith(f"{want} ") and rows[path].endswith("%")
        else:
            assert rows[path].startswith(want)
    assert rows[str(expected[3][0])] == "not an image (text)"
    assert "5 of 8 input(s) failed" in result.stderr


def test_cli_all_good_exits_0(trained_bundle, colour_data):
    result = run("predict", colour_data / "green", colour_data / "red" / "red_3.png",
                 "--model", trained_bundle, "--engine", "tf", "--json", "--top-k", 1)
    assert result.exit_code == 0, result.output
    rows = json_rows(result)
    assert len(rows) == 9 and all(r["error"] is None for r in rows)
    assert [r["predictions"][0]["label"] for r in rows] == ["green"] * 8 + ["red"]


def test_predict_max_pixels_defaults_to_the_training_limit_and_can_be_raised(bundle_copy, colour_data):
    meta_path = bundle_copy / "tlcli.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["max_pixels"] = 500  # trained with a tiny limit; the 24x24 images have 576
    meta_path.write_text(json.dumps(meta))
    image = colour_data / "red" / "red_0.jpg"

    result = run("predict", image, "--model", bundle_copy, "--engine", "tf", "--json")
    assert result.exit_code == 1
    [row] = json_rows(result)
    assert row["error"].startswith(f"{image}: over the pixel limit (24x24 > 500 pixels")

    result = run("predict", image, "--model", bundle_copy, "--engine", "tf", "--json", "--max-pixels", 576)
    assert result.exit_code == 0, result.output
    assert json_rows(result)[0]["predictions"][0]["label"] == "red"


def test_predict_rejects_a_max_pixels_below_1(trained_bundle, colour_data):
    result = run("predict", colour_data / "red" / "red_0.jpg", "--model", trained_bundle, "--max-pixels", -5)
    assert result.exit_code == 2
    assert "Invalid value for '--max-pixels'" in result.output and "greater than or equal to 1" in result.output
    assert result.output.count("\n") == 1, "one line"


def test_prediction_sees_exactly_what_training_saw(trained_bundle, colour_data):
    """The SavedModel on the tf.data training pipeline's tensors gives the probabilities that
    predict reports for the same files."""
    from tlcli import bundle, data
    from tlcli.deploy import inference

    b = bundle.load(trained_bundle)
    engine = inference.open_engine(b, "tf")
    paths = [str(colour_data / "blue" / "blue_0.jpg"), str(colour_data / "green" / "green_1.png")]
    pipeline = np.concatenate(list(data.image_dataset(paths, b.image_size, batch_size=2).as_numpy_iterator()))
    expected = engine(pipeline)
    got = np.stack([row for _, row in inference.iter_predict(paths, bundle=b, engine=engine)])
    assert np.array_equal(got, expected)


def test_an_empty_folder_gets_its_own_error(tmp_path, trained_bundle, colour_data):
    import tlcli

    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    preds = tlcli.predict([tmp_path / "empty", colour_data / "red" / "red_0.jpg"], model_dir=trained_bundle,
                          engine="tf")
    assert [p.path for p in preds] == [str(tmp_path / "empty"), str(colour_data / "red" / "red_0.jpg")]
    assert preds[0].error == f"{tmp_path / 'empty'}: folder with no files to classify"
    assert preds[0].predictions == [] and preds[1].error is None
