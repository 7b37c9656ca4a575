"""Training and validation splits: a stratified split of one scan, or the scans of two folders,
with train/val leaks warned about."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tlcli.data import images
from tlcli.errors import Interrupted
from tlcli.progress import Callback, Counts, Warn, counter, silent
from tlcli.progress import Skipped as SkippedFiles

if TYPE_CHECKING:
    import threading

    from tlcli.config import TrainConfig


from tlcli.data.scanning import Sample, Skipped, count_by_label, scan


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
