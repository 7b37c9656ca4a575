"""Hostile inputs: files that are not regular files, huge files, decompression bombs, class
folders with line breaks, symlink loops, deep trees, images changed mid-run and damaged feature
cache entries. Each one gets a per-file error or a one-line DatasetError, never a hang or a
traceback."""

import contextlib
import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_colour_dataset, run_cli, solid_image
from tlcli import data
from tlcli.data import image_files, images, walk
from tlcli.deploy import inference
from tlcli.errors import DatasetError, ImageError
from tlcli.features.store import model_store

SIZE = 32


def within(seconds, fn, *, unblock=None):
    """fn()'s result, or a test failure if it takes longer than ``seconds`` (then ``unblock``
    releases the stuck thread, so the test run itself does not hang)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock:
            unblock()
        pytest.fail(f"still running after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def open_writer(fifo):
    """Unblock a reader stuck in open() on ``fifo``."""
    def unblock():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    return unblock


def rejection(path, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        images.load_for_model(path, SIZE, **kw)
    return info.value


def fake_bundle(labels=("blue", "red")):
    return SimpleNamespace(image_size=SIZE, labels=list(labels), max_pixels=images.DEFAULT_MAX_PIXELS,
                           meta=SimpleNamespace(multi_label=False))


def uniform_engine(batch):
    return np.full((len(batch), 2), 0.5, np.float32)


def predictions(paths):
    return [p for p, _ in inference.iter_predict(walk.expand(paths), bundle=fake_bundle(),
                                                 engine=uniform_engine)]


# ---- item 7: only regular files are opened ----------------------------------------------------

def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    err = within(10, lambda: rejection(fifo), unblock=open_writer(fifo))
    assert err.reason == image_files.NOT_REGULAR and "FIFO" in err.detail


def test_a_symlink_to_dev_zero_is_refused_without_reading_it(tmp_path):
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    err = within(10, lambda: rejection(link))
    assert err.reason == image_files.NOT_REGULAR and err.detail == "a device"


def test_predict_gives_fifos_and_devices_in_a_folder_their_own_error(tmp_path):
    solid_image((20, 40, 220)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.jpg")
    (tmp_path / "c.png").symlink_to("/dev/zero")
    out = within(20, lambda: predictions([tmp_path]), unblock=open_writer(tmp_path / "b.jpg"))
    assert [Path(p.path).name for p in out] == ["a.png", "b.jpg", "c.png"]
    assert out[0].error is None and out[0].predictions
    assert "not a regular file (a FIFO" in out[1].error
    assert "not a regular file (a device)" in out[2].error


def test_fifos_and_devices_in_class_folders_are_in_the_skip_report_unopened(tmp_path):
    root = make_colour_dataset(tmp_path / "ds", per_class=2)
    os.mkfifo(root / "red" / "pipe.png")
    (root / "blue" / "zero.jpg").symlink_to("/dev/zero")
    folder = within(30, lambda: data.scan(root, image_size=SIZE), unblock=open_writer(root / "red" / "pipe.png"))
    skipped = {Path(s.path).name: (s.reason, s.detail) for s in folder.skipped}
    assert skipped["pipe.png"] == (image_files.NOT_REGULAR, "a FIFO (named pipe)")
    assert skipped["zero.jpg"] == (image_files.NOT_REGULAR, "a device")
    assert len(folder.samples) == 6


def test_predict_names_a_broken_symlink_and_its_target(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (out,) = predictions([tmp_path / "gone.jpg"])
    assert "broken symlink" in out.error and "nowhere.jpg" in out.error


# ---- item 8: a huge file is judged by its header ----------------------------------------------

def sparse_after(tmp_path, name, head: bytes, total: int) -> Path:
    """``head`` followed by zeros up to ``total`` bytes (a sparse file: no disk used)."""
    p = tmp_path / name
    with open(p, "wb") as f:
        f.write(head)
        f.truncate(total)
    return p


def test_a_file_far_larger_than_its_declared_image_is_refused(tmp_path):
    png = tmp_path / "small.png"
    solid_image((20, 40, 220), size=(64, 48)).save(png)
    big = sparse_after(tmp_path, "padded.png", png.read_bytes(), image_files.METADATA_ALLOWANCE + (1 << 20))
    err = rejection(big)
    assert err.reason == image_files.TOO_LARGE and "64x48" in err.detail
    assert images.check(png, size=SIZE)[1] is None, "the image itself is fine"


def test_a_huge_file_without_a_readable_header_is_refused_before_reading_it(tmp_path):
    big = sparse_after(tmp_path, "fake.jpg", b"\xff\xd8\xff\xe0", 3 << 30)  # 3 GB, almost all zeros
    err = within(10, lambda: rejection(big))
    assert err.reason == image_files.CORRUPT and "header" in err.detail


def test_a_huge_file_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    png = tmp_path / "wide.png"
    Image.new("L", (5000, 5000)).save(png)
    big = sparse_after(tmp_path, "wide_big.png", png.read_bytes(), image_files.METADATA_ALLOWANCE + 1)
    err = within(10, lambda: rejection(big, max_pixels=1_000_000))
    assert err.reason == image_files.OVER_PIXEL_LIMIT


# ---- item 9: decompression bombs within the limit ---------------------------------------------

def palette_png_with_alpha(path, side, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 4, (side, side), dtype=np.uint8), "P")
    img.putpalette(rng.integers(0, 256, 12, dtype=np.uint8).tobytes())
    img.save(path, transparency=bytes([0, 128, 255, 60]))
    return path


def recording_budget(total):
    """An ``images.MemoryBudget`` that records how many reservations were ever held at once."""

    class RecordingBudget(images.MemoryBudget):
        def __init__(self, total):
            super().__init__(total)
            self.inflight = self.most = 0
            self.lock = threading.Lock()

        @contextlib.contextmanager
        def reserve(self, nbytes):
            with super().reserve(nbytes):
                with self.lock:
                    self.inflight += 1
                    self.most = max(self.most, self.inflight)
                try:
                    yield
                finally:
                    with self.lock:
                        self.inflight -= 1

    return RecordingBudget(total)


def decode_all(files, fn):
    errors = []
    threads = [threading.Thread(target=lambda f=f: errors.append(fn(f))) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_large_decodes_share_one_memory_budget_and_run_one_at_a_time(tmp_path, monkeypatch):
    side = 1200
    files = [palette_png_with_alpha(tmp_path / f"bomb{i}.png", side, seed=i) for i in range(4)]
    one = side * side * 6  # a palette image: its pixels twice (+ an upright copy) and the RGB result
    budget = recording_budget(int(1.5 * one))
    monkeypatch.setattr(images, "DECODE_BUDGET", budget)
    real = images.to_model_input

    def slow(img, size):  # holds each decode long enough for the others to try to start
        threading.Event().wait(0.2)
        return real(img, size)

    monkeypatch.setattr(images, "to_model_input", slow)
    done = decode_all(files, lambda f: images.load_for_model(f, SIZE).shape)
    assert done == [(SIZE, SIZE, 3)] * 4
    assert budget.most == 1 and budget.used == 0
    # Small images still decode side by side under the same budget.
    small = [palette_png_with_alpha(tmp_path / f"small{i}.png", 100, seed=i) for i in range(4)]
    decode_all(small, lambda f: images.load_for_model(f, SIZE))
    assert budget.most > 1


def test_transparency_results_are_those_of_compositing_every_pixel(tmp_path):
    """The lighter palette and RGBA paths give exactly what RGBA alpha compositing gives."""
    def reference(path):
        rgba = Image.open(path).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, images.BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return np.asarray(canvas.convert("RGB"))

    rng = np.random.default_rng(1)
    pal = palette_png_with_alpha(tmp_path / "pal.png", 40)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA").save(rgba)
    la = tmp_path / "la.png"
    Image.fromarray(rng.integers(0, 256, (30, 40, 2), dtype=np.uint8), "LA").save(la)
    for p in (pal, rgba, la):
        np.testing.assert_array_equal(np.asarray(images.load_rgb(p)), reference(p))


# ---- item 15: class folder names that would corrupt the labels --------------------------------

@pytest.mark.parametrize("name", ["red\nblue", "red\u2028blue", "red\x1b[2J", "tab\there"])
def test_a_class_folder_with_a_line_break_or_control_character_is_refused(tmp_path, name):
    root = make_colour_dataset(tmp_path / "ds", per_class=2)
    (root / "blue").rename(root / name)
    with pytest.raises(DatasetError) as info:
        data.scan(root, image_size=SIZE)
    msg = str(info.value)
    assert repr(name) in msg and "rename" in msg
    assert "\n" not in msg and "\u2028" not in msg and "\x1b" not in msg


# ---- crashes: symlink loops, deep trees -------------------------------------------------------

def test_symlink_loops_in_the_dataset_are_reported_not_a_crash(tmp_path):
    root = make_colour_dataset(tmp_path / "ds", per_class=2)
    (root / "red" / "self.jpg").symlink_to("self.jpg")
    (root / "blue" / "one").symlink_to("two")
    (root / "blue" / "two").symlink_to("one")
    (root / "loop").symlink_to("loop")
    (root / "green" / "up").symlink_to("..")
    folder = data.scan(root, image_size=SIZE)
    skipped = {Path(s.path).name: s for s in folder.skipped}
    assert skipped["self.jpg"].reason == image_files.BROKEN_SYMLINK
    assert {"one", "two", "loop"} <= set(skipped)
    assert len(folder.samples) == 6


@pytest.fixture
def deep_tree(tmp_path):
    """Make ``root/d/d/.../deep.png`` ``depth`` folders deep; removed afterwards without
    recursion (pytest's own clean-up would overflow the stack)."""
    made = []

    def make(root: Path, depth: int) -> Path:
        d = str(root)
        for _ in range(depth):  # one level at a time: makedirs is recursive too
            d = os.path.join(d, "d")
            os.mkdir(d)
            made.append(d)
        solid_image((220, 30, 30)).save(os.path.join(d, "deep.png"))
        return Path(d)

    yield make
    if made:
        os.unlink(os.path.join(made[-1], "deep.png"))
    for d in reversed(made):
        os.rmdir(d)


def test_folders_a_thousand_deep_are_walked(tmp_path, deep_tree):
    root = make_colour_dataset(tmp_path / "ds", per_class=2)
    deep_tree(root / "red", 1100)
    folder = data.scan(root, image_size=SIZE)
    assert sum(Path(s.path).name == "deep.png" for s in folder.samples) == 1
    found = walk.expand([root / "red"])
    assert [Path(p).name for p in found].count("deep.png") == 1


# ---- contracts: predict reports an unreadable file per file ------------------------------------

def test_predict_reports_an_unreadable_file_per_file_not_exit_2(trained_bundle, tmp_path, monkeypatch):
    good, secret = tmp_path / "good.png", tmp_path / "secret.png"
    solid_image((20, 40, 220)).save(good)
    solid_image((20, 40, 220)).save(secret)
    # As a user without permission sees it (this may run as root, who can read anything).
    real_access, real_open = os.access, os.open
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: False if str(p) == str(secret) else real_access(p, mode, **kw))

    def guarded_open(p, flags, *args, **kw):
        if str(p) == str(secret):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *args, **kw)

    monkeypatch.setattr(os, "open", guarded_open)
    result = run_cli("predict", good, secret, "--model", trained_bundle, "--engine", "tf", "--json")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    assert '"error": null' in lines[0] and "blue" in lines[0]
    assert "unreadable (Permission denied)" in lines[1]


