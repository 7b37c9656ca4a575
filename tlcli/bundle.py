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
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tlcli import __version__
from tlcli.errors import BundleError, OutputExistsError, TlcliError, UsageError

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
        fix = "free some space on that disk" if disk_full(exc) else "check the folder's permissions"
        raise TlcliError(f"{path}: cannot write ({exc.strerror}); {fix}") from None


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an ``OSError`` or a TensorFlow file error) says the disk or quota is full."""
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__module__.startswith("tensorflow") and any(
        text in str(exc) for text in ("No space left on device", "Disk quota exceeded"))


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
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which refuses a folder with a traceback
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
        raise BundleError(f"{path}: not a regular file ({kind}); the bundle is damaged "
                          "or crafted; retrain it or restore the file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            raise BundleError(f"{path}: larger than {limit // (1 << 20)} MiB, far beyond what tlcli writes; "
                              "the bundle is damaged or crafted; retrain it or restore the file")
    return data


def _real(path: str | os.PathLike) -> Path:
    """The path with every symbolic link and ``..`` resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(path: str | os.PathLike, option: str, data) -> None:
    """Refuse an output ``path`` that is, lies inside or contains one of the image folders
    ``data`` (pairs such as ("DIR", path); None paths are skipped), comparing real paths: outputs
    inside the images are trained on at the next run, and replacing a folder that holds them
    deletes them. Raises ``UsageError``."""
    real = _real(path)
    for name, folder in data:
        if not folder:
            continue
        other = _real(folder)
        why = ("is" if real == other else "lies inside" if other in real.parents
               else "contains" if real in other.parents else None)
        if why:
            raise UsageError(f"{option} {path}: {why} the image folder {name} {folder}; "
                             f"choose another {option}, outside the image folders")


def check_place(out: str | os.PathLike) -> Path:
    """Refuse an ``--out`` that no run may replace or write beside: the root, home or current
    folder or one that contains them, a symbolic link, or one whose parent folder is missing.
    Raises ``UsageError`` or ``TlcliError``."""
    from tlcli.config import DEFAULT_MODEL_DIR

    out = Path(out)
    real = _real(out)
    try:
        home = _real(Path.home())
    except (RuntimeError, KeyError):  # no HOME and no password entry
        home = None
    for name, folder in (("the root folder", Path(real.anchor)), ("the home folder", home),
                         ("the current folder", _real(Path.cwd()))):
        if folder is not None and (real == folder or real in folder.parents):
            why = "is" if real == folder else "contains"
            raise UsageError(f"--out {out}: {why} {name}; give a folder of its own for the model, "
                             f"such as --out {DEFAULT_MODEL_DIR}")
    if out.is_symlink():
        raise UsageError(f"--out {out}: is a symbolic link; give the folder itself ({real})")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise TlcliError(f"--out {out}: parent directory {parent} does not exist; create it first")
    return out


# What a bundle holds, as 'tlcli train' and 'tlcli export' write it; '--force' replaces only a
# folder holding tlcli.json and nothing else, so that it never deletes anything tlcli did not write.
_BUNDLE_FILES = {"saved_model.pb", "fingerprint.pb", LABELS_FILE, META_FILE, SPLITS_FILE, TFLITE_FILE,
                 "training_curves.png"}
_EXPORT_SUFFIXES = (".tflite", ".labels.txt")  # export --output written inside the bundle
_ATOMIC_TMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # left by write_atomic when a crash stopped it
_VARIABLES = re.compile(r"variables\.(index|data-\d+-of-\d+)")
_EVENTS = re.compile(r"events\.out\.tfevents\..+")


