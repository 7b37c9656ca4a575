"""The folder scan: class folders walked once, every file checked by decoding it as training will."""

from __future__ import annotations

import itertools
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.data import image_files, images, label_csv, layouts, walk
from tlcli.errors import DatasetError
from tlcli.labels import check_label, ordered

FEW_IMAGES = 5  # a class with fewer usable images than this gets a warning


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    digest: str  # content hash of the file, keys the feature cache
    # A multi-label photo's label indices (sorted; ``label`` is the first); empty for one label.
    labels: tuple[int, ...] = ()

    def label_set(self) -> tuple[int, ...]:
        """The photo's label indices: its labels, or its one label."""
        return self.labels or (self.label,)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class ImageFolder:
    """A scanned dataset. ``labels`` are the sorted class folder names (index = output unit)."""

    root: str
    labels: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return count_by_label(self.samples, self.labels)


def count_by_label(samples, labels: list[str]) -> dict[str, int]:
    """Images per label name (every label present, 0 when it has none), in label order; a
    multi-label photo counts under each of its labels."""
    n = {label: 0 for label in labels}
    for s in samples:
        for i in s.label_set():
            n[labels[i]] += 1
    return n


NOT_IN_CLASS_FOLDER = "not in a class folder"


def _class_folders(root, root_p: Path, labels: list[str] | None, option: str):
    """(class folders, loose files, labels) of ``root``, checked as ``scan`` documents."""
    try:
        entries = sorted((e for e in os.scandir(root_p) if not walk.hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"{option} {root}: cannot read this folder ({exc.strerror}); fix its "
                           "permissions") from None
    class_dirs = [Path(e.path) for e in entries if walk.is_dir(e)]
    loose = [Path(e.path) for e in entries if not walk.is_dir(e)]
    if not class_dirs:
        if loose:
            raise DatasetError(f"{option} {root}: {len(loose)} file(s) sit directly in this folder and "
                               f"there are no class folders; move the images into one subfolder per "
                               f"class ({root_p / 'cats'}/..., {root_p / 'dogs'}/...)")
        raise DatasetError(f"{option} {root}: no class folders; put the images in one subfolder per "
                           f"class ({root_p / 'cats'}/..., {root_p / 'dogs'}/...)")
    layouts.check_not_nested(root, class_dirs, option, training=labels is None)
    found = [d.name for d in class_dirs]
    for name in found:
        check_label(name, f"{option} {root}: class folder")
    if labels is None:
        labels = ordered(found)  # the label contract: sorted names, index = output unit
        if len(labels) < 2:
            raise DatasetError(f"{option} {root}: only one class folder ({labels[0]}); a classifier needs "
                               "at least two: add a subfolder of images for each other class")
    else:
        extra = sorted(set(found) - set(labels))
        if extra:
            raise DatasetError(f"{option} {root}: class folder(s) {', '.join(extra)} are not labels of the "
                               f"model ({', '.join(labels)}); rename or remove them")
    return class_dirs, loose, labels


def _listed(root: Path, class_dirs: list[Path], index: dict[str, int], loose: list[Path], check):
    """(the candidate (path, label) of every file in the class folders, walked by ``walk``'s rule
    and deduplicated; the skipped entries of the loose files and of sockets, FIFOs and devices)."""
    walker = walk.Walker(root, check)
    listed: list[tuple[Path, int, bool]] = []
    special: list[Path] = []
    for d in class_dirs:
        for p, linked, kind in walker.files(d):
            if kind == walk.SPECIAL:
                special.append(p)
            else:
                listed.append((p, index[d.name], linked))
    skipped = [Skipped(str(p), NOT_IN_CLASS_FOLDER) for p in loose]
    skipped += [Skipped(str(p), image_files.NOT_REGULAR, image_files.special_kind(p) or "not a file")
                for p in special]
    return walk.dedupe(listed), skipped


def scan(root: str | os.PathLike, *, image_size: int, labels: list[str] | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False,
         progress: Callable[[int, int], None] | None = None, option: str = "DIR",
         keep: images.KeptPixels | None = None, check: Callable[[], None] | None = None,
         split: str | None = None) -> ImageFolder:
    """Scan ``root/<class>/...`` (or the rows of the labels CSV ``root``, ``label_csv``: those of
    ``split`` when given) and check every file before any expensive work.

    Every candidate file is decoded once (threaded) exactly as training will decode it, so a bad
    file is found here and never in the middle of an epoch. Hidden files and folders are ignored.
    ``labels`` fixes the label list (for evaluation or a validation folder); folders must match.
    Unusable files are skipped (and listed in ``skipped`` with the reason), or with ``strict`` all
    named in one DatasetError. Raises DatasetError, naming the folder and the fix, for a missing
    or unreadable folder, no class folders, images directly in ``root``, class folders one level
    too deep (``layouts.check_not_nested``), a single class, or a class folder without a usable
    image. A class with fewer than ``FEW_IMAGES`` images gets a
    warning in ``warnings``. With ``keep`` (of ``image_size``), the model inputs decoded here
    are offered to it while it has room, so that the feature extraction need not decode again.
    ``check`` runs before each folder is listed (``progress`` runs only once files are being
    checked) and may raise to abandon the scan.
    """
    if label_csv.is_label_csv(root):  # labels from a CSV: its rows of ``split`` (all when None)
        rows = label_csv.read(root, option)
        candidates, labels, lines, multi = label_csv.candidates(rows, labels, split, Path(root), option)
        root_p, skipped = Path(root).parent, []
        found = sorted({labels[i] for path, label in candidates for i in multi.get(str(path), (label,))})
    else:
        root_p = check_folder(root, option)
        class_dirs, loose, labels = _class_folders(root, root_p, labels, option)
        found, lines, multi = [d.name for d in class_dirs], {}, {}
        candidates, skipped = _listed(root_p, class_dirs, {name: i for i, name in enumerate(labels)}, loose, check)

    def check(item):
        path, _ = item
        if keep is None or not keep.room():
            data, err = images.check(path, size=image_size, max_pixels=max_pixels)
            # Hash here, in the worker, so that finished files' bytes are not held waiting in order.
            return (None, err) if err else (image_files.digest(data), None)
        data, pixels, err = images.check_pixels(path, size=image_size, max_pixels=max_pixels)
        if err:
            return None, err
        keep.offer(digest := image_files.digest(data), pixels)
        return digest, None

    samples: list[Sample] = []
    bad_in: dict[int, int] = {}
    workers = min(8, 2 * (os.cpu_count() or 1))
    # At most about 1,000 progress reports, so a million files do not mean a million redraws.
    every = max(1, -(-len(candidates) // 1000))
    with ThreadPoolExecutor(workers) as pool:
        try:
            checked = bounded_map(pool, check, candidates, 64 * workers)
            for done, ((path, label), (digest, err)) in enumerate(zip(candidates, checked), 1):
                if progress and (done % every == 0 or done == len(candidates) or done == 1):
                    progress(done, len(candidates))  # may raise to abandon the scan
                if err is not None:
                    line = lines.get(str(path))
                    detail = f"CSV line {line}" + (f": {err.detail}" if err.detail else "") if line else err.detail
                    skipped.append(Skipped(str(path), err.reason, detail))
                    bad_in[label] = bad_in.get(label, 0) + 1
                else:
                    samples.append(Sample(str(path), label, digest, multi.get(str(path), ())))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # don't check the rest first
            raise
    folder = ImageFolder(str(root), list(labels), samples, skipped)
    _check_classes(folder, found, bad_in, root_p, option, strict=strict, lines=lines)
    return folder


def _check_classes(folder: ImageFolder, found, bad_in: dict[int, int], root_p: Path, option: str, *,
                   strict: bool, lines: dict) -> None:
    """Refuse what ``scan`` documents (--strict with unusable files, a class with files but no
    usable image), and add the warnings of labels with no photo and classes with few."""
    root, skipped = folder.root, folder.skipped
    bad = [s for s in skipped if s.reason != NOT_IN_CLASS_FOLDER] if strict else []
    if bad:
        listed = "; ".join(f"{s.path} ({s.reason})" for s in bad)
        raise DatasetError(f"{option} {root}: {len(bad)} unusable file(s) and --strict is set: {listed}. "
                           "Remove or fix them, or drop --strict to skip them")
    for i, (label, n) in enumerate(folder.counts().items()):
        if n == 0 and label in found:
            mine = [s for s in skipped if lines or Path(s.path).is_relative_to(root_p / label)]
            reasons = Counter(s.reason for s in mine)
            why = (f"{bad_in[i]} unusable file(s): " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
                   if bad_in.get(i) else "it is empty")
            where = f"label {label!r} of {root}" if lines else f"{root_p / label}"
            raise DatasetError(f"{option} {where}: no usable image in this class {'' if lines else 'folder '}"
                               f"({why}); add images or remove the {'rows' if lines else 'folder'}",
                               skipped=[s.to_dict() for s in skipped])
        if n == 0:
            folder.warnings.append(f"label '{label}' has no {'row' if lines else 'folder'} in {root}")
        elif n < FEW_IMAGES:
            folder.warnings.append(f"class '{label}' has only {n} image(s); add more for a reliable model")


def check_folder(root: str | os.PathLike, option: str = "DIR") -> Path:
    """The dataset folder as a Path; a DatasetError naming ``option`` if it is missing or a file."""
    root_p = Path(root)
    if label_csv.is_label_csv(root_p) and root_p.is_file():
        return root_p  # a labels CSV (label_csv) in the place of class folders
    if not root_p.exists():
        raise DatasetError(f"{option} {root}: no such directory; give the folder that holds one subfolder "
                           "of images per class")
    if not root_p.is_dir():
        raise DatasetError(f"{option} {root}: not a directory; give a folder with one subfolder per class")
    return root_p


# ---- tf.data -------------------------------------------------------------------------------


def bounded_map(pool, fn, items, window: int):
    """``pool.map(fn, items)`` with at most ``window`` calls submitted ahead of the consumer:
    ``Executor.map`` submits every item at once (a million pending futures, and every finished
    result held until its turn)."""
    pending: deque = deque()
    it = iter(items)
    for item in itertools.islice(it, window):
        pending.append(pool.submit(fn, item))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(it, 1):
            pending.append(pool.submit(fn, item))
        yield result