# ---- items 10, 11 and per-batch caching: the feature cache ------------------------------------

@pytest.fixture(scope="module")
def extractor():
    import tf_keras

    k = tf_keras
    inp = k.Input((SIZE, SIZE, 3))
    return k.Model(inp, k.layers.GlobalAveragePooling2D()(inp))  # features: the mean colour, dim 3


def extract(folder, extractor, cache, progress=None):
    from tlcli import features
    from tlcli.progress import silent

    return features.extract(folder.samples, extractor=extractor, cache=cache, image_size=SIZE, batch_size=4,
                            max_pixels=images.DEFAULT_MAX_PIXELS, progress=progress or silent)


@pytest.fixture
def scanned(tmp_path):
    return data.scan(make_colour_dataset(tmp_path / "ds", per_class=4), image_size=SIZE)


def test_an_image_replaced_after_the_check_is_not_cached_under_the_old_hash(scanned, extractor, tmp_path):

    victim = next(s for s in scanned.samples if Path(s.path).name == "red_1.png")
    solid_image((20, 40, 220), seed=5).save(victim.path)  # now a blue image, under red's old hash
    cache = model_store(tmp_path / "cache", "m")
    with pytest.raises(DatasetError, match=r"red_1.png: changed after the file check"):
        extract(scanned, extractor, cache)
    assert cache.get(victim.digest) is None, "the new image's features under the old image's hash"
    new = cache.get(image_files.digest(Path(victim.path).read_bytes()))
    assert new is not None and new[2] > new[0], "the bytes that were decoded (blue) keep their features"