def _foreign_in(folder: Path, allowed, prefix: str) -> list[str]:
    """Entries under ``folder`` (recursively) that are links or files whose name ``allowed`` rejects."""
    foreign = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink() or (name in files and not (p.is_file() and allowed(name))):
                foreign.append(f"{prefix}/{rel / name}")
        if len(foreign) >= 3:
            break
    return foreign


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """What the folder ``path`` holds besides a bundle's files (relative names, up to a few);
    [] for a bundle. A bundle's files: saved_model.pb, fingerprint.pb, variables/ (checkpoint
    shards), assets/, labels.txt, tlcli.json, splits.json, training_curves.png, model.tflite and
    other exported ``*.tflite`` / ``*.labels.txt``, TensorBoard folders (event files only) and
    ``write_atomic``'s leftover temp files. Symbolic links are always foreign."""
    foreign = []
    for entry in sorted(Path(path).iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_file():
            if not (name in _BUNDLE_FILES or name.endswith(_EXPORT_SUFFIXES) or _ATOMIC_TMP.fullmatch(name)):
                foreign.append(name)
        elif entry.is_dir():
            allowed = (_VARIABLES.fullmatch if name == "variables" else (lambda n: True) if name == "assets"
                       else _EVENTS.fullmatch)
            foreign += _foreign_in(entry, allowed, name)
        else:
            foreign.append(name)  # a FIFO, socket or device
        if len(foreign) >= 3:
            break
    return foreign


def check_replaceable(out: str | os.PathLike) -> None:
    """Refuse to replace a folder that is not a tlcli bundle (an empty folder is replaceable).
    Raises ``OutputExistsError`` naming what would be lost."""
    out = Path(out)
    try:
        if not any(out.iterdir()):
            return
        foreign = foreign_entries(out) if (out / META_FILE).is_file() else None
    except OSError as exc:
        raise TlcliError(f"--out {out}: cannot read it ({exc.strerror}); choose another --out") from None
    if foreign is None:
        raise OutputExistsError(f"--out {out}: not a tlcli model ({META_FILE} is missing), so --force will "
                                "not replace it; choose another --out")
    if foreign:
        raise OutputExistsError(f"--out {out}: holds {', '.join(foreign)}, which a tlcli model does not, so "
                                "--force will not replace it; move that out, or choose another --out")


def check_output(out: str | os.PathLike, *, force: bool, need_bytes: int = 0, data=()) -> Path:
    """Fail fast, before training, if ``out`` cannot receive a bundle: see ``check_place``,
    ``check_apart`` (with the image folders ``data``) and ``check_replaceable``; its folder must
    be writable with ``need_bytes`` free."""
    out = check_place(out)
    check_apart(out, "--out", data)
    if out.exists() and not force:
        raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it, "
                                "or choose another --out")
    if out.exists() and not out.is_dir():
        raise TlcliError(f"--out {out}: is a file, not a model directory; choose another --out")
    if out.exists():
        check_replaceable(out)
    parent = out.absolute().parent
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".tlcli-probe-")
        probe.close()
    except OSError as exc:
        raise TlcliError(f"--out {out}: cannot write in {parent} ({exc.strerror}); choose another --out") from None
    check_free_space(out, need_bytes)
    return out


def check_free_space(out: str | os.PathLike, need_bytes: int) -> None:
    """Raise ``TlcliError`` when the folder that receives ``out`` has under ``need_bytes`` free."""
    parent = Path(out).absolute().parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise TlcliError(f"--out {out}: only {free / 1e6:.0f} MB free in {parent}, about "
                         f"{need_bytes / 1e6:.0f} MB needed; free some space or choose another --out")


def _sibling(out: str | os.PathLike, kind: str) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.{kind}"


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden directory next to ``out``, to be renamed into place by ``commit``."""
    tmp = _sibling(out, f"tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def lock(out: str | os.PathLike):
    """Hold an exclusive lock on the working folder of ``out`` (``.<name>.lock`` beside it) for
    the block: a second run into the same ``out`` fails at once with ``TlcliError``. The lock
    file is removed on exit. Without ``fcntl`` (Windows) runs are not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = _sibling(out, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise TlcliError(f"--out {out}: cannot create the lock file {path} ({exc.strerror}); "
                             "choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TlcliError(f"--out {out}: another tlcli train is writing this model (it holds {path}); "
                             "wait for it to finish, or choose another --out") from None
        try:  # the run that held it may have removed the file before we got the lock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def clean_stale(out: str | os.PathLike) -> list[str]:
    """Remove what killed runs left beside ``out``: staging folders (``.<name>.tmp-*``) and
    replaced bundles (``.<name>.old-*``). When ``out`` is missing because a run was killed
    between commit's two renames, the newest replaced bundle is renamed back to ``out`` instead.
    Call it only while holding ``lock(out)``: then none of them is in use. Returns what it did,
    as messages."""
    out = Path(out).absolute()
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        stale = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()
                 and not p.is_symlink()]
    except OSError:
        return []
    notes = []
    old = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if old and not out.exists() and not out.is_symlink():
        os.rename(old[-1], out)
        stale.remove(old[-1])
        notes.append(f"restored the previous model at {out}: a run was stopped while replacing it")
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        notes.append(f"removed {len(stale)} folder(s) that stopped runs left beside {out}")
    return notes


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (main thread only; elsewhere a no-op)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def commit(staging: Path, out: str | os.PathLike, *, force: bool) -> Path:
    """Atomically move a finished staging directory to ``out``, replacing it only if ``force``
    and ``check_replaceable`` allows. Once the new bundle is in place the commit has succeeded:
    a Ctrl-C after that only leaves the old copy for the next run's ``clean_stale``."""
    out = Path(out).absolute()
    if not out.exists():
        os.rename(staging, out)
        return out
    if not force:
        raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it")
    check_replaceable(out)  # again: the folder may have changed while the model trained
    old = _sibling(out, f"old-{uuid.uuid4().hex[:8]}")
    done = False
    try:
        with _signals_deferred():  # a Ctrl-C between the two renames would leave no bundle at out
            os.rename(out, old)
            try:
                os.rename(staging, out)
            except OSError:
                os.rename(old, out)
                raise
            done = True
        shutil.rmtree(old, ignore_errors=True)
    except KeyboardInterrupt:
        if not done:
            raise
    return out


def base_meta() -> dict:
    import platform

    return {"format_version": FORMAT_VERSION, "tlcli_version": __version__,
            "python_version": platform.python_version()}
