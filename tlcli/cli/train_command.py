"""``tlcli train``: its options, declared once here (one name each, in help panels), and the
command that turns them into a TrainConfig and renders the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli import common, render, shell
from tlcli.cli.common import opt
from tlcli.config import (
    DEFAULT_MODEL_DIR,
    DEFAULT_PRESET,
    DEFAULTS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    Extractor,
    Precision,
    Strategy,
    TrainConfig,
)
from tlcli.errors import UsageError
from tlcli.model.presets import PRESETS

# The panels of `tlcli train --help`.
DATA, MODEL, HEAD, FINE_TUNING, HARDWARE, OUTPUT = "Data", "Model", "Head", "Fine-tuning", "Hardware", "Output"

DataDirOption = Annotated[Optional[Path], typer.Argument(metavar="DIR", show_default=False,
                                                       help="Folder of class subfolders, or a labels CSV.")]
ValSplitOption = Annotated[float, opt(DATA, "Fraction of each class held out for validation.")]
ValDirOption = Annotated[Optional[Path], opt(DATA, "Explicit validation folder (overrides --val-split).",
                                            metavar="DIR")]
SeedOption = Annotated[int, opt(DATA, "Seed for the split, shuffling and initialisation.")]
StrictOption = Annotated[bool, opt(DATA, "Fail on any unusable file instead of skipping it.", "--strict")]
MaxPixelsOption = Annotated[int, opt(DATA, "Largest image (decoded pixels) accepted.", min=1)]
LabelsOverrideOption = Annotated[Optional[Path], opt(
        DATA, "A review.csv of 'tlcli audit --report' with its actions filled in: relabel and drop photos for "
              "this run only (the files are never changed).", metavar="FILE", show_default=False)]
BackboneOption = Annotated[str, opt(MODEL, f"Preset ({', '.join(PRESETS)}), TF Hub / Kaggle https handle, or "
                                         "local SavedModel directory (a Keras 3 export too); or candidates "
                                         "A,B,... or 'auto' (the cached presets): the head is cross-validated "
                                         "on each one's features of the training images, the best is kept.")]
BackboneSignatureOption = Annotated[Optional[str], opt(MODEL, "The signature of a SavedModel without __call__ to run "
                                                              "(default: its only one, or serving_default).",
                                                       metavar="NAME", show_default=False)]
BackboneOutputOption = Annotated[Optional[str], opt(MODEL, "The output holding the feature vector, when the "
                                                           "backbone has several.", metavar="KEY",
                                                    show_default=False)]
ImageSizeOption = Annotated[Optional[int], opt(MODEL, "Input size; default: the preset's or the backbone's "
                                                     "declared size.", min=MIN_IMAGE_SIZE,
                                              max=MAX_IMAGE_SIZE)]
MirrorOption = Annotated[Optional[bool], opt(
        MODEL, "Learn from each image and its left-right mirror image, and average both in the model (twice "
               "the backbone work per image); default: on with --fine-tune. Turn it off when mirroring changes "
               "the class.", "--mirror/--no-mirror", show_default=False)]
EpochsOption = Annotated[int, opt(HEAD, "Cap on head epochs (one full-batch step each on cached features; early "
                                      "stopping picks the count).")]
PatienceOption = Annotated[int, opt(HEAD, "Head epochs without improvement before early stopping.")]
LearningRateOption = Annotated[Optional[float], opt(HEAD, "Head step size; default: automatic (1/L, the largest "
                                                         "stable step).")]
L2Option = Annotated[Optional[float], opt(HEAD, "Head L2 strength; default: chosen by cross-validation on the "
                                              "training images.")]
LabelSmoothingOption = Annotated[float, opt(HEAD, "Label smoothing of the head's loss, in [0, 1).")]
ClassWeightsOption = Annotated[bool, opt(HEAD, "Weight classes by inverse frequency.")]
MultiLabelOption = Annotated[bool, opt(HEAD, "Several labels a photo: one sigmoid per label, each with a threshold "
                                             "chosen by cross-validation; implied by a CSV with a labels column.",
                                       "--multi-label")]
FineTuneOption = Annotated[bool, opt(FINE_TUNING, "After the head, fine-tune the whole backbone.",
                                    "--fine-tune")]
FineTuneEpochsOption = Annotated[int, opt(FINE_TUNING, "Cap on fine-tune epochs.")]
FineTuneLearningRateOption = Annotated[float, opt(FINE_TUNING, "Fine-tune learning rate.")]
FineTunePatienceOption = Annotated[int, opt(FINE_TUNING, "Fine-tune epochs without a better holdout loss before "
                                                         "stopping.")]
HoldoutOption = Annotated[float, opt(FINE_TUNING, "Fraction of the training images held out to stop fine-tuning "
                                                "early.")]
DropoutOption = Annotated[float, opt(FINE_TUNING, "Dropout in front of the head while fine-tuning.")]
FineTuneMicroBatchOption = Annotated[Optional[int], opt(
        FINE_TUNING, "Fine-tuning takes each batch's gradient in slices of this many images (same update, less "
                     "memory); default: 8 on the CPU, whole batches on a GPU or TPU; 0 = whole batches.",
        show_default=False)]
PrecisionOption = Annotated[Precision, opt(FINE_TUNING, "Fine-tuning arithmetic (auto: mixed_float16 on a GPU of "
                                                      "compute capability >= 7.0, mixed_bfloat16 on a TPU, "
                                                      "float32 on a CPU); the model is saved float32.")]
BatchSizeOption = Annotated[int, opt(HARDWARE, "Batch size per replica (feature extraction, "
                                              "fine-tuning).")]
StrategyOption = Annotated[Strategy, opt(HARDWARE, "Distribution strategy (auto: the workers of TF_CONFIG, "
                                                 "else a TPU, else all GPUs, else the CPU).")
                        ]
CacheDirOption = Annotated[Optional[Path], opt(HARDWARE, "Feature cache (default $TLCLI_CACHE_DIR or "
                                                        "~/.cache/tlcli).", metavar="DIR")]
ExtractorOption = Annotated[Extractor, opt(HARDWARE, "What runs the frozen backbone for its features (auto: LiteRT, "
                                                   "converted once and cached, when there is no GPU or TPU; "
                                                   "else TensorFlow).")]
OutDirOption = Annotated[Path, opt(OUTPUT, "Where to write the model bundle.", "--out",
                                  metavar="DIR")]
ForceOption = Annotated[bool, opt(OUTPUT, "Replace an existing bundle at --out.", "--force")]
ResumeOption = Annotated[bool, opt(OUTPUT, "Continue an interrupted run into --out.", "--resume")]
TensorboardOption = Annotated[str, opt(OUTPUT, "TensorBoard log folder: relative = inside the bundle, absolute = a "
                                             "run subfolder there; 'none' turns logging off.")]
JsonOutOption = Annotated[bool, opt(OUTPUT, "Print the result as JSON on stdout.", "--json")]


@common.app.command(cls=shell.Command, short_help="Train a classifier on DIR (one subfolder per class).")
@common.interruptible
def train(
    ctx: typer.Context,
    data_dir: DataDirOption = None,
    val_split: ValSplitOption = DEFAULTS.val_split,
    val_dir: ValDirOption = None,
    seed: SeedOption = DEFAULTS.seed,
    strict: StrictOption = False,
    max_pixels: MaxPixelsOption = DEFAULTS.max_pixels,
    labels_override: LabelsOverrideOption = None,
    backbone: BackboneOption = DEFAULT_PRESET,
    backbone_signature: BackboneSignatureOption = None,
    backbone_output: BackboneOutputOption = None,
    image_size: ImageSizeOption = None,
    mirror: MirrorOption = DEFAULTS.mirror,
    epochs: EpochsOption = DEFAULTS.epochs,
    patience: PatienceOption = DEFAULTS.patience,
    learning_rate: LearningRateOption = DEFAULTS.learning_rate,
    l2: L2Option = DEFAULTS.l2,
    label_smoothing: LabelSmoothingOption = (
        DEFAULTS.label_smoothing),
    class_weights: ClassWeightsOption = DEFAULTS.class_weights,
    multi_label: MultiLabelOption = False,
    fine_tune: FineTuneOption = False,
    fine_tune_epochs: FineTuneEpochsOption = DEFAULTS.fine_tune_epochs,
    fine_tune_learning_rate: FineTuneLearningRateOption = (
        DEFAULTS.fine_tune_learning_rate),
    fine_tune_patience: FineTunePatienceOption = DEFAULTS.fine_tune_patience,
    holdout: HoldoutOption = DEFAULTS.holdout,
    dropout: DropoutOption = DEFAULTS.dropout,
    fine_tune_micro_batch: FineTuneMicroBatchOption = DEFAULTS.fine_tune_micro_batch,
    precision: PrecisionOption = (
        Precision(DEFAULTS.precision)),
    batch_size: BatchSizeOption = DEFAULTS.batch_size,
    strategy: StrategyOption = Strategy(DEFAULTS.strategy),
    cache_dir: CacheDirOption = None,
    extractor: ExtractorOption = Extractor(DEFAULTS.extractor),
    out_dir: OutDirOption = Path(DEFAULT_MODEL_DIR),
    force: ForceOption = False,
    resume: ResumeOption = False,
    tensorboard: TensorboardOption = (
        DEFAULTS.tensorboard or "none"),
    json_out: JsonOutOption = False,
):
    """Train a classifier on DIR (one subfolder per class) and write a model bundle."""
    from tlcli import training

    if data_dir is None and not resume:
        common.fail(UsageError("DIR: give the image folder to train on (one subfolder per class)"), json_out=json_out)
    logs = None if tensorboard.strip().lower() in ("", "none") else tensorboard
    cfg = TrainConfig.from_options({**ctx.params, "data_dir": data_dir or "", "tensorboard": logs},
                                   renamed={"out_dir": "out"})

    given = common.given(ctx, {"out_dir": "out"})
    result = common.with_progress(training.train, config=cfg, given=given, json_out=json_out)
    if json_out:
        render.print_json(result.to_dict())
    else:
        if result.backbone_choice:
            common.out.print(render.choice_table(result.backbone_choice))
        common.out.print(render.train_summary(result, tensorboard=cfg.tensorboard))