def test_damaged_cache_entries_are_recomputed(scanned, extractor, tmp_path, monkeypatch):
    from tlcli.features import store

    monkeypatch.setattr(store, "CHUNK_ROWS", 4)  # three shards of four vectors
    cache = model_store(tmp_path / "cache", "m")
    first, extracted = extract(scanned, extractor, cache)
    assert extracted == 12 and first.shape == (12, 3)
    shards = sorted(cache.dir.glob("*.f32"))
    assert len(shards) == 3
    raw = bytearray(shards[0].read_bytes())
    raw[0] ^= 0x01  # one bit of one vector
    shards[0].write_bytes(bytes(raw))
    shards[1].write_bytes(b"")  # what a crash of an older writer could leave
    again, extracted = extract(scanned, extractor, model_store(tmp_path / "cache", "m"))
    assert extracted == 8
    np.testing.assert_array_equal(again, first)
    _, extracted = extract(scanned, extractor, model_store(tmp_path / "cache", "m"))
    assert extracted == 0, "the recomputed vectors were stored again"


def test_an_interrupted_extraction_keeps_the_batches_it_finished(scanned, extractor, tmp_path):

    def stop_at_second_batch(event):
        if event.kind == "advance" and event.completed >= 8:
            raise KeyboardInterrupt

    cache = model_store(tmp_path / "cache", "m")
    with pytest.raises(KeyboardInterrupt):
        extract(scanned, extractor, cache, progress=stop_at_second_batch)
    assert len(model_store(tmp_path / "cache", "m").rows([s.digest for s in scanned.samples[:8]])) == 8
    _, extracted = extract(scanned, extractor, cache)
    assert extracted == 4
