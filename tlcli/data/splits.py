"""Training and validation splits: a stratified split of one scan, or the scans of two folders,
with train/val leaks warned about."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tlcli.data import images, label_csv, labels_override, layouts
from tlcli.data.scanning import Sample, Skipped, count_by_label, scan
from tlcli.errors import Interrupted, UsageError
from tlcli.progress import Callback, Counts, Info, Warn, counter, silent
from tlcli.progress import Skipped as SkippedFiles

if TYPE_CHECKING:
    import threading

    from tlcli.config import TrainConfig



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
    """The images of a run. ``labels``: the sorted class folder names of DIR (of its train/
    folder when ``layout`` is set); ``train`` and ``val``: the --val-dir (or DIR's own validation
    folder) images, or a stratified --val-split of DIR; ``fit`` and ``holdout``: ``train`` split
    again (``holdout``), for fine-tuning, whose early stopping the holdout drives; ``test``: the
    images of DIR's test/ folder (empty without one), for a final report, never trained or
    validated on. ``skipped``: files left out, ``warnings``: what the user should know;
    ``layout``: DIR's split folders, or None; ``override``: what ``--labels-override`` changed
    (``labels_override.apply``'s record), or None without one."""

    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    fit: list[Sample]
    holdout: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    layout: layouts.SplitFolders | None = None
    override: dict | None = None

    def counts(self, samples) -> dict[str, int]:
        return count_by_label(samples, self.labels)

    def folders(self, cfg: TrainConfig) -> tuple[str, str | None, str | None]:
        """(training folder, validation folder or None, test folder or None) of a run of ``cfg``."""
        if self.layout is None:
            return cfg.data_dir, cfg.val_dir, None
        lay = self.layout
        return str(lay.train), str(lay.val) if lay.val else cfg.val_dir, str(lay.test) if lay.test else None

    def recorded(self) -> dict:
        """What splits.json records: {"train": [[absolute path, label], ...], "val": [...]}."""
        cwd = os.getcwd()

        def absolute(path: str) -> str:  # Path.absolute, without a Path per image (15 s a million)
            return path if os.path.isabs(path) else os.path.join(cwd, path)  # scanned paths are normalised

        return {name: [[absolute(s.path), s.label] for s in samples]
                for name, samples in (("train", self.train), ("val", self.val))}



def _layout(cfg: TrainConfig):
    """The splits DIR gives itself: its split folders (``layouts.split_folders``), or the
    ``split`` column of a labels CSV (``label_csv``: DIR stands for each part); else None."""
    if not label_csv.is_label_csv(cfg.data_dir):
        return layouts.split_folders(cfg.data_dir, val_dir=cfg.val_dir)
    parts = {r.split for r in label_csv.read(cfg.data_dir) if r.split}
    if not parts:
        return None
    if "val" in parts and cfg.val_dir:
        raise UsageError(f"--val-dir {cfg.val_dir}: DIR {cfg.data_dir} gives its own validation rows (split val); "
                         "drop --val-dir, or drop those rows")
    csv = Path(cfg.data_dir)
    return _CsvSplits(str(csv), csv, csv if "val" in parts else None, csv if "test" in parts else None)


class _CsvSplits(layouts.SplitFolders):
    """The parts of a labels CSV given by its ``split`` column, in the place of split folders."""

    def describe(self) -> str:
        parts = ["train rows for training"] + (["val rows for validation"] if self.val else [])
        parts += ["test rows for a final test report"] if self.test else []
        return f"DIR {self.root}: its split column gives the splits; using {', '.join(parts)}"


def scan_splits(cfg: TrainConfig, *, image_size: int, progress: Callback = silent,
                stopping: threading.Event | None = None, keep: images.KeptPixels | None = None) -> Splits:
    """Scan DIR (and --val-dir) of ``cfg`` and split them (seeded by ``cfg.seed``), reporting the
    scan, the warnings, the skipped files and the counts through ``progress``. DIR laid out in
    split folders (``layouts.split_folders``) gives its train/ folder as DIR, its validation
    folder as --val-dir and its test/ folder as ``test``, said in one Info line. Once
    ``stopping`` is set the scan gives up with ``Interrupted``. ``keep``: see ``scan``. Raises
    what ``scan`` and ``split_folders`` raise."""
    def abandoned():
        if stopping is not None and stopping.is_set():
            raise Interrupted("the file check was abandoned")

    def report(task):
        return counter(progress, task, check=abandoned)

    layout = _layout(cfg)
    if layout is not None:
        progress(Info(layout.describe()))
    options = dict(image_size=image_size, max_pixels=cfg.max_pixels, strict=cfg.strict, keep=keep, check=abandoned)
    in_csv = {"split": "train"} if isinstance(layout, _CsvSplits) else {}
    train = scan(layout.train if layout else cfg.data_dir, progress=report("scan"), **in_csv, **options)
    skipped, warnings = list(train.skipped), list(train.warnings)

    def held_out(folder, task: str, option: str) -> list[Sample]:
        part = {"split": task.split()[-1]} if in_csv and Path(folder) == Path(cfg.data_dir) else {}
        found = scan(folder, labels=train.labels, progress=report(task), option=option, **part, **options)
        skipped.extend(found.skipped)
        warnings.extend(found.warnings)
        return found.samples

    if layout is not None and layout.val is not None:
        train_samples, val_samples = train.samples, held_out(layout.val, "scan val", "DIR")
    elif cfg.val_dir:
        train_samples, val_samples = train.samples, held_out(cfg.val_dir, "scan val", "--val-dir")
    else:
        train_samples, val_samples = split(train.samples, cfg.val_split, cfg.seed)
    test = held_out(layout.test, "scan test", "DIR") if layout is not None and layout.test else []
    override = None
    if cfg.labels_override:  # after the split: the validation images stay those of a run without it
        (train_samples, val_samples, test), override = _overridden(cfg, train.labels, train_samples, val_samples,
                                                                   test, progress)
    fit, holdout = split(train_samples, cfg.holdout, cfg.seed + 1)
    splits = Splits(train.labels, train_samples, val_samples, fit, holdout, skipped, warnings, test, layout,
                    override)
    splits.warnings += _leak_warnings(splits, cfg)
    for w in warnings:
        progress(Warn(w))
    if skipped:
        progress(SkippedFiles([s.to_dict() for s in skipped]))
    progress(Counts(train=splits.counts(splits.train), val=splits.counts(splits.val),
                    test=splits.counts(test) if layout is not None and layout.test else None))
    return splits



def _overridden(cfg: TrainConfig, labels: list[str], train, val, test, progress: Callback):
    """((train, val, test) with ``cfg.labels_override``'s relabels and drops, its record), said in one
    Info line. A relative path of the review is relative to DIR (a labels CSV's folder)."""
    root = Path(cfg.data_dir).parent if label_csv.is_label_csv(cfg.data_dir) else cfg.data_dir
    parts, override = labels_override.apply(labels_override.read(cfg.labels_override),
                                            {"train": train, "val": val, "test": test}, labels, root=root)
    progress(Info(f"{labels_override.OPTION}: {override['relabelled']} relabelled, {override['dropped']} dropped, "
                  f"{override['kept']} kept; the files are unchanged"))
    return (parts["train"], parts["val"], parts["test"]), override


def _leak_warnings(splits: Splits, cfg: TrainConfig) -> list[str]:
    """A warning when validation or test images have the same content as training images (by
    digest): their accuracy then overstates how the model does on new images."""
    seen = {s.digest for s in splits.train}
    train_dir, val_dir, test_dir = splits.folders(cfg)
    out = []
    for name, samples, folder in (("validation", splits.val, val_dir), ("test", splits.test, test_dir)):
        leaked = sum(s.digest in seen for s in samples)
        if not leaked:
            continue
        option = "--val-dir" if folder == cfg.val_dir else "DIR"
        where = f"{option} {folder} overlaps DIR {train_dir}" if folder \
            else f"DIR {train_dir} holds copies of the same image"
        out.append(f"{leaked} of the {len(samples)} {name} images are also training images (same content): "
                   f"{where}, so the {name} accuracy overstates how the model does on new images; remove the copies")
    return out
