"""The one atomic writer and the one safe opener.

Every file tlcli writes (bundle files, exports, reports, cache entries) goes through
``write_atomic``, so a crash or a full disk never leaves a cut-short file under a real name, and
never replaces a good file with a bad one. Every file tlcli reads that someone else may have put
there (images, bundle files, cache entries) is opened with ``open_regular``, so a FIFO, device or
socket is refused instead of blocking or being read without end."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from tlcli.errors import TlcliError, UsageError


class NotRegularFile(OSError):
    """``open_regular`` found something other than a regular file; ``kind`` says what."""

    def __init__(self, path, kind: str):
        super().__init__(f"{path}: not a regular file ({kind})")
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, as shown to users: "a folder", "a FIFO (named pipe)", ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at ``path`` (links followed) and its stat.
    Opened without blocking (a FIFO would wait for a writer forever) and checked on the opened
    descriptor, so a file swapped for a FIFO or device after any earlier check is refused too.
    Raises the ``OSError`` of the open, or ``NotRegularFile`` (the descriptor closed)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(path, file_kind(st.st_mode))
    return fd, st


def temp_name(path: Path) -> Path:
    """The temporary file ``write_atomic`` writes before the rename: ``.<name>.<8 hex>.tmp``
    beside ``path`` (``bundle.foreign_entries`` recognises what a crash leaves)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, flushed to
    the disk (fsync), then renamed over ``path``. The file gets the umask's permissions (not
    ``mkstemp``'s 0600), like any other file the user creates. Raises ``OSError``; no temporary
    file is left behind."""
    write_together([(path, payload)])


def write_together(items) -> None:
    """Write each (path, payload) of ``items`` as ``write_atomic`` does, all or none: every one is
    written to its temporary file first, and only then are they renamed into place, in order.
    A failure (a full disk, a folder in place of a file) leaves every path as it was, as far as
    the renames go (they rarely fail once the files are written). Raises ``OSError`` whose
    ``filename`` is the path that could not be written; no temporary file is left behind."""
    staged: list[Path] = []
    path = None
    try:
        for path, payload in items:
            tmp = temp_name(Path(path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            staged.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())  # else a crash after the rename can leave an empty file
        for (path, _), tmp in zip(items, staged):
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp in staged:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(exc, OSError) and path is not None:
            exc.filename = str(path)
        raise


def write_file(path: str | os.PathLike, payload: bytes) -> None:
    """``write_atomic``, raising ``TlcliError`` instead: one line naming the file and the fix."""
    try:
        write_atomic(path, payload)
    except OSError as exc:
        fix = "free some space on that disk" if disk_full(exc) else "check the folder's permissions"
        raise TlcliError(f"{path}: cannot write ({exc.strerror}); {fix}") from None


def write_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as standard JSON (non-finite floats as null; ``tlcli.strict_json``), indented,
    with ``write_file``. Raises ``TlcliError``."""
    from tlcli.strict_json import dumps

    write_file(path, (dumps(data, indent=2) + "\n").encode())


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an ``OSError`` or a TensorFlow file error) says the disk or quota is full."""
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__module__.startswith("tensorflow") and any(
        text in str(exc) for text in ("No space left on device", "Disk quota exceeded"))


def make_folder(path: Path, option: str) -> Path:
    """Create ``path`` (and its parents) for ``option`` and check it is writable; one-line
    ``UsageError`` naming the option otherwise."""
    from tlcli.errors import UsageError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create the folder ({exc.strerror}); choose another") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: not writable; choose another folder")
    return path


def real_path(path: str | os.PathLike) -> Path:
    """The path with every symbolic link and ``..`` resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(path: str | os.PathLike, option: str, data, *, error: type[TlcliError] = UsageError) -> None:
    """Refuse an output ``path`` that is, lies inside or contains one of the image folders
    ``data`` (pairs such as ("DIR", path); None paths are skipped), comparing real paths: outputs
    inside the images are trained on at the next run, and replacing a folder that holds them
    deletes them. Raises ``error`` (the class the option's other placement errors use)."""
    real = real_path(path)
    for name, folder in data:
        if not folder:
            continue
        other = real_path(folder)
        why = ("is" if real == other else "lies inside" if other in real.parents
               else "contains" if real in other.parents else None)
        if why:
            raise error(f"{option} {path}: {why} the image folder {name} {folder}; "
                        f"choose another {option}, outside the image folders")
