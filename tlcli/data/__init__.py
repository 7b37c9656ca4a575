"""The data stage: the one image decoder, bounded file reading, the folder scan, the splits and
the tf.data pipelines. It owns what counts as a usable image, how folders are walked, which dataset
layouts DIR may have, and which file lands in which split; it knows nothing of models."""

from tlcli.data.augment import augmenter
from tlcli.data.layouts import SplitFolders, split_folders
from tlcli.data.pipeline import PREFETCH_BATCHES, image_dataset, padded_batches
from tlcli.data.scanning import (
    FEW_IMAGES,
    NOT_IN_CLASS_FOLDER,
    ImageFolder,
    Sample,
    Skipped,
    bounded_map,
    check_folder,
    count_by_label,
    scan,
)
from tlcli.data.splits import Splits, class_weights, scan_splits, split

__all__ = ["FEW_IMAGES", "NOT_IN_CLASS_FOLDER", "PREFETCH_BATCHES", "ImageFolder", "Sample", "Skipped", "SplitFolders",
           "Splits", "augmenter", "bounded_map", "check_folder", "class_weights", "count_by_label", "image_dataset",
           "padded_batches", "scan", "scan_splits", "split", "split_folders"]
