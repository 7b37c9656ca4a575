"""Variants of issue #10's hostile cases that the first fixes missed: each test failed before
its fix."""

import contextlib
import os
import shutil
import signal

import pytest

import tlcli
from tlcli import bundle, evaluation, export
from tlcli.errors import BundleError


@contextlib.contextmanager
def deadline(seconds=30):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or read()."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s (hang)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _replace(path, make):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    make(path)


@pytest.mark.parametrize("name", ["tlcli.json", "splits.json", "model.tflite"])
def test_a_folder_in_place_of_a_bundle_file_is_a_one_line_error(bundle_copy, colour_data, name):
    _replace(bundle_copy / name, lambda p: p.mkdir())
    with pytest.raises(BundleError, match=f"{name}: not a regular file"):
        tlcli.predict([colour_data / "red" / "red_1.png"], model_dir=bundle_copy, engine="tflite")


def test_a_folder_in_place_of_fingerprint_pb_is_a_one_line_error(bundle_copy):
    _replace(bundle_copy / "fingerprint.pb", lambda p: p.mkdir())
    with pytest.raises(BundleError, match="fingerprint.pb: not a regular file"):
        bundle.load(bundle_copy).fingerprint()


def test_a_folder_in_place_of_saved_model_pb_is_a_one_line_error(bundle_copy, colour_data):
    _replace(bundle_copy / "saved_model.pb", lambda p: p.mkdir())
    with pytest.raises(BundleError, match="saved_model.pb: not a regular file"):
        tlcli.predict([colour_data / "red" / "red_1.png"], model_dir=bundle_copy, engine="tf")


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: os.symlink("/dev/zero", p)], ids=["fifo", "dev-zero"])
def test_a_fifo_fingerprint_does_not_hang_the_tensorflow_engine(bundle_copy, colour_data, make):
    # TensorFlow's SavedModel loader opens fingerprint.pb itself: a FIFO blocked it forever.
    _replace(bundle_copy / "fingerprint.pb", make)
    with deadline(60), pytest.raises(BundleError, match="fingerprint.pb: not a regular file"):
        evaluation.evaluate(colour_data, model_dir=bundle_copy, engine="tf")
