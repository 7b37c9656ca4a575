"""The one folder walker: what ``train``'s scan and ``predict``'s folder arguments list.

One rule for both. Hidden entries (a leading dot, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``)
are ignored. A symlinked folder is followed only when it leads outside the folder being walked:
one that points back into it, or to a folder above it, would loop or list images twice, so it is
ignored. Every folder is listed at most once and the walk is iterative, so any depth works.
Sockets, FIFOs and devices are listed but never opened (reading them would block or never end);
broken links are listed, so that each is reported.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from tlcli.errors import DatasetError

FILE, SPECIAL = "file", "special"  # the kinds of entry ``Walker.files`` lists


def hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder (symlinks followed); False for a broken link or a loop."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


class Walker:
    """Lists the files under folders of ``root`` by the module's rule.

    ``check`` runs before each folder is listed and may raise to abandon the walk. A folder that
    cannot be listed raises DatasetError, or with ``unreadable`` (a list) is appended to it and
    passed over."""

    def __init__(self, root: str | os.PathLike, check: Callable[[], None] | None = None, *,
                 unreadable: list[Path] | None = None):
        self.root = os.path.realpath(root)
        self.check = check
        self.unreadable = unreadable
        self.seen_dirs: set = set()

    def files(self, folder: Path) -> list[tuple[Path, bool, str]]:
        """(path, reached through a symlink, ``FILE`` or ``SPECIAL``) for every visible entry
        under ``folder`` that is not a folder, in sorted depth-first order."""
        out: list[tuple[Path, bool, str]] = []
        stack = [(folder, folder.is_symlink())]
        while stack:
            if self.check is not None:
                self.check()
            d, linked = stack.pop()
            try:
                st = os.stat(d)
                key = (st.st_dev, st.st_ino)  # not realpath: that costs a stat per level, per folder
            except OSError:
                key = os.path.realpath(d)
            if key in self.seen_dirs:
                continue
            self.seen_dirs.add(key)
            subdirs = []
            for p, link, kind in self._entries(d):
                if kind == "dir":
                    if link:
                        target = os.path.realpath(p)
                        if inside(target, self.root) or inside(self.root, target):
                            continue  # a loop, or a second route to images already walked
                    subdirs.append((p, linked or link))
                elif kind == SPECIAL:
                    out.append((p, linked or link, SPECIAL))
                elif kind == FILE or link:  # a broken link (or a loop) is listed, so it is reported
                    out.append((p, linked or link, FILE))
            stack += reversed(subdirs)  # depth first, in name order, like the recursive walk
        return out

    def _entries(self, d: Path) -> list[tuple[Path, bool, str]]:
        """(path, is a symlink, "dir" | FILE | SPECIAL | "missing") of ``d``'s visible entries."""
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            if self.unreadable is not None:
                self.unreadable.append(d)
                return []
            raise DatasetError(f"{d}: cannot read this folder ({exc.strerror}); fix its permissions "
                               "or move it out of the dataset") from None
        out = []
        for e in entries:
            if hidden(e.name):
                continue
            try:  # stat, not DirEntry.is_dir: it says why (a symlink loop raises ELOOP)
                mode = os.stat(e.path).st_mode
                kind = "dir" if stat.S_ISDIR(mode) else FILE if stat.S_ISREG(mode) else SPECIAL
            except OSError as exc:
                # Missing or looping: a broken link. Anything else (no permission) is listed as a
                # file, so that reading it reports why.
                kind = "missing" if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR) else FILE
            out.append((Path(e.path), e.is_symlink(), kind))
        return out


def dedupe(found: list[tuple[Path, int, bool]]) -> list[tuple[Path, int]]:
    """One (path, label) per real file of (path, label, reached through a symlink): the one at
    its real location if any, else the first route."""
    if not any(linked for _, _, linked in found):
        return [(path, label) for path, label, _ in found]  # no symlinks: every path is distinct
    best: dict[str, tuple[int, Path, int, bool]] = {}
    for order, (path, label, linked) in enumerate(found):
        key = os.path.realpath(path) if os.path.exists(path) else str(path)
        if key not in best or (best[key][3] and not linked):
            best[key] = (order, path, label, linked)
    return [(path, label) for _, path, label, _ in sorted(best.values(), key=lambda v: v[0])]


def expand(paths: Iterable[str | os.PathLike]) -> list[str]:
    """``predict``'s inputs: files as given, folders walked (the module's rule). Never raises: a
    missing path, a folder with no files and a folder that cannot be listed are kept, so that
    each gets its own error; a file reached twice through symlinks is listed once."""
    out: list[str] = []
    for p in paths:
        p = str(p)
        if not os.path.isdir(p):  # os.path: False for any OSError (no permission), no exception
            out.append(p)
            continue
        unreadable: list[Path] = []
        listed = Walker(p, unreadable=unreadable).files(Path(p))
        found = [str(f) for f, _ in dedupe([(f, 0, linked) for f, linked, _ in listed])]
        out += found + [str(d) for d in unreadable] or [p]
    return out
