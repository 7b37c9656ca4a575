"""Datasets: scan class folders with a fast pre-pass, split, and build tf.data pipelines."""

from __future__ import annotations

import errno
import itertools
import os
import random
import stat
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tlcli import images, schema
from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.errors import DatasetError, Interrupted
from tlcli.progress import Callback, Counts, Warn, counter, silent
from tlcli.progress import Skipped as SkippedFiles

if TYPE_CHECKING:
    import threading

    from tlcli.config import TrainConfig

FEW_IMAGES = 5  # a class with fewer usable images than this gets a warning


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    digest: str  # content hash of the file, keys the feature cache


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
    """Images per label name (every label present, 0 when it has none), in label order."""
    n = {label: 0 for label in labels}
    for s in samples:
        n[labels[s.label]] += 1
    return n


NOT_IN_CLASS_FOLDER = "not in a class folder"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder (symlinks followed); False for a broken link or a loop."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


class _Walker:
    """Lists the files of class folders, following symlinks safely.

    A symlinked directory is followed only when it leads outside the dataset: one that points
    back into it, or to a folder above it, would loop or list images twice (possibly under
    another class), so it is ignored. Every directory is listed at most once, and the walk is
    iterative, so any depth works. A file reached twice (a symlink to a file already in the
    dataset) counts once, at its real location when that is in the dataset. Sockets, FIFOs and
    devices are never opened (reading them would block or never end): they are listed in
    ``special`` as (path, what it is), for the skipped list. ``check`` runs before each folder
    is listed and may raise to abandon the walk."""

    def __init__(self, root: Path, check: Callable[[], None] | None = None):
        self.root = os.path.realpath(root)
        self.check = check
        self.seen_dirs: set = set()
        self.special: list[tuple[Path, str]] = []

    def files(self, class_dir: Path) -> list[tuple[Path, bool]]:
        """(path, reached through a symlink) for every non-hidden file under ``class_dir``, in
        sorted depth-first order."""
        out: list[tuple[Path, bool]] = []
        stack = [(class_dir, class_dir.is_symlink())]
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
                        if _inside(target, self.root) or _inside(self.root, target):
                            continue  # a loop, or a second route to images already in the dataset
                    subdirs.append((p, linked or link))
                elif kind == "file":
                    out.append((p, linked or link))
                elif kind == "special":
                    self.special.append((p, images.special_kind(p) or "not a file"))
                elif link:
                    out.append((p, True))  # broken (or a symlink loop): listed, so that it is reported
            stack += reversed(subdirs)  # depth first, in name order, like the recursive walk
        return out

    @staticmethod
    def _entries(d: Path) -> list[tuple[Path, bool, str]]:
        """(path, is a symlink, "dir" | "file" | "special" | "missing") of ``d``'s visible entries."""
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise DatasetError(f"{d}: cannot read this folder ({exc.strerror}); fix its permissions "
                               "or move it out of the dataset") from None
        out = []
        for e in entries:
            if _hidden(e.name):
                continue
            try:  # stat, not DirEntry.is_dir: it says why (a symlink loop raises ELOOP)
                mode = os.stat(e.path).st_mode
                kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special"
            except OSError as exc:
                # Missing or looping: a broken link. Anything else (no permission) is listed as a
                # file, so that reading it reports why.
                kind = "missing" if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR) else "file"
            out.append((Path(e.path), e.is_symlink(), kind))
        return out


def _dedupe(found: list[tuple[Path, int, bool]]) -> list[tuple[Path, int]]:
    """One entry per real file: the one at its real location if any, else the first route."""
    if not any(linked for _, _, linked in found):
        return [(path, label) for path, label, _ in found]  # no symlinks: every path is distinct
    best: dict[str, tuple[int, Path, int, bool]] = {}
    for order, (path, label, linked) in enumerate(found):
        key = os.path.realpath(path) if os.path.exists(path) else str(path)
        if key not in best or (best[key][3] and not linked):
            best[key] = (order, path, label, linked)
    return [(path, label) for _, path, label, _ in sorted(best.values(), key=lambda v: v[0])]


