"""The one atomic writer: every file tlcli writes (bundle files, exports, reports, cache entries)
goes through ``write_atomic``, so a crash or a full disk never leaves a cut-short file under a
real name, and never replaces a good file with a bad one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tlcli.errors import TlcliError


def temp_name(path: Path) -> Path:
    """The temporary file ``write_atomic`` writes before the rename: ``.<name>.<8 hex>.tmp``
    beside ``path`` (``bundle.foreign_entries`` recognises what a crash leaves)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, flushed to
    the disk (fsync), then renamed over ``path``. The file gets the umask's permissions (not
    ``mkstemp``'s 0600), like any other file the user creates. Raises ``OSError``; no temporary
    file is left behind."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # else a crash after the rename can leave an empty file
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
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
