"""The part of a training run that starts before TensorFlow: the file check at once and, with a
cached LiteRT conversion, the frozen features of what it decodes (tlcli/training/prelude.py), and the
stderr silencing that lets both run beside the TensorFlow import (tlcli/quiet.py)."""

import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import tlcli
from tlcli import bundle
from tlcli.data import images
from tlcli.errors import Interrupted
from tlcli.features.store import FeatureStore
from tlcli.progress import Advance, End, Start
from tlcli.training import prelude


def recorder():
    """A progress callback and the list of (event, thread name) it fills."""
    seen = []
    return (lambda e: seen.append((e, threading.current_thread().name))), seen


def ahead_started(seen) -> bool:
    """Whether the extraction ahead ran: its ``extract`` task starts with no total, on its own thread."""
    return any(isinstance(e, Start) and e.task == "extract" and e.total is None and name == "tlcli-ahead"
               for e, name in seen)


def stored(cache_dir) -> dict:
    """Every vector in the LiteRT plain-view stores under ``cache_dir``, by digest."""
    found = {}
    for folder in (cache_dir / "store").glob("*-litert-d*"):
        if "-mirror-" in folder.name or "-copy" in folder.name:  # other views, and the audit's copies
            continue
        store = FeatureStore(folder)
        for digest in _digests(folder):
            vec = store.get(digest)
            if vec is not None:
                found[digest] = vec
    return found


def _digests(folder):
    import json

    for sidecar in folder.glob("*.json"):
        yield from json.loads(sidecar.read_text()).get("digests", [])


@pytest.fixture
def converted(tmp_path, colour_data, train_args):
    """A LiteRT run that converted the tiny backbone (nothing extracted ahead: no conversion was
    cached yet): (its result, its cache folder)."""
    cache = tmp_path / "cache1"
    progress, seen = recorder()
    first = tlcli.train(colour_data, out=str(tmp_path / "first"), extractor="litert", cache_dir=str(cache),
                        progress=progress, **train_args)
    assert first.extractor == "litert" and first.extracted == 24 and not ahead_started(seen)
    return first, cache


def fresh_cache_with_conversion(tmp_path, cache, name="cache2"):
    """A feature cache holding only ``cache``'s converted backbone: a cold run that need not convert."""
    fresh = tmp_path / name
    shutil.copytree(cache / "backbones", fresh / "backbones")
    return fresh


def test_features_extracted_ahead_equal_the_extraction_proper_and_give_the_same_model(
        tmp_path, colour_data, train_args, converted):
    first, cache = converted
    fresh = fresh_cache_with_conversion(tmp_path, cache)
    progress, seen = recorder()
    ahead = tlcli.train(colour_data, out=str(tmp_path / "ahead"), extractor="litert", cache_dir=str(fresh),
                        progress=progress, **train_args)
    assert ahead_started(seen)
    # Begun while the file check was still running, not after it.
    order = [(e.task, type(e)) for e, _ in seen if isinstance(e, (Start, End))]
    assert order.index(("extract", Start)) < order.index(("scan", End))
    assert (ahead.extractor, ahead.extracted, ahead.cached) == ("litert", 24, 0)
    # All 24 came from the thread ahead: the extraction proper never started a counted task.
    assert not any(isinstance(e, Start) and e.task.startswith("extract") and e.total for e, _ in seen)
    assert sum(1 for e, name in seen if isinstance(e, Advance) and name == "tlcli-ahead") >= 1
    assert ahead.val_loss == first.val_loss and ahead.train_accuracy == first.train_accuracy
    before, now = stored(cache), stored(fresh)
    assert len(now) == 24 and now.keys() == before.keys()
    assert all(np.array_equal(before[d], now[d]) for d in now)  # bit for bit what the extraction proper gave
    again = tlcli.train(colour_data, out=str(tmp_path / "again"), extractor="litert", cache_dir=str(fresh),
                        **train_args)
    assert (again.extracted, again.cached) == (0, 24)


