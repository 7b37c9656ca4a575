"""Where a bundle may be written, and writing it there safely.

``check_output`` refuses an ``--out`` that is not a bundle tlcli wrote (unless it is new) or that
no run may replace; ``parents_made`` creates its missing parent folders for a run (and removes
them again if the run leaves nothing there); ``staging_dir`` gives the sibling folder a run writes
into, ``lock`` keeps two runs off one ``--out``, and ``commit`` swaps the finished staging folder
in, so an interrupted run leaves any previous bundle intact. ``clean_stale`` removes what a
killed run left. Every refusal of an ``--out`` is a ``TlcliError`` (exit 1).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from tlcli.bundle.format import LABELS_FILE, META_FILE, SPLITS_FILE, TFLITE_FILE
from tlcli.errors import OutputExistsError, TlcliError
from tlcli.files import check_apart, real_path


def check_place(out: str | os.PathLike) -> Path:
    """Refuse an ``--out`` that no run may replace or write beside: the root, home or current
    folder or one that contains them, or a symbolic link. Raises ``TlcliError``."""
    from tlcli.config import DEFAULT_MODEL_DIR

    out = Path(out)
    real = real_path(out)
    try:
        home = real_path(Path.home())
    except (RuntimeError, KeyError):  # no HOME and no password entry
        home = None
    for name, folder in (("the root folder", Path(real.anchor)), ("the home folder", home),
                         ("the current folder", real_path(Path.cwd()))):
        if folder is not None and (real == folder or real in folder.parents):
            why = "is" if real == folder else "contains"
            raise TlcliError(f"--out {out}: {why} {name}; give a folder of its own for the model, "
                             f"such as --out {DEFAULT_MODEL_DIR}")
    if out.is_symlink():
        raise TlcliError(f"--out {out}: is a symbolic link; give the folder itself ({real})")
    return out


@contextlib.contextmanager
def parents_made(out: str | os.PathLike):
    """Create the missing parent folders of ``out`` for the block, as ``mkdir -p`` does (as Keras
    and ``tf.saved_model.save`` do). When the block ends, those of them that are empty go again:
    nothing is left of a run that ended before its bundle was in (a run stopped with progress kept
    for ``--resume`` keeps the folders that hold it). Raises ``TlcliError`` when one cannot be
    created (a file in the way, no permission)."""
    parent = Path(out).absolute().parent
    made = []  # the deepest first
    missing = parent
    while not (missing.exists() or missing.is_symlink()):
        made.append(missing)
        missing = missing.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        made = [d for d in made if d.is_dir()]
        _remove_empty(made)
        raise TlcliError(f"--out {out}: cannot create its folder {parent} ({exc.strerror or exc}); create it, "
                         "or choose another --out") from None
    try:
        yield
    finally:
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return

# What a bundle holds, as 'tlcli train' and 'tlcli export' write it; '--force' replaces only a
# folder holding tlcli.json and nothing else, so that it never deletes anything tlcli did not write.
_BUNDLE_FILES = {"saved_model.pb", "fingerprint.pb", LABELS_FILE, META_FILE, SPLITS_FILE, TFLITE_FILE,
                 "model.onnx", "training_curves.png"}
_EXPORT_SUFFIXES = (".tflite", ".onnx", ".labels.txt")  # export --output written inside the bundle
# The folder of `tlcli export --format openvino` (deploy/formats): IR files, and write_atomic's leftovers.
OPENVINO_DIR = "openvino"
_OPENVINO = re.compile(r"[^/]+\.(xml|bin)|\..+\.[0-9a-f]{8}\.tmp")
_ATOMIC_TMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # left by files.write_atomic when a crash stopped it
_VARIABLES = re.compile(r"variables\.(index|data-\d+-of-\d+)")
_EVENTS = re.compile(r"events\.out\.tfevents\..+")


def _foreign_in(folder: Path, allowed, prefix: str) -> list[str]:
    """Entries under ``folder`` (recursively) that are links or files whose name ``allowed`` rejects."""
    foreign = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in dirs + names:
            p = Path(root) / name
            if p.is_symlink() or (name in names and not (p.is_file() and allowed(name))):
                foreign.append(f"{prefix}/{rel / name}")
        if len(foreign) >= 3:
            break
    return foreign


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """What the folder ``path`` holds besides a bundle's files (relative names, up to a few);
    [] for a bundle. A bundle's files: saved_model.pb, fingerprint.pb, variables/ (checkpoint
    shards), assets/, labels.txt, tlcli.json, splits.json, training_curves.png, model.tflite,
    model.onnx, openvino/ (IR files) and other exported ``*.tflite`` / ``*.onnx`` /
    ``*.labels.txt``, TensorBoard folders (event files only) and
    ``files.write_atomic``'s leftover temp files. Symbolic links are always foreign."""
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
                       else _OPENVINO.fullmatch if name == OPENVINO_DIR else _EVENTS.fullmatch)
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
    check_apart(out, "--out", data, error=TlcliError)
    if out.exists() and not out.is_dir():
        raise TlcliError(f"--out {out}: is a file, not a model directory; choose another --out")
    if out.exists():
        check_replaceable(out)  # first: --force is suggested only where it would work
    if out.exists() and not force:
        raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it, "
                                "or choose another --out")
    parent = out.absolute().parent
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".tlcli-probe-")
        probe.close()
    except OSError as exc:
        raise TlcliError(f"--out {out}: cannot write in {parent} ({exc.strerror}); choose another --out") from None
    check_free_space(out, need_bytes)
    return out


def space_needed(backbone_path: str | os.PathLike, *, fine_tune: bool) -> int:
    """Bytes a run writes beside --out: the bundle (about the backbone's size, plus a margin for
    metadata and curves) and, with fine-tuning, the resumable checkpoints: the last and the best,
    each holding the weights and Adam's two moments."""
    size = sum(f.stat().st_size for f in Path(backbone_path).rglob("*") if f.is_file())  # links followed
    return size + 20_000_000 + (2 * 3 * size if fine_tune else 0)


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
def lock(out: str | os.PathLike, *, option: str = "--out", required: bool = True):
    """Hold an exclusive lock on the working folder of ``out`` (``.<name>.lock`` beside it) for
    the block: a second train or export of the same ``out`` fails at once with ``TlcliError``
    (naming ``option``). The lock file is removed on exit. Without ``fcntl`` (Windows) runs are
    not serialised, nor, unless ``required``, where the lock file cannot be created (a read-only
    folder: nothing else can write there either)."""
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
            if not required and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                yield
                return
            raise TlcliError(f"{option} {out}: cannot create the lock file {path} ({exc.strerror}); "
                             f"choose another {option}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TlcliError(f"{option} {out}: another tlcli train or export is writing this model (it holds "
                             f"{path}); wait for it to finish" + (", or choose another --out" if option == "--out"
                                                                  else "")) from None
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