def _class_folders(root, root_p: Path, labels: list[str] | None, option: str):
    """(class folders, loose files, labels) of ``root``, checked as ``scan`` documents."""
    try:
        entries = sorted((e for e in os.scandir(root_p) if not _hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"{option} {root}: cannot read this folder ({exc.strerror}); fix its "
                           "permissions") from None
    class_dirs = [Path(e.path) for e in entries if _is_dir(e)]
    loose = [Path(e.path) for e in entries if not _is_dir(e)]
    if not class_dirs:
        if loose:
            raise DatasetError(f"{option} {root}: {len(loose)} file(s) sit directly in this folder and "
                               f"there are no class folders; move the images into one subfolder per "
                               f"class ({root_p / 'cats'}/..., {root_p / 'dogs'}/...)")
        raise DatasetError(f"{option} {root}: no class folders; put the images in one subfolder per "
                           f"class ({root_p / 'cats'}/..., {root_p / 'dogs'}/...)")
    found = [d.name for d in class_dirs]
    for name in found:
        check_label(name, f"{option} {root}: class folder")
    if labels is None:
        labels = found
        if len(labels) < 2:
            raise DatasetError(f"{option} {root}: only one class folder ({labels[0]}); a classifier needs "
                               "at least two: add a subfolder of images for each other class")
    else:
        extra = sorted(set(found) - set(labels))
        if extra:
            raise DatasetError(f"{option} {root}: class folder(s) {', '.join(extra)} are not labels of the "
                               f"model ({', '.join(labels)}); rename or remove them")
    return class_dirs, loose, labels


def scan(root: str | os.PathLike, *, image_size: int, labels: list[str] | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False,
         progress: Callable[[int, int], None] | None = None, option: str = "DIR",
         keep: images.KeptPixels | None = None, check: Callable[[], None] | None = None) -> ImageFolder:
    """Scan ``root/<class>/...`` and check every file before any expensive work.

    Every candidate file is decoded once (threaded) exactly as training will decode it, so a bad
    file is found here and never in the middle of an epoch. Hidden files and folders are ignored.
    ``labels`` fixes the label list (for evaluation or a validation folder); folders must match.
    Unusable files are skipped (and listed in ``skipped`` with the reason), or with ``strict`` all
    named in one DatasetError. Raises DatasetError, naming the folder and the fix, for a missing
    or unreadable folder, no class folders, images directly in ``root``, a single class, or a
    class folder without a usable image. A class with fewer than ``FEW_IMAGES`` images gets a
    warning in ``warnings``. With ``keep`` (of ``image_size``), the model inputs decoded here
    are offered to it while it has room, so that the feature extraction need not decode again.
    ``check`` runs before each folder is listed (``progress`` runs only once files are being
    checked) and may raise to abandon the scan.
    """
    root_p = check_folder(root, option)
    class_dirs, loose, labels = _class_folders(root, root_p, labels, option)
    found = [d.name for d in class_dirs]
    index = {name: i for i, name in enumerate(labels)}

    walker = _Walker(root_p, check)
    listed: list[tuple[Path, int, bool]] = []
    for d in class_dirs:
        listed += [(p, index[d.name], linked) for p, linked in walker.files(d)]
    candidates = _dedupe(listed)
    skipped = [Skipped(str(p), NOT_IN_CLASS_FOLDER) for p in loose]
    skipped += [Skipped(str(p), images.NOT_REGULAR, kind) for p, kind in walker.special]

    def check(item):
        path, _ = item
        if keep is None or not keep.room():
            data, err = images.check(path, size=image_size, max_pixels=max_pixels)
            # Hash here, in the worker, so that finished files' bytes are not held waiting in order.
            return (None, err) if err else (images.digest(data), None)
        data, pixels, err = images.check_pixels(path, size=image_size, max_pixels=max_pixels)
        if err:
            return None, err
        keep.offer(digest := images.digest(data), pixels)
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
                    skipped.append(Skipped(str(path), err.reason, err.detail))
                    bad_in[label] = bad_in.get(label, 0) + 1
                else:
                    samples.append(Sample(str(path), label, digest))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # don't check the rest first
            raise
    folder = ImageFolder(str(root), list(labels), samples, skipped)
    bad = [s for s in skipped if s.reason != NOT_IN_CLASS_FOLDER] if strict else []
    if bad:
        lines = "; ".join(f"{s.path} ({s.reason})" for s in bad)
        raise DatasetError(f"{option} {root}: {len(bad)} unusable file(s) and --strict is set: {lines}. "
                           "Remove or fix them, or drop --strict to skip them")
    for i, (label, n) in enumerate(folder.counts().items()):
        if n == 0 and label in found:
            why = f"{bad_in[i]} unusable file(s), see the skipped list" if bad_in.get(i) else "it is empty"
            raise DatasetError(f"{option} {root_p / label}: no usable image in this class folder ({why}); "
                               "add images or remove the folder")
        if n == 0:
            folder.warnings.append(f"label '{label}' has no folder in {root}")
        elif n < FEW_IMAGES:
            folder.warnings.append(f"class '{label}' has only {n} image(s); add more for a reliable model")
    return folder


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


def check_label(name: str, what: str = "class folder") -> None:
    """Raise DatasetError for a label (class folder name) holding a character that would split or
    garble it in labels.txt, the metadata or a table, naming it escaped (``what`` prefixes the
    message). The characters are the bundle schema's (``schema.forbidden_char``), so that every
    trained bundle loads."""
    if schema.forbidden_char(name) is not None:
        raise DatasetError(f"{what} {name!r} has a control character, line break or non-UTF-8 byte in its "
                           "name, which would corrupt the model's labels; rename the folder")


def check_folder(root: str | os.PathLike, option: str = "DIR") -> Path:
    """The dataset folder as a Path; a DatasetError naming ``option`` if it is missing or a file."""
    root_p = Path(root)
    if not root_p.exists():
        raise DatasetError(f"{option} {root}: no such directory; give the folder that holds one subfolder "
                           "of images per class")
    if not root_p.is_dir():
        raise DatasetError(f"{option} {root}: not a directory; give a folder with one subfolder per class")
    return root_p


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic per-class stratified split: (rest, held_out). Each class keeps >= 1 image in
    ``rest``; a class with >= 2 images gives >= 1 to ``held_out`` when fraction > 0."""
    if fraction <= 0:
        return list(samples), []
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.path):
        by_class.setdefault(s.label, []).append(s)
    rest, held = [], []
    for label in sorted(by_class):
        items = by_class[label]
        random.Random(f"{seed}:{label}").shuffle(items)
        n = len(items)
        k = min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0
        held += items[:k]
        rest += items[k:]
    return rest, held


def class_weights(labels: list[int], num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * n_c): each class contributes equally to the loss."""
    n = len(labels)
    tally = Counter(labels)  # one pass (list.count per class was quadratic: 32 s for 1M images, 1,000 classes)
    counts = [tally[c] for c in range(num_classes)]
    return {c: (n / (num_classes * counts[c]) if counts[c] else 0.0) for c in range(num_classes)}


@dataclass
class Splits:
    """The images of a run. ``labels``: the sorted class folder names of DIR; ``train`` and
    ``val``: the --val-dir images, or a stratified --val-split of DIR; ``fit`` and ``holdout``:
    ``train`` split again (``holdout``), for fine-tuning, whose early stopping the holdout
    drives. ``skipped``: files left out, ``warnings``: what the user should know."""

    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    fit: list[Sample]
    holdout: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def counts(self, samples) -> dict[str, int]:
        return count_by_label(samples, self.labels)

    def recorded(self) -> dict:
        """What splits.json records: {"train": [[absolute path, label], ...], "val": [...]}."""
        cwd = os.getcwd()

        def absolute(path: str) -> str:  # Path.absolute, without a Path per image (15 s a million)
            return path if os.path.isabs(path) else os.path.join(cwd, path)  # scanned paths are normalised

        return {name: [[absolute(s.path), s.label] for s in samples]
                for name, samples in (("train", self.train), ("val", self.val))}


def scan_splits(cfg: TrainConfig, *, image_size: int, progress: Callback = silent,
                stopping: threading.Event | None = None, keep: images.KeptPixels | None = None) -> Splits:
    """Scan DIR (and --val-dir) of ``cfg`` and split them (seeded by ``cfg.seed``), reporting the
    scan, the warnings, the skipped files and the counts through ``progress``. Once ``stopping``
    is set the scan gives up with ``Interrupted``. ``keep``: see ``scan``. Raises what ``scan``
    raises."""
    def abandoned():
        if stopping is not None and stopping.is_set():
            raise Interrupted("the file check was abandoned")

    def report(task):
        return counter(progress, task, check=abandoned)

    train = scan(cfg.data_dir, image_size=image_size, max_pixels=cfg.max_pixels, strict=cfg.strict,
                 progress=report("scan"), keep=keep, check=abandoned)
    skipped, warnings = list(train.skipped), list(train.warnings)
    if cfg.val_dir:
        val = scan(cfg.val_dir, image_size=image_size, labels=train.labels, max_pixels=cfg.max_pixels,
                   strict=cfg.strict, progress=report("scan val"), option="--val-dir", keep=keep,
                   check=abandoned)
        skipped += val.skipped
        warnings += val.warnings
        train_samples, val_samples = train.samples, val.samples
    else:
        train_samples, val_samples = split(train.samples, cfg.val_split, cfg.seed)
    fit, holdout = split(train_samples, cfg.holdout, cfg.seed + 1)
    warnings += _leak_warnings(train_samples, val_samples, cfg)
    splits = Splits(train.labels, train_samples, val_samples, fit, holdout, skipped, warnings)
    for w in warnings:
        progress(Warn(w))
    if skipped:
        progress(SkippedFiles([s.to_dict() for s in skipped]))
    progress(Counts(train=splits.counts(splits.train), val=splits.counts(splits.val)))
    return splits


def _leak_warnings(train: list, val: list, cfg: TrainConfig) -> list[str]:
    """A warning when validation images have the same content as training images (by digest):
    the validation accuracy then overstates how the model does on new images."""
    seen = {s.digest for s in train}
    leaked = sum(s.digest in seen for s in val)
    if not leaked:
        return []
    where = f"--val-dir {cfg.val_dir} overlaps DIR {cfg.data_dir}" if cfg.val_dir \
        else f"DIR {cfg.data_dir} holds copies of the same image"
    return [f"{leaked} of the {len(val)} validation images are also training images (same content): {where}, "
            "so the validation accuracy overstates how the model does on new images; remove the copies"]


# ---- tf.data -------------------------------------------------------------------------------

def image_dataset(paths: list[str], size: int, *, labels: list[int] | None = None,
                  batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                  shuffle_seed: int | None = None, augment_seed: int | None = None,
                  unreadable_fill: float = 0.5, digests: bool = False):
    """tf.data of float32 [batch, size, size, 3] in [0, 1] (and int labels), decoded by the project
    decoder in parallel (within its memory budget) and prefetched. A file that became unreadable
    after the scan yields an image filled with ``unreadable_fill`` (grey) rather than crashing the
    epoch; feature extraction passes NaN so that such a file is noticed instead of cached. With
    ``digests`` each element is (images, string [batch]: ``images.digest`` of the bytes each
    image was decoded from, empty for an unreadable file) instead of the images."""
    import numpy as np

    from tlcli._tf import tf

    t = tf()

    def load(p):
        try:
            img, digest = images.load_for_model(os.fsdecode(p), size, max_pixels=max_pixels, with_digest=True)
        except images.ImageError:
            img, digest = np.full((size, size, 3), unreadable_fill, np.float32), ""
        return (img, np.bytes_(digest)) if digests else img

    # As bytes: a file name that is not UTF-8 (held as lone surrogates) is no valid TensorFlow string.
    ds = t.data.Dataset.from_tensor_slices([os.fsencode(p) for p in paths])
    if labels is not None:
        ds = t.data.Dataset.zip((ds, t.data.Dataset.from_tensor_slices(np.asarray(labels, np.int64))))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(p, *rest):
        if digests:
            img, digest = t.numpy_function(load, [p], [t.float32, t.string], stateful=False)
            digest.set_shape([])
            rest = (digest, *rest)
        else:
            img = t.numpy_function(load, [p], t.float32, stateful=False)
        img.set_shape([size, size, 3])
        return (img, *rest) if rest else img

    ds = ds.map(decode, num_parallel_calls=_decode_threads(), deterministic=True)
    ds = ds.batch(batch_size)
    if augment_seed is not None:
        aug = augmenter(augment_seed)
        # Sequential on purpose: the augmentation layers draw from stateful generators, and
        # parallel calls would hand the random numbers to batches in a varying order.
        ds = ds.map(lambda x, *rest: (aug(x, training=True), *rest) if rest else aug(x, training=True))
    # Fixed parallelism instead of tf.data's autotuner: the decoder is one Pillow call per image
    # (nothing to tune), and with autotuning on, deleting a finished iterator could block for
    # seconds (measured: about 5 s after a feature extraction, in half the runs).
    options = t.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


PREFETCH_BATCHES = 2


def padded_batches(flat, batch_size: int, filler: tuple):
    """``flat`` (a dataset of single elements) in batches of exactly ``batch_size`` (a TPU's
    static shapes), the last one filled up with copies of ``filler`` (tensors of ``flat``'s
    element structure) for the caller to mask or drop. Never a batch of filler alone."""
    from tlcli._tf import tf

    # batch_size - 1 fillers at most: drop_remainder then keeps exactly the batches holding an element.
    return flat.concatenate(tf().data.Dataset.from_tensors(filler).repeat(batch_size - 1)).batch(
        batch_size, drop_remainder=True)


def _decode_threads() -> int:
    """One decoder per usable core, at most 16 (each may hold a large image while decoding)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


def augmenter(seed: int):
    """Random flip, zoom/crop, small rotation, brightness and contrast; output stays in [0, 1]."""
    from tlcli._tf import keras, tf

    L = keras().layers
    t = tf()
    layers = [
        L.RandomFlip("horizontal", seed=seed),
        L.RandomRotation(0.04, fill_mode="reflect", seed=seed + 1),
        L.RandomZoom((-0.2, 0.0), fill_mode="reflect", seed=seed + 2),
        L.RandomBrightness(0.15, value_range=(0.0, 1.0), seed=seed + 3),
        L.RandomContrast(0.15, seed=seed + 4),
    ]
    model = keras().Sequential(layers, name="augment")

    def apply(x, training=True):
        return t.clip_by_value(model(x, training=training), 0.0, 1.0)

    return apply
