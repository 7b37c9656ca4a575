"""Builders for tiny, offline test assets: a hub-format feature-vector SavedModel and images."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def make_tiny_backbone(path: Path, *, output_rank: int = 2, input_rank: int = 4, features: int = 8,
                       dict_output: bool = False, size: int | None = None) -> Path:
    """A TF2 hub-format SavedModel: float32 [b, h, w, 3] in [0, 1] -> [b, 3 + features]; images of
    any h and w, or with ``size`` only [b, size, size, 3] (a backbone of fixed input size).

    Features are each channel's mean plus relu(conv) means, so solid colours are separable; the
    conv kernel is trainable so fine-tuning has something to change.
    """
    import tensorflow as tf

    root = tf.train.Checkpoint()
    kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, features], seed=[1, 2]) * 0.5, name="kernel")
    bias = tf.Variable(tf.zeros([features]), name="bias")
    root.kernel, root.bias = kernel, bias
    root.variables = [kernel, bias]
    root.trainable_variables = [kernel, bias]

    if input_rank == 4:
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)

        @tf.function(input_signature=[spec])
        def call(images):
            conv = tf.nn.relu(tf.nn.conv2d(images * 2.0 - 1.0, kernel, 1, "SAME") + bias)
            feats = tf.concat([tf.reduce_mean(images, [1, 2]), tf.reduce_mean(conv, [1, 2])], axis=-1)
            if output_rank == 4:
                return conv
            return {"default": feats, "pooled": feats} if dict_output else feats
    else:
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def call(images):
            return tf.matmul(images, tf.ones([3, features])) + bias

    root.__call__ = call
    tf.saved_model.save(root, str(path))
    return path


def make_keras3_backbone(path: Path, kernel=((1, 0, 0), (0, 1, 0), (0, 0, 1)), *, size: int | None = None,
                         two_outputs: bool = False) -> Path:
    """A SavedModel exported by Keras 3 (``model.export(format="tf_saved_model")``: signatures
    only, no ``__call__``): float32 [b, size, size, 3] -> [b, d], the channel means times
    ``kernel`` [3, d] (by default the means themselves: solid colours are separable; with
    ``((1,), (1,), (1,))`` their sum, alike for the blue and red of ``COLOURS``). ``two_outputs``:
    the channel means are a second output, so the signature has two."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras  # Keras 3, only to build this test input

    kernel = np.array(kernel, np.float32)
    images = keras.Input((size, size, 3))
    means = keras.layers.GlobalAveragePooling2D()(images)
    out = keras.layers.Dense(kernel.shape[1], use_bias=False, name="features")(means)
    model = keras.Model(images, [out, means] if two_outputs else out)
    model.get_layer("features").set_weights([kernel])
    model.export(str(path), format="tf_saved_model", verbose=False)
    return path


def solid_image(colour, size=(24, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, np.float32) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def make_colour_dataset(root: Path, per_class: int = 8, colours=COLOURS, start: int = 0) -> Path:
    for name, colour in colours.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            ext = "png" if i % 2 else "jpg"
            solid_image(colour, seed=hash((name, i)) % 2**32).save(d / f"{name}_{i}.{ext}")
    return root


def run_cli(*args, columns: int = 200):
    """Invoke the tlcli Typer app in-process with a fixed terminal width and no colour."""
    from typer.testing import CliRunner

    from tlcli.cli.commands import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns), "NO_COLOR": "1"})


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


def install_saved_model(src, bundle_dir):
    """Replace the bundle's SavedModel by the one in ``src`` (tlcli.json etc. are kept)."""
    for name in ("saved_model.pb", "fingerprint.pb"):
        (bundle_dir / name).unlink(missing_ok=True)
    for name in ("variables", "assets"):
        shutil.rmtree(bundle_dir / name, ignore_errors=True)
    for p in src.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copyfile)(p, bundle_dir / p.name)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 just now (each bound at once, then released), for
    local worker processes' TF_CONFIG."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def page_sections(text: str) -> dict[str, dict]:
    """An ``html_report`` page read back: {h2 title: {"notes": [paragraph texts], "rows": [[cell
    texts], ...] of its table (the header row first), "links": [href of every link]}}."""
    from html.parser import HTMLParser

    sections: dict[str, dict] = {}

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__()
            self.section, self.tag, self.text = None, None, ""

        def handle_starttag(self, tag, attrs):
            if tag == "h2":
                self.tag, self.text = "h2", ""
            elif self.section is not None:
                if tag == "p" or tag in ("td", "th"):
                    self.tag, self.text = tag, ""
                if tag == "tr":
                    self.section["rows"].append([])
                if tag == "a":
                    self.section["links"].append(dict(attrs)["href"])

        def handle_data(self, data):
            self.text += data

        def handle_endtag(self, tag):
            if tag != self.tag:
                return
            if tag == "h2":
                self.section = sections.setdefault(self.text, {"notes": [], "rows": [], "links": []})
            elif tag == "p":
                self.section["notes"].append(self.text)
            else:
                self.section["rows"][-1].append(self.text)
            self.tag = None

    Reader().feed(text)
    return sections
