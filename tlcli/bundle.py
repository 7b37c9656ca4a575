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
FINGERPRINT_FILE = "fingerprint.pb"  # written with the SavedModel


@dataclass
class Bundle:
    """What predict, export and evaluate need to know about a trained model, validated by
    ``load``: ``labels`` are >= 2 distinct one-line strings, ``image_size`` is in [8, 1024],
    ``meta`` is the parsed tlcli.json (its ``config`` and ``exports`` checked too), and
    ``recorded_splits`` is the parsed splits.json (None when the bundle has none)."""

    path: Path
    labels: list[str]
    image_size: int
    meta: dict = field(default_factory=dict)
    recorded_splits: dict | None = None

    @property
    def max_pixels(self) -> int:
        """The decoded-pixel limit the model was trained with (predict/evaluate/export default)."""
        from tlcli.config import DEFAULT_MAX_PIXELS

        return int(self.meta.get("config", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)

    @property
    def tflite_path(self) -> Path:
        return self.path / TFLITE_FILE

    def splits(self) -> dict:
        """{"train": [[path, label_index], ...], "val": [...]} as recorded at training time
        (validated by ``load``; empty lists when the bundle has no splits.json)."""
        s = self.recorded_splits or {}
        return {"train": list(s.get("train", [])), "val": list(s.get("val", []))}

    def fingerprint(self) -> str | None:
        """A digest of the SavedModel (its ``fingerprint.pb``, which hashes the graph and the
        variables), or None when the bundle has none. Export embeds it in the .tflite, so that
        another bundle's file is recognised even with the same labels."""
        import hashlib

        p = self.path / FINGERPRINT_FILE
        if not p.exists():
            return None
        return hashlib.blake2b(read_regular(p, 1 << 20), digest_size=16).hexdigest()

    def labels_text(self) -> str:
        """labels.txt's content, from the validated labels: one per line, "\\n"-terminated."""
        return "".join(f"{label}\n" for label in self.labels)


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
    """Read and validate a bundle's metadata (``schema.check_meta``, ``schema.check_splits``):
    every file is opened only if it is a regular file, and read up to a size bound. Raises
    ``BundleError``, one line naming the file, what is wrong and the fix."""
    from tlcli import schema

    path = Path(model_dir)
    if not path.exists():
        raise BundleError(f"--model {path}: no such directory; train one with 'tlcli train DIR --out {path}'")
    if not path.is_dir():
        raise BundleError(f"--model {path}: not a directory; give the model directory that 'tlcli train' wrote")
    meta_path = path / META_FILE
    if not meta_path.exists() and not meta_path.is_symlink():
        raise BundleError(f"--model {path}: not a tlcli model ({META_FILE} is missing); "
                          "give the directory that 'tlcli train' wrote")
    meta = schema.read_json(meta_path, schema.MAX_META_BYTES, "corrupt bundle metadata",
                            "retrain or restore the file")
    version = meta.get("format_version", 0) if isinstance(meta, dict) else 0
    if type(version) is int and version > FORMAT_VERSION:
        raise BundleError(f"--model {path}: made by a newer tlcli ({schema.show(meta.get('tlcli_version'))}, "
                          f"format {version}); upgrade with 'pip install -U tlcli'")
    labels, image_size = schema.check_meta(meta, meta_path)
    splits_path = path / SPLITS_FILE
    splits = None
    if splits_path.exists() or splits_path.is_symlink():
        splits = schema.check_splits(schema.read_json(splits_path, schema.MAX_SPLITS_BYTES, *schema.SPLITS_FIX),
                                     len(labels), splits_path)
    return Bundle(path=path, labels=labels, image_size=image_size, meta=meta, recorded_splits=splits)


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of ``path`` (symlinks followed) if it is a regular file of at most ``limit``
    bytes. A FIFO, socket or device is refused without blocking on it or reading it. Raises
    ``BundleError`` naming the file."""
    import stat

    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; the bundle is incomplete; retrain it or restore the file") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: not a regular file (a FIFO, device or socket); the bundle is damaged "
                              "or crafted; retrain it or restore the file")
        data = f.read(limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            raise BundleError(f"{path}: larger than {limit // (1 << 20)} MiB, far beyond what tlcli writes; "
                              "the bundle is damaged or crafted; retrain it or restore the file")
    return data


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
