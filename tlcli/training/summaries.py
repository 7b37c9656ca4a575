"""What a training run records: its TensorBoard scalars (loss and accuracy, train and validation,
per phase and epoch), its metrics reports (``view_reports``) and its tlcli.json (``run_meta``).

Tags are ``<phase>/<metric>`` with the phase name slugged: ``head/loss``, ``head/val_accuracy``,
``fine-tune/val_loss``; the step is the epoch within the phase (from 1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from tlcli import bundle, files
from tlcli.config import time_budget_seconds
from tlcli.errors import UsageError

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
_RUN_FILE = "tensorboard-run.txt"


def tag(phase: str, metric: str) -> str:
    return f"{phase.replace(' ', '-')}/{metric}"


def _check_relative(target: Path) -> None:
    if ".." in target.parts:
        raise UsageError(f"--tensorboard {target}: a relative folder must stay inside the model bundle; "
                         "give a plain relative name (logs) or an absolute path")


def check_target(target: str | os.PathLike | None, *, data=()) -> None:
    """Fail fast, before any work, for a ``--tensorboard`` folder that cannot be used: a relative
    one that leaves the bundle; an absolute one that is, lies inside or contains an image folder
    of ``data`` (pairs such as ("DIR", path)), or that cannot be created or written. Raises
    ``UsageError``."""
    if target is None:
        return
    t = Path(target)
    if not t.is_absolute():
        _check_relative(t)
        return

    files.check_apart(t, "--tensorboard", data)
    existing = t
    try:
        while not existing.exists():  # the folder is created with its parents: they need a writable one
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"--tensorboard {target}: {existing} is a file, not a folder; choose another "
                             "folder or pass --tensorboard none")
        tempfile.NamedTemporaryFile(dir=existing, prefix=".tlcli-probe-").close()
    except OSError as exc:
        raise UsageError(f"--tensorboard {target}: cannot write in {existing} ({exc.strerror}); choose "
                         "another folder or pass --tensorboard none") from None


class ScalarLog:
    """Writes the epoch logs of a run as TensorBoard scalars, flushed after every epoch so that a
    running training can be watched with ``tensorboard --logdir``.

    ``target`` None turns logging off. A relative ``target`` is a folder inside the model bundle;
    the bundle only exists once training has finished, so meanwhile the events go to
    ``<partial>/tensorboard/<target>`` (``partial`` is the run's resumable work directory) and
    ``finish`` copies them into the bundle. An absolute ``target`` is shared between runs, so each
    run writes to its own subfolder ``<target>/<bundle name>-<time>``, kept across ``--resume``.
    Raises ``UsageError`` for a relative target that leaves the bundle.
    """

    def __init__(self, target: str | os.PathLike | None, *, partial: Path, out: str | os.PathLike):
        self.target = None if target is None else Path(target)
        if self.target is not None and not self.target.is_absolute():
            _check_relative(self.target)
        self.partial = Path(partial)
        self.out_name = Path(out).absolute().name
        self.dir: Path | None = None
        self._writer = None

    def _open(self):
        from tlcli._tf import tf

        if self.target.is_absolute():
            marker = self.partial / _RUN_FILE  # the partial directory only survives for --resume
            if marker.exists():
                self.dir = Path(marker.read_text().strip())
            else:
                self.dir = self.target / f"{self.out_name}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.partial.mkdir(parents=True, exist_ok=True)
                files.write_atomic(marker, str(self.dir).encode())
        else:
            self.dir = self.partial / "tensorboard" / self.target
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--tensorboard {self.target}: cannot create {self.dir} ({exc.strerror}); "
                             "choose another folder or pass --tensorboard none") from None
        self._writer = tf().summary.create_file_writer(str(self.dir))

    def write(self, phase: str, epoch: int, logs: dict) -> None:
        """Log the loss/accuracy entries of Keras ``logs`` for ``epoch`` (1-based) of ``phase``."""
        if self.target is None:
            return
        if self._writer is None:
            self._open()
        from tlcli._tf import tf

        t = tf()
        with self._writer.as_default():
            for name in METRICS:
                if logs.get(name) is not None:
                    t.summary.scalar(tag(phase, name), float(logs[name]), step=int(epoch))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, bundle_dir: Path) -> str | None:
        """Close the writer; for a relative target copy the events into ``bundle_dir``. Returns the
        folder that holds the events (inside ``bundle_dir`` for a relative target), or None."""
        self.close()
        if self.target is None:
            return None
        if self.target.is_absolute():
            return str(self.dir) if self.dir else None
        dest = Path(bundle_dir) / self.target
        if self.dir is not None and self.dir.exists():
            shutil.copytree(self.dir, dest, dirs_exist_ok=True)
        return str(self.target)


def run_meta(cfg, spec, *, splits, image_size: int, feature_dim: int, mirror: bool, reports, chosen,
             global_batch: int, state, seconds: float, extractor: str = "tf", loaded=None,
             choice=None, fit=None) -> bundle.BundleMeta:
    """The tlcli.json of a finished training run (``training.train``): ``cfg`` its TrainConfig,
    ``spec`` the backbone, ``splits`` the data.Splits, ``reports`` (train, val or None, test or
    None) metrics reports, ``chosen`` the strategy, ``state`` the run_state.RunState,
    ``extractor`` the engine of the frozen features. The TensorBoard folder is filled in when
    the bundle is written. ``loaded``: the ``backbone.LoadedBackbone``, for the signature it ran; ``choice``: the
    ``choice.BackboneChoice`` of ``--backbone A,B`` or None; ``fit`` the final head fit (of which a
    multi-label run records the thresholds)."""
    from tlcli._tf import tf

    train_report, val, test = reports
    train_dir, val_dir, test_dir = (str(Path(d).absolute()) if d else None for d in splits.folders(cfg))
    return bundle.BundleMeta(
        tensorflow_version=tf().__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        labels=splits.labels, image_size=image_size, input=bundle.input_spec(image_size),
        backbone=bundle.BackboneMeta(handle=spec.handle, preset=spec.preset, feature_dim=feature_dim,
                                     signature=getattr(loaded, "signature", None),
                                     output_key=getattr(loaded, "output_key", None),
                                     parts=[p.handle for p in spec.parts] or None),
        mirror_average=mirror, config=cfg.to_dict(),
        data=bundle.DataMeta(train_dir=train_dir, val_dir=val_dir, train_counts=splits.counts(splits.train),
                             val_counts=splits.counts(splits.val), test_dir=test_dir if test else None,
                             test_counts=splits.counts(splits.test) if test else None),
        metrics=bundle.MetricsMeta(train_accuracy=train_report.accuracy,
                                   val_accuracy=val.accuracy if val else None,
                                   val_loss=val.loss if val else None, val=val.to_dict() if val else None,
                                   test_accuracy=test.accuracy if test else None,
                                   test=test.to_dict() if test else None),
        training=bundle.TrainingMeta(strategy=chosen.description, replicas=chosen.replicas,
                                     global_batch_size=global_batch, head_epochs=state.head.epochs,
                                     fine_tune_epochs=state.fine_tune.epochs_run, seconds=round(seconds, 2),
                                     history=state.history, extractor=extractor, calibration=state.calibration),
        skipped=[s.to_dict() for s in splits.skipped], labels_override=splits.override,
        backbone_choice=choice.to_dict() if choice else None,
        task=bundle.TASK_MULTI_LABEL if cfg.multi_label else bundle.TASK_SINGLE_LABEL,
        thresholds=[round(float(t), 6) for t in fit.thresholds] if cfg.multi_label else None, unknown=state.unknown,
        signatures=dict(bundle.SIGNATURES, **(bundle.UNKNOWN_SIGNATURE if state.unknown else {})),
        time_budget=time_budget_seconds(cfg), plan=state.plan, test_time_augmentation=state.tta)


def view_reports(views, fit, labels: list[str], train, val, test=()) -> tuple:
    """(report of ``train``, report of ``val`` or None when it is empty, report of ``test`` or
    None when it is empty): ``metrics.compute`` on ``predict_views`` of those samples (the val
    and test reports list their paths). The test images were neither trained nor validated on."""
    from tlcli import metrics, multilabel_metrics
    from tlcli.model import head, multilabel

    def report(samples, *, paths: bool = True):
        if not samples:
            return None
        where = {"paths": [s.path for s in samples]} if paths else {}
        if isinstance(fit, multilabel.MultiLabelFit):
            return multilabel_metrics.compute(multilabel.targets(samples, len(labels)),
                                              multilabel.predict_views(views, samples, fit), labels, fit.thresholds,
                                              **where)
        return metrics.compute([s.label for s in samples], head.predict_views(views, samples, fit), labels, **where)

    return report(train, paths=False), report(val), report(test)