def test_the_mirror_view_is_extracted_ahead_too(tmp_path, colour_data, train_args, converted):
    _, cache = converted
    fresh = fresh_cache_with_conversion(tmp_path, cache)
    progress, seen = recorder()
    run = tlcli.train(colour_data, out=str(tmp_path / "m"), extractor="litert", cache_dir=str(fresh), mirror=True,
                      progress=progress, **train_args)
    assert ahead_started(seen) and run.mirror
    assert (run.extracted, run.cached) == (48, 0)
    # Nothing was left for the extraction proper: it never started a counted extract task.
    assert not any(isinstance(e, Start) and e.task.startswith("extract") and e.total for e, _ in seen)


def test_ctrl_c_during_the_extraction_ahead_keeps_the_old_bundle_and_what_was_extracted(
        tmp_path, colour_data, train_args, converted, monkeypatch):
    first, cache = converted
    out = tmp_path / "first"
    before = (out / "tlcli.json").read_bytes()
    fresh = fresh_cache_with_conversion(tmp_path, cache)
    monkeypatch.setattr(prelude, "AHEAD_BATCH", 4)
    done = []

    def ctrl_c(e):  # a real SIGINT, to the main thread, once the thread ahead has stored a batch
        if isinstance(e, Advance) and e.task == "extract" and threading.current_thread().name == "tlcli-ahead" \
                and not done:
            done.append(e.completed)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        tlcli.train(colour_data, out=str(out), extractor="litert", cache_dir=str(fresh), force=True,
                    progress=ctrl_c, **train_args)
    assert (out / "tlcli.json").read_bytes() == before and bundle.load(out).meta.labels == first.labels
    assert not any(t.name.startswith(("tlcli-ahead", "tlcli-scan")) for t in threading.enumerate())
    kept = len(stored(fresh))
    assert 0 < done[0] <= kept  # the batches done before the interrupt are in the store
    rest = tlcli.train(colour_data, out=str(tmp_path / "rest"), extractor="litert", cache_dir=str(fresh),
                       **train_args)
    assert (rest.extracted, rest.cached) == (24 - kept, kept)


def test_parity_is_measured_once_before_the_run_waits_for_the_extraction_ahead(
        tmp_path, colour_data, train_args, converted, monkeypatch):
    from tlcli.features import extraction

    _, cache = converted
    order, tf_pass, finish = [], extraction.tf_features, prelude.Prelude.finish
    monkeypatch.setattr(extraction, "tf_features", lambda *a: order.append("parity") or tf_pass(*a))
    monkeypatch.setattr(prelude.Prelude, "finish", lambda self: order.append("finish") or finish(self))
    run = tlcli.train(colour_data, out=str(tmp_path / "p"), extractor="litert",
                      cache_dir=str(fresh_cache_with_conversion(tmp_path, cache)), **train_args)
    assert run.extractor == "litert" and order == ["parity", "finish"]


def test_a_runner_that_disagrees_with_tensorflow_stops_the_extraction_ahead_before_it_is_waited_for(
        tmp_path, colour_data, train_args, converted, monkeypatch):
    from tlcli.model import litert as litert_backbone

    _, cache = converted
    order, cancel, finish = [], prelude.Prelude.cancel, prelude.Prelude.finish
    monkeypatch.setattr(litert_backbone, "parity_error", lambda a, b: 1.0)
    monkeypatch.setattr(prelude.Prelude, "cancel", lambda self: order.append("cancel") or cancel(self))
    monkeypatch.setattr(prelude.Prelude, "finish", lambda self: order.append("finish") or finish(self))
    progress, seen = recorder()
    run = tlcli.train(colour_data, out=str(tmp_path / "p"), extractor="litert", progress=progress,
                      cache_dir=str(fresh_cache_with_conversion(tmp_path, cache)), **train_args)
    assert (run.extractor, run.extracted) == ("tf", 24)
    assert order[:2] == ["cancel", "finish"]
    assert sum("differ from TensorFlow's" in getattr(e, "message", "") for e, _ in seen) == 1


