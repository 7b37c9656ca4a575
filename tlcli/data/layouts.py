"""The dataset layouts DIR may have besides one folder per class: split folders
(``DIR/{train,val|valid|validation,test}/<class>/``, as Ultralytics and many downloaded sets lay
them out), used as the splits; and class folders one level too deep (``DIR/<group>/<class>/``),
refused, since their groups would silently become the labels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tlcli.data import walk
from tlcli.errors import DatasetError, UsageError

# A split folder's name (matched without regard to case) -> its role.
SPLIT_ROLES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class SplitFolders:
    """DIR laid out in split folders: ``train`` (the class folders trained on), ``val`` (the
    validation images, in the place of --val-dir) and ``test`` (the final report), each a class
    folder tree; ``val`` and ``test`` may be None."""

    root: str
    train: Path
    val: Path | None = None
    test: Path | None = None

    def describe(self) -> str:
        """The one line that says how the folders are used."""
        roles = [f"{self.train.name}/ for training"]
        roles += [f"{self.val.name}/ for validation"] if self.val else []
        roles += [f"{self.test.name}/ for a final test report"] if self.test else []
        return f"DIR {self.root}: split folders found; using {', '.join(roles)}"


def _folders(path: Path) -> list[os.DirEntry] | None:
    """The visible folders in ``path`` (links followed), sorted by name; None if it cannot be read."""
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not walk.hidden(e.name) and walk.is_dir(e)), key=lambda e: e.name)
    except OSError:
        return None


def split_folders(root: str | os.PathLike, *, val_dir: str | os.PathLike | None = None) -> SplitFolders | None:
    """The split folders of ``root``, or None when it is not laid out in them: every visible
    folder of ``root`` must be named for a role of ``SPLIT_ROLES`` (case aside), one of them
    ``train``, and ``train`` must hold folders (the classes; a ``train`` of images is a class).
    Loose files beside the split folders are ignored. Raises ``DatasetError`` for two folders of
    one role (``val`` and ``validation``), and ``UsageError`` for a ``val_dir`` (--val-dir) when
    ``root`` has a validation folder of its own."""
    found = _folders(Path(root))
    if not found:
        return None
    by_role: dict[str, list[str]] = {}
    for entry in found:
        role = SPLIT_ROLES.get(entry.name.lower())
        if role is None:
            return None
        by_role.setdefault(role, []).append(entry.name)
    if "train" not in by_role or not _folders(Path(root) / by_role["train"][0]):
        return None
    for role, names in by_role.items():
        if len(names) > 1:
            raise DatasetError(f"DIR {root}: holds {' and '.join(n + '/' for n in names)}, two {role} folders; "
                               "keep one of them")
    folders = {role: Path(root) / names[0] for role, names in by_role.items()}
    if val_dir and "val" in folders:
        raise UsageError(f"--val-dir {val_dir}: DIR {root} has its own validation folder {folders['val']}; drop "
                         f"--val-dir, or give {folders['train']} as DIR to validate on --val-dir")
    return SplitFolders(str(root), folders["train"], folders.get("val"), folders.get("test"))


def check_not_nested(root: str | os.PathLike, class_dirs: list[Path], option: str = "DIR", *,
                     training: bool = True) -> None:
    """Refuse (``DatasetError``) class folders one level too deep: when two or more of
    ``class_dirs`` hold folders and no file, and they share two or more folder names, the classes
    may be the folders inside them (one shared name, such as ``cats/images`` and ``dogs/images``,
    is a common way to store a class, and passes). Folders named like splits
    (``DIR/train/{ants,bees}``, ``DIR/val/{ants,bees}``) certainly hold the classes: the message
    names the folder to give (for ``training`` a train folder, else a test or validation one) and
    the split layout. Other folders (``{2019,2020}/{cats,dogs}`` or ``cats/{day,night}``) can be
    read either way: the message gives the fix for each reading."""
    inner: dict[str, list[str]] = {}
    for d in class_dirs:
        names = _only_folders(d)
        if names:
            inner[d.name] = names
    shared = sorted(set.intersection(*(set(n) for n in inner.values()))) if len(inner) >= 2 else []
    if len(shared) < 2:
        return
    groups = sorted(inner)
    if not any(g.lower() in SPLIT_ROLES for g in groups):  # two readings: say both fixes
        raise DatasetError(
            f"{option} {root}: the folders {', '.join(g + '/' for g in groups[:4])} hold only the folders "
            f"{', '.join(shared[:4])}, so the classes are ambiguous; if {', '.join(shared[:4])} are the classes, "
            f"give one of {', '.join(g + '/' for g in groups[:4])} as {option}; if "
            f"{', '.join(groups[:4])} are, move each one's images out of its sub-folders")
    roles = ("train",) if training else ("test", "val")
    first = Path(root) / min(groups, key=lambda g: (roles.index(SPLIT_ROLES[g.lower()])
                                                   if SPLIT_ROLES.get(g.lower()) in roles else len(roles), g))
    shown = ", ".join(f"{g}/" for g in groups[:4]) + (", ..." if len(groups) > 4 else "")
    classes = ", ".join(shared[:4]) + (", ..." if len(shared) > 4 else "")
    hint = ("; or keep only train/, val/ (or valid/, validation/) and test/ in it, which tlcli reads as the "
            "splits" if training and option == "DIR" and any(g.lower() in SPLIT_ROLES for g in groups) else "")
    raise DatasetError(f"{option} {root}: the folders {shown} hold only folders ({classes}): those are the "
                       f"classes, one level down, not {', '.join(groups[:4])}; give one of them as {option}, "
                       f"such as {first}{hint}")


def _only_folders(folder: Path) -> list[str]:
    """The names of the visible folders in ``folder`` when it holds folders and no file; else []."""
    try:
        with os.scandir(folder) as it:
            names = []
            for e in it:
                if walk.hidden(e.name):
                    continue
                if not walk.is_dir(e):
                    return []  # a file of its own: a class folder, whatever else it holds
                names.append(e.name)
    except OSError:
        return []  # the scan reports it
    return names
