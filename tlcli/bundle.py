"""The model bundle: a self-describing directory, written atomically.

Layout of ``<out>/``::

    saved_model.pb, variables/   SavedModel; signature ``serving_default``: images -> probabilities
    labels.txt                   one label per line, index = output unit
    tlcli.json                   config, labels, backbone, image size, metrics, versions, skipped files
    splits.json                  the training and validation files (for export calibration / parity)
    model.tflite                 after ``tlcli export --tflite``
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tlcli import __version__
from tlcli.errors import BundleError, OutputExistsError, TlcliError

FORMAT_VERSION = 1
META_FILE = "tlcli.json"
LABELS_FILE = "labels.txt"
SPLITS_FILE = "splits.json"
TFLITE_FILE = "model.tflite"


@dataclass
class Bundle:
    """What predict, export and evaluate need to know about a trained model."""

    path: Path
    labels: list[str]
    image_size: int
    meta: dict = field(default_factory=dict)

    @property
    def max_pixels(self) -> int:
        """The decoded-pixel limit the model was trained with (predict/evaluate/export default)."""
        from tlcli.config import DEFAULT_MAX_PIXELS

        return int(self.meta.get("config", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)

    @property
    def tflite_path(self) -> Path:
        return self.path / TFLITE_FILE

    def splits(self) -> dict:
        """{"train": [[path, label_index], ...], "val": [...]} as recorded at training time."""
        p = self.path / SPLITS_FILE
        if not p.exists():
            return {"train": [], "val": []}
        try:
            splits = json.loads(p.read_text())
            return {"train": list(splits.get("train", [])), "val": list(splits.get("val", []))}
        except (OSError, ValueError, AttributeError) as exc:
            raise BundleError(f"{p}: unreadable or corrupt ({exc}); pass --data DIR instead, or retrain") from None


@contextlib.contextmanager
def tf_readable(path: str | os.PathLike):
    """Yield a path TensorFlow can open for ``path``. TF globs SavedModel paths, so a folder
    named like "runs [old]" is not found; such a path is reached through a plain-named link."""
    path = Path(path).absolute()
    if not any(c in str(path) for c in "[]*?"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tlcli-") as tmp:
        link = Path(tmp) / "model"
        os.symlink(path, link, target_is_directory=True)
        yield link


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` atomically (temp file in the same directory, then rename), with the
    umask's permissions like every other bundle file. Raises ``OSError``; no temp file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    """Write standard JSON (non-finite floats as null; ``tlcli.strict_json``) atomically
    (``write_atomic``)."""
    from tlcli.strict_json import dumps

    try:
        write_atomic(path, (dumps(data, indent=2) + "\n").encode())
    except OSError as exc:
        raise TlcliError(f"{path}: cannot write ({exc.strerror}); check the folder's permissions") from None


def load(model_dir: str | os.PathLike) -> Bundle:
    """Read a bundle's metadata. Raises ``BundleError`` naming the directory and the fix."""
    path = Path(model_dir)
    if not path.exists():
        raise BundleError(f"--model {path}: no such directory; train one with 'tlcli train DIR --out {path}'")
    if not path.is_dir():
        raise BundleError(f"--model {path}: not a directory; give the model directory that 'tlcli train' wrote")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise BundleError(f"--model {path}: not a tlcli model ({META_FILE} is missing); "
                          "give the directory that 'tlcli train' wrote")
    try:
        meta = json.loads(meta_path.read_text())
        labels = list(meta["labels"])
        image_size = int(meta["image_size"])
        version = int(meta.get("format_version", 0))
    except OSError as exc:
        raise BundleError(f"{meta_path}: cannot read it ({exc.strerror}); check its permissions") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{meta_path}: corrupt bundle metadata ({exc}); retrain or restore the file") from None
    if version > FORMAT_VERSION:
        raise BundleError(f"--model {path}: made by a newer tlcli ({meta.get('tlcli_version')}, format "
                          f"{version}); upgrade with 'pip install -U tlcli'")
    return Bundle(path=path, labels=labels, image_size=image_size, meta=meta)


def check_output(out: str | os.PathLike, *, force: bool, need_bytes: int = 0) -> Path:
    """Fail fast, before training, if ``out`` cannot receive a bundle."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it, "
                                "or choose another --out")
    if out.exists() and not out.is_dir():
        raise TlcliError(f"--out {out}: is a file, not a model directory; choose another --out")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise TlcliError(f"--out {out}: parent directory {parent} does not exist; create it first")
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".tlcli-probe-")
        probe.close()
    except OSError as exc:
        raise TlcliError(f"--out {out}: cannot write in {parent} ({exc.strerror}); choose another --out") from None
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise TlcliError(f"--out {out}: only {free / 1e6:.0f} MB free in {parent}, about "
                         f"{need_bytes / 1e6:.0f} MB needed; free some space or choose another --out")
    return out


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden directory next to ``out``, to be renamed into place by ``commit``."""
    out = Path(out).absolute()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def _sigint_deferred():
    """Hold SIGINT until the block ends (main thread only; elsewhere a no-op)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def commit(staging: Path, out: str | os.PathLike, *, force: bool) -> Path:
    """Atomically move a finished staging directory to ``out`` (replacing it only if ``force``)."""
    out = Path(out).absolute()
    if out.exists():
        if not force:
            raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        with _sigint_deferred():  # a Ctrl-C between the two renames would leave no bundle at out
            os.rename(out, old)
            try:
                os.rename(staging, out)
            except OSError:
                os.rename(old, out)
                raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
    return out


def base_meta() -> dict:
    import platform

    return {"format_version": FORMAT_VERSION, "tlcli_version": __version__,
            "python_version": platform.python_version()}
