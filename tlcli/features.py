"""Feature vectors of the frozen backbone, computed once and cached on disk.

Entries are keyed by the backbone (handle, or local path + file times), the image size, the
decoder version and each file's content hash, so re-runs, new head settings and renamed files
reuse them, and an edited image gets a new entry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from tlcli.errors import DatasetError
from tlcli.progress import Callback, Event, silent

DECODER_VERSION = 2  # bump whenever decoding or preprocessing changes


def default_cache_dir() -> Path:
    env = os.environ.get("TLCLI_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tlcli"


class FeatureCache:
    """One .npy file per (model, image) under ``root/features/<model key>/``."""

    def __init__(self, root: str | os.PathLike | None, model_key: str):
        self.dir = Path(root or default_cache_dir()) / "features" / f"{model_key}-d{DECODER_VERSION}"

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        p = self._path(digest)
        try:
            return np.load(p)
        except (OSError, ValueError):
            return None  # absent or damaged: recompute

    def put(self, digest: str, vec: np.ndarray) -> None:
        p = self._path(digest)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(vec, np.float32))
            os.replace(tmp, p)
        except OSError:
            pass  # the cache is an optimisation; a read-only disk must not stop training


class NoCache:
    """For features that must not be cached (a backbone being fine-tuned)."""

    def get(self, digest: str):
        return None

    def put(self, digest: str, vec) -> None:
        pass


def extract(samples, *, extractor, cache: FeatureCache | NoCache, image_size: int, batch_size: int,
            max_pixels: int, progress: Callback = silent, task: str = "extract") -> tuple[np.ndarray, int]:
    """Features [n, d] for ``samples`` (objects with .path and .digest), running the backbone only
    on files missing from the cache, in one streamed tf.data pass. Returns (features, extracted)."""
    from tlcli._tf import keras
    from tlcli.data import image_dataset

    found = [cache.get(s.digest) for s in samples]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        ds = image_dataset([samples[i].path for i in todo], image_size, batch_size=batch_size,
                           max_pixels=max_pixels, unreadable_fill=np.nan)
        progress(Event("start", task, total=len(todo)))
        done = [0]

        class Report(keras().callbacks.Callback):
            def on_predict_batch_end(self, batch, logs=None):
                step = min(batch_size, len(todo) - done[0])
                done[0] += step
                progress(Event("advance", task, completed=done[0], total=len(todo)))

        out = extractor.predict(ds, verbose=0, callbacks=[Report()])
        for i, vec in zip(todo, out):
            if not np.isfinite(vec).all():  # the file could not be read any more (see image_dataset)
                raise DatasetError(f"{samples[i].path}: became unreadable after the file check (changed or "
                                   "removed during training?); fix or remove it and run again")
            found[i] = vec
            cache.put(samples[i].digest, vec)
        progress(Event("end", task, total=len(todo), completed=len(todo)))
    if not samples:
        return np.zeros((0, 0), np.float32), 0
    return np.stack(found).astype(np.float32), len(todo)
