"""Every training default lives here; the CLI reads its defaults from ``TrainConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tlcli.presets import DEFAULT_PRESET

# Decoded pixels allowed per image. 128 MP is above any phone photo after JPEG draft
# downscaling, and caps one decode at about 400 MB of RGB.
DEFAULT_MAX_PIXELS = 128_000_000
DEFAULT_MODEL_DIR = "tlcli-model"
STRATEGIES = ("auto", "default", "mirrored", "tpu")


@dataclass
class TrainConfig:
    """One training run. Saved in the bundle's ``tlcli.json`` so nothing is asked twice."""

    data_dir: str = ""
    backbone: str = DEFAULT_PRESET
    image_size: int | None = None
    out: str = DEFAULT_MODEL_DIR
    val_split: float = 0.2
    val_dir: str | None = None
    seed: int = 0
    # Head phase (on cached features). Epochs is a cap: early stopping picks the count on a
    # holdout carved from the training images, then the head is refit on all of them.
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 10
    holdout: float = 0.15
    dropout: float = 0.2
    l2: float = 1e-4
    label_smoothing: float = 0.1
    class_weights: bool = True
    # Optional fine-tuning phase.
    fine_tune: bool = False
    fine_tune_epochs: int = 5
    fine_tune_learning_rate: float = 1e-5
    fine_tune_patience: int = 2
    augment: bool = True
    # Machinery.
    strategy: str = "auto"
    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_dir: str | None = None
    tensorboard: str | None = "logs"
    force: bool = False
    resume: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


DEFAULTS = TrainConfig()
