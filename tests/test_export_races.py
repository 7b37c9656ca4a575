"""export against failures and races: a labels file that cannot be written leaves the previous
.tflite in place, a second export (or a train) of a bundle being exported fails at once, and
SIGTERM during the parity check ends it as Ctrl-C does (exit 130), with no temporary folder left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tlcli
from tlcli.errors import TlcliError
from tlcli.progress import Start

ROOT = Path(__file__).parents[1]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_labels_file_that_cannot_be_written_leaves_the_previous_tflite(bundle_copy):
    tlcli.export_tflite(bundle_copy)
    before = (bundle_copy / "model.tflite").read_bytes()
    (bundle_copy / "labels.txt").unlink()
    (bundle_copy / "labels.txt").mkdir()  # a folder in its place: the rename onto it fails
    with pytest.raises(TlcliError) as err:
        tlcli.export_tflite(bundle_copy, quantize="float16", force=True)
    assert (bundle_copy / "model.tflite").read_bytes() == before
    assert "labels.txt: cannot write (Is a directory); " in str(err.value) and "\n" not in str(err.value)
    assert "model.tflite was not written (any previous one is kept)" in str(err.value)
    assert hidden(bundle_copy) == [] and hidden(bundle_copy.parent) == []  # no temporary file, no lock


def test_a_second_export_or_a_train_of_a_bundle_being_exported_fails_at_once(bundle_copy, colour_data, train_args):
    refused = []

    def start_others_during_the_parity_check(event):
        if isinstance(event, Start) and event.task == "parity" and not refused:
            for other in (lambda: tlcli.export_tflite(bundle_copy, quantize="dynamic", force=True),
                          lambda: tlcli.train(colour_data, out=str(bundle_copy), force=True, **train_args)):
                with pytest.raises(TlcliError) as err:
                    other()
                refused.append(str(err.value))

    result = tlcli.export_tflite(bundle_copy, progress=start_others_during_the_parity_check)
    assert result.quantize == "none" and result.agreement == 1.0
    assert len(refused) == 2, refused
    assert refused[0].startswith(f"--model {bundle_copy}: another tlcli train or export is writing this model")
    assert refused[1].startswith(f"--out {bundle_copy}: another tlcli train or export is writing this model")
    assert hidden(bundle_copy.parent) == []  # the lock is gone
    tlcli.export_tflite(bundle_copy, quantize="dynamic", force=True)  # and the next export runs


def test_sigterm_during_the_parity_check_exits_130_and_leaves_no_temporary_folder(bundle_copy, tmp_path):
    tlcli.export_tflite(bundle_copy)
    before = (bundle_copy / "model.tflite").read_bytes()
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "from tlcli.cli import run; run()", "export", "--tflite",
                             "--model", str(bundle_copy), "--quantize", "float16", "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT), "NO_COLOR": "1"})
    sent = threading.Event()

    def terminate_once_the_parity_folder_exists():
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith("tlcli-export-") for p in temp.iterdir()):
                proc.send_signal(signal.SIGTERM)
                sent.set()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=terminate_once_the_parity_folder_exists, daemon=True)
    watcher.start()
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    watcher.join(5)
    assert sent.is_set(), stderr
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert list(temp.iterdir()) == []  # no tlcli-export-* folder, nor anything else
    assert (bundle_copy / "model.tflite").read_bytes() == before
    assert hidden(bundle_copy) == [] and hidden(bundle_copy.parent) == []