def test_the_litert_runner_serialises_calls_from_several_threads(converted):
    from concurrent import futures

    from tlcli.model import litert as litert_backbone

    _, cache = converted
    model = next((cache / "backbones").glob("*.tflite")).read_bytes()
    runner = litert_backbone.LiteRTBackbone(model, image_size=32)
    batches = [np.random.default_rng(i).random((11, 32, 32, 3), dtype=np.float32) for i in range(6)]
    alone = [runner(b) for b in batches]
    with futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(runner, batches))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_a_machine_with_accelerator_device_files_extracts_nothing_ahead_but_still_picks_litert_when_tf_lists_none(
        tmp_path, colour_data, train_args, converted, monkeypatch):
    _, cache = converted
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    monkeypatch.setattr(prelude, "ACCELERATOR_DEVICES", (str(tmp_path / "dev" / "nvidia[0-9]*"),))
    assert not prelude.likely_litert("auto") and prelude.likely_litert("litert") and not prelude.likely_litert("tf")
    progress, seen = recorder()
    run = tlcli.train(colour_data, out=str(tmp_path / "auto"), extractor="auto",
                      cache_dir=str(fresh_cache_with_conversion(tmp_path, cache)), progress=progress, **train_args)
    assert not ahead_started(seen)
    assert (run.extractor, run.extracted) == ("litert", 24)  # the guess only skipped the work ahead


def test_likely_litert_reads_tpu_settings_from_the_environment(monkeypatch):
    monkeypatch.setattr(prelude, "ACCELERATOR_DEVICES", ())
    assert prelude.likely_litert("auto")
    monkeypatch.setenv("TPU_NAME", "local")
    assert not prelude.likely_litert("auto") and prelude.likely_litert("litert")


def test_kept_pixels_feed_hands_each_digest_once_and_ends_when_closed():
    kept = images.KeptPixels(4, feed=True)
    pixels = np.zeros((4, 4, 3), np.uint8)
    kept.offer("a", pixels)
    kept.offer("b", pixels)
    kept.offer("a", pixels)  # the same bytes twice: one entry, fed once
    assert kept.next_digests(8, timeout=0) == ["a", "b"]
    kept.drop("a")
    kept.offer("a", pixels)  # dropped after use: not fed again
    assert kept.peek("a") is None and kept.next_digests(8, timeout=0) == []
    kept.close()
    assert kept.next_digests(8, timeout=0) is None


QUIET_PROBE = """
import os, sys, threading
from tlcli.quiet import native_stderr_silenced
with native_stderr_silenced():
    os.write(2, b"native-outer\\n")
    def inner():
        with native_stderr_silenced():
            os.write(2, b"native-inner\\n")
            sys.stderr.write("python-inner\\n"); sys.stderr.flush()
    t = threading.Thread(target=inner); t.start(); t.join()
    sys.stderr.write("python-outer\\n"); sys.stderr.flush()
os.write(2, b"native-after\\n")
sys.stderr.write("python-after\\n"); sys.stderr.flush()
# An inner block that outlives the outer one: the last one out restores.
opened, closed = threading.Event(), threading.Event()
def long_inner():
    with native_stderr_silenced():
        opened.set(); closed.wait()
        os.write(2, b"native-late\\n")
t = threading.Thread(target=long_inner)
with native_stderr_silenced():
    t.start(); opened.wait()
closed.set(); t.join()
os.write(2, b"native-end\\n")
"""


def test_silencing_drops_native_writes_but_not_pythons_and_nests_across_threads():
    err = subprocess.run([sys.executable, "-c", QUIET_PROBE], capture_output=True, text=True, check=True).stderr
    assert err.split() == ["python-inner", "python-outer", "native-after", "python-after", "native-end"]
