"""The training recipe.

1. Scan and check every file (fast pre-pass), split train/val (stratified, seeded).
2. Head phase: the frozen backbone runs once per image (features cached on disk, streamed);
   a softmax head is fit on the stored vectors (tlcli/head.py) with label smoothing, balanced
   class weights and L2, where cross-validation on the *training* images picks the L2 strength
   and early stopping on the held-out folds picks the epoch count; then it is refit on all.
3. Optional fine-tune phase: the whole backbone is unfrozen (BatchNorm stays in inference mode),
   trained with Adam at a low learning rate on augmented images, stopping early on a stratified
   holdout of the training images (the head was fit without it).
4. Metrics on the validation images, then the bundle is written atomically.

State is kept in ``.<out>.partial/`` (settings, history, and a checkpoint at every fine-tuning
epoch) so ``--resume`` continues an interrupted run; the head phase, sub-second on cached
features, is simply redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tlcli import bundle, data, metrics, summaries
from tlcli.backbone import REMOTE_PREFIXES, resolve_spec
from tlcli.config import DEFAULTS, TrainConfig, validate
from tlcli.errors import Interrupted, TlcliError, UsageError
from tlcli.presets import PRESETS
from tlcli.progress import Callback, Event, counter, silent


@dataclass
class TrainResult:
    model_dir: str
    labels: list[str]
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    train_accuracy: float
    val_accuracy: float | None
    val_loss: float | None
    head_epochs: int
    fine_tune_epochs: int
    extracted: int
    cached: int
    strategy: str
    replicas: int
    global_batch_size: int
    seconds: float
    mirror: bool = False
    # With --fine-tune: False when the holdout never improved and the starting backbone was kept.
    fine_tune_improved: bool | None = None
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    history: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _partial_dir(out: str) -> Path:
    p = Path(out).absolute()
    return p.parent / f".{p.name}.partial"


# Paths of a run, stored absolute so that --resume from another folder trains the same images.
_PATHS = ("data_dir", "val_dir", "out", "cache_dir")
# What a command may still change on --resume: where the bundle goes (it names the run being
# resumed), whether it may replace one, and where features are cached (the results are the same).
_RESUME_MAY_CHANGE = {"out", "force", "resume", "cache_dir"}


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its folders, and a local backbone's, as absolute paths."""
    changes = {name: os.path.abspath(getattr(cfg, name)) for name in _PATHS if getattr(cfg, name)}
    if cfg.backbone not in PRESETS and not cfg.backbone.startswith(REMOTE_PREFIXES):
        changes["backbone"] = os.path.abspath(os.path.expanduser(cfg.backbone))
    if cfg.tensorboard and os.path.isabs(cfg.tensorboard):
        changes["tensorboard"] = os.path.abspath(cfg.tensorboard)
    return cfg.replace(**changes)


def _requested(data_dir, config: TrainConfig | None, options: dict, given) -> tuple[TrainConfig, set[str]]:
    """The run's config and the names of the fields the caller set: ``given`` when passed, else
    the ``options``, ``data_dir`` and the fields of ``config`` that differ from the defaults."""
    base = config or TrainConfig()
    cfg = base.replace(**options)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=str(data_dir))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if given is None:
        given = set(options) | {n for n in names if getattr(base, n) != getattr(DEFAULTS, n)}
        given |= {"data_dir"} if data_dir is not None else set()
    return cfg, set(given) & names


def _flag(name: str) -> str:
    return "DIR" if name == "data_dir" else "--" + name.replace("_", "-")


def _resumed(cfg: TrainConfig, given: set[str], progress: Callback) -> tuple[TrainConfig, dict]:
    """The saved config and state of the interrupted run into ``cfg.out``. The saved run keeps
    every setting but those in ``_RESUME_MAY_CHANGE``; a ``given`` one that differs from it is
    refused with ``UsageError`` naming each."""
    state_file = _partial_dir(cfg.out) / "state.json"
    if not state_file.exists():
        raise UsageError(f"--resume: no interrupted run to continue for --out {cfg.out}; "
                         "run without --resume")
    try:
        state = json.loads(state_file.read_text())
        saved = TrainConfig.from_dict(state["config"])
        if not all(isinstance(state.get(k, {}), dict) for k in ("history", "fine_tune")):
            raise TypeError("history and fine_tune must be objects")
        validate(saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
        raise UsageError(f"--resume: the interrupted run's state in {state_file} is unreadable ({exc}); "
                         "run without --resume to start over") from None
    mine, theirs = _absolute(cfg), _absolute(saved)
    changed = [f"{_flag(n)} (that run: {getattr(saved, n)}, this command: {getattr(cfg, n)})"
               for n in sorted(given - _RESUME_MAY_CHANGE)
               if getattr(mine, n) != getattr(theirs, n) and not _same_path(getattr(mine, n), getattr(theirs, n))]
    if changed:
        raise UsageError(f"--resume: the interrupted run into {cfg.out} keeps the settings it started with, "
                         f"and this command changes {'; '.join(changed)}; leave those out, or run without "
                         "--resume to start over")
    cache = cfg.cache_dir if "cache_dir" in given else saved.cache_dir
    cfg = saved.replace(out=mine.out, resume=True, force=cfg.force or saved.force, cache_dir=cache)
    progress(Event("info", message=f"resuming the interrupted run into {cfg.out} with the settings it started "
                   f"with (DIR {cfg.data_dir})"))
    return cfg, state


def _same_path(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)


def _check_inputs(cfg: TrainConfig):
    """The cheap checks of the options and the image folders; returns the backbone spec."""
    if not cfg.data_dir:
        raise UsageError("DIR: give the image folder to train on")
    validate(cfg)
    data.check_folder(cfg.data_dir)  # cheap checks first: a typo in DIR is not a network problem
    if cfg.val_dir:
        data.check_folder(cfg.val_dir, "--val-dir")
    return resolve_spec(cfg.backbone, cfg.image_size)


def _space_needed(backbone_path: str, cfg: TrainConfig) -> int:
    """Bytes a run writes beside --out: the bundle (about the backbone's size, plus a margin for
    metadata and curves) and, with fine-tuning, the resumable checkpoints: the last and the best,
    each holding the weights and Adam's two moments."""
    size = sum(f.stat().st_size for f in Path(backbone_path).rglob("*") if f.is_file())  # links followed
    return size + 20_000_000 + (2 * 3 * size if cfg.fine_tune else 0)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the block runs, SIGTERM (docker stop, a CI job cancelled) stops it as Ctrl-C does:
    the previous bundle stays intact and progress is kept. Main thread only; elsewhere a no-op."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def train(data_dir: str | os.PathLike | None = None, *, config: TrainConfig | None = None,
          progress: Callback = silent, given=None, **options) -> TrainResult:
    """Train a classifier on ``data_dir/<class>/*`` and write the bundle to ``config.out``.

    Options are ``TrainConfig`` fields (``out=``, ``epochs=`` ...). With ``resume=True`` the
    interrupted run into ``out`` continues with the settings it was started with; ``given``
    names the fields the caller set (default: ``options``, ``data_dir`` and the fields of
    ``config`` that differ from the defaults), and one that differs from that run is refused.
    A second run into the same ``out`` fails at once. Raises a ``TlcliError`` subclass for every
    user error, and ``Interrupted`` on Ctrl-C or SIGTERM (the previous bundle is left intact and
    progress is kept for ``resume=True``).
    """
    cfg, given = _requested(data_dir, config, options, given)
    spec = None if cfg.resume else _check_inputs(cfg)
    bundle.check_place(cfg.out)
    with _sigterm_as_interrupt(), bundle.lock(cfg.out):
        for note in bundle.clean_stale(cfg.out):
            progress(Event("info", message=note))
        state: dict = {}
        if cfg.resume:
            cfg, state = _resumed(cfg, given, progress)
            spec = _check_inputs(cfg)
        folders = [("DIR", cfg.data_dir), ("--val-dir", cfg.val_dir)]
        summaries.check_target(cfg.tensorboard, data=folders)
        bundle.check_output(cfg.out, force=cfg.force, data=folders)
        from tlcli.backbone import fetch

        path = fetch(spec)  # fail fast (offline, bad handle) before scanning anything
        bundle.check_free_space(cfg.out, _space_needed(path, cfg))
        return _Run(cfg, spec, _partial_dir(cfg.out), state, progress, backbone_path=path).run()


class _Run:
    def __init__(self, cfg: TrainConfig, spec, partial: Path, state: dict, progress: Callback, *,
                 backbone_path: str | None = None):
        self.cfg, self.spec, self.partial, self.state, self.progress = cfg, spec, partial, state, progress
        self.backbone_path = backbone_path
        self.history: dict[str, list] = state.get("history", {}) if cfg.resume else {}
        self.scalars = summaries.ScalarLog(cfg.tensorboard, partial=partial, out=cfg.out)
        self.stopping = threading.Event()  # tells background work to give up (Ctrl-C, an error)

    # -- bookkeeping ---------------------------------------------------------------------------
    def save_state(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        self.state["config"] = _absolute(self.cfg).to_dict()
        self.state["history"] = self.history
        bundle.write_json(self.partial / "state.json", self.state)

    def run(self) -> TrainResult:
        start = time.perf_counter()
        cfg = self.cfg
        if not cfg.resume and self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)
        out = staging = scan = None
        try:
            from tlcli import strategy as strategies
            from tlcli._tf import keras

            keras()  # import first: the import silences native stderr, which would hide the scan's output
            # The file check (Pillow, threads) and the backbone load (TensorFlow) overlap.
            scan = _Background(self.scan)

            keras().utils.set_random_seed(cfg.seed)
            self.mirror = cfg.fine_tune if cfg.mirror is None else cfg.mirror
            self.chosen = strategies.choose(cfg.strategy)
            self.global_batch = cfg.batch_size * self.chosen.replicas
            with self.chosen.strategy.scope():
                self.load_backbone()
                scan.wait()
                self.progress(Event("info", message=f"strategy: {self.chosen.description}; global batch "
                                    f"{self.global_batch} ({cfg.batch_size} per replica)"))
                self.build_classifier()
            # The SavedModel's graph does not depend on the weights: trace and write it in the
            # background while the backbone extracts features; only the variables wait till the end.
            staging = bundle.staging_dir(cfg.out)
            self.export = _GraphExport(self.classifier, self.size, self.labels, staging)
            with self.chosen.strategy.scope():
                self.head_phase()
                if cfg.fine_tune:
                    self.export.wait()  # fine-tuning must not run while the graph is being traced
                    self.fine_tune_phase()
                self.evaluate()
            self.progress(Event("start", "save", total=1))
            self.write_bundle(staging, seconds=time.perf_counter() - start)
            out = bundle.commit(staging, cfg.out, force=cfg.force)
        except KeyboardInterrupt:
            if out is None:  # once the new bundle is in, the run has succeeded
                raise Interrupted(f"interrupted: {_left_behind(cfg.out, self.partial)}") from None
        except Exception as exc:
            if out is None and (isinstance(exc, OSError) or bundle.disk_full(exc)):
                raise _write_error(exc, cfg.out, self.partial) from None
            raise
        finally:
            if scan is not None:
                self.stopping.set()
                scan.wait(raise_error=False)
            if staging is not None and out is None:
                if getattr(self, "export", None) is not None:
                    self.export.wait(raise_error=False)
                shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.progress(Event("end", "save", total=1, completed=1))
        except KeyboardInterrupt:
            pass  # the run has succeeded; what is left of the partial folder goes at the next run
        return self._result(out, start)

    def _result(self, out: Path, start: float) -> TrainResult:
        cfg = self.cfg
        return TrainResult(
            model_dir=str(out), labels=self.labels, train_counts=self.count(self.train),
            val_counts=self.count(self.val), train_accuracy=self.train_report.accuracy,
            val_accuracy=self.val_report.accuracy if self.val_report else None,
            val_loss=self.val_report.loss if self.val_report else None,
            head_epochs=self.state.get("head_epochs", 0),
            fine_tune_epochs=self.state.get("fine_tune", {}).get("epochs_run", 0),
            extracted=self.extracted, cached=self.cached, strategy=self.chosen.description,
            replicas=self.chosen.replicas, global_batch_size=self.global_batch,
            seconds=time.perf_counter() - start, mirror=self.mirror,
            fine_tune_improved=self.state.get("fine_tune", {}).get("improved") if cfg.fine_tune else None,
            skipped=[s.to_dict() for s in self.skipped],
            warnings=self.warnings, history=self.history)

    def count(self, samples) -> dict[str, int]:
        return data.count_by_label(samples, self.labels)

    # -- data ----------------------------------------------------------------------------------
    def scan(self) -> None:
        cfg = self.cfg
        size = self.spec.image_size or 224

        def abandoned():
            if self.stopping.is_set():
                raise Interrupted("the file check was abandoned")

        def report(task):
            return counter(self.progress, task, check=abandoned)

        train = data.scan(cfg.data_dir, image_size=size, max_pixels=cfg.max_pixels, strict=cfg.strict,
                          progress=report("scan"))
        self.labels = train.labels
        self.skipped = list(train.skipped)
        self.warnings = list(train.warnings)
        if cfg.val_dir:
            val = data.scan(cfg.val_dir, image_size=size, labels=train.labels, max_pixels=cfg.max_pixels,
                            strict=cfg.strict, progress=report("scan val"), option="--val-dir")
            self.skipped += val.skipped
            self.warnings += val.warnings
            self.train, self.val = train.samples, val.samples
        else:
            self.train, self.val = data.split(train.samples, cfg.val_split, cfg.seed)
        self.fit_rest, self.holdout = data.split(self.train, cfg.holdout, cfg.seed + 1)
        self.warnings += _leak_warnings(self.train, self.val, cfg)
        for w in self.warnings:
            self.progress(Event("warning", message=w))
        if self.skipped:
            self.progress(Event("skipped", logs={"skipped": [s.to_dict() for s in self.skipped]}))
        self.progress(Event("counts", logs={"train": self.count(self.train), "val": self.count(self.val)}))

    def load_backbone(self) -> None:
        from tlcli import backbone

        self.backbone = backbone.load(self.spec, trainable=self.cfg.fine_tune, path=self.backbone_path)
        self.size = self.backbone.image_size

    # -- phases --------------------------------------------------------------------------------
    def extract_features(self, *, frozen: bool, mirror: bool, task: str = "extract",
                         keep_plain: bool = False) -> tuple[int, int]:
        """Backbone features of every train and val image -> ``self.feats_of(samples)``, and with
        ``mirror`` those of their mirror images -> ``self.flip_feats_of(samples)``. A ``frozen``
        backbone's features go through the feature cache; ``keep_plain`` keeps the plain view's
        features already held (the backbone has not changed since). Returns (images that went
        through the backbone, images whose features came from the cache or were kept), counting
        each view."""
        from tlcli import features

        everything = self.train + self.val
        by_path = {s.path: i for i, s in enumerate(everything)}
        rows = lambda feats: lambda ss: feats[[by_path[s.path] for s in ss]]  # noqa: E731
        key = f"{self.spec.cache_key()}-{self.size}"
        views = [] if keep_plain else [("feats_of", self.extractor, key, task)]
        if mirror:
            views.append(("flip_feats_of", self.flip_extractor, f"{key}-mirror", f"{task} (mirror)"))
        self.flip_feats_of = None
        extracted = 0
        for attr, extractor, cache_key, name in views:
            cache = features.FeatureCache(self.cfg.cache_dir, cache_key) if frozen else features.NoCache()
            feats, n = features.extract(
                everything, extractor=extractor, cache=cache, image_size=self.size, batch_size=self.global_batch,
                max_pixels=self.cfg.max_pixels, progress=self.progress, task=name)
            setattr(self, attr, rows(feats))
            extracted += n
        return extracted, (1 + mirror) * len(everything) - extracted

    def _class_weight(self, samples):
        if not self.cfg.class_weights:
            return None
        return data.class_weights([s.label for s in samples], len(self.labels))

    def _compile(self, m, lr):
        k = _keras()
        m.compile(optimizer=k.optimizers.Adam(lr),
                  loss=k.losses.CategoricalCrossentropy(label_smoothing=self.cfg.label_smoothing),
                  metrics=["accuracy"])

    def head_phase(self) -> None:
        """Fit the head on cached features of the frozen backbone. With --fine-tune it is fit on
        all but the holdout, which stays unseen to drive early stopping of the fine-tuning."""
        cfg = self.cfg
        # Fine-tuning changes the backbone: its mirror views are extracted after it.
        self.extracted, self.cached = self.extract_features(frozen=True, mirror=self.mirror and not cfg.fine_tune)
        self.progress(Event("info", message=f"features: {self.extracted} extracted, {self.cached} from cache"))
        self.fit_head(self.fit_rest if cfg.fine_tune and self.holdout else self.train, "head")
        self.save_state()

    def build_classifier(self) -> None:
        from tlcli import model

        cfg = self.cfg
        self.head = model.build_head(self.backbone.feature_dim, len(self.labels), dropout=cfg.dropout,
                                     l2=cfg.l2 or 0.0, seed=cfg.seed)
        layer = self.backbone.layer
        # Fine-tuning trains one view per image; the served classifier averages both when mirroring.
        self.train_model = model.build_classifier(layer, self.head, self.size, micro_batch=self.micro_batch())
        self.classifier = model.build_classifier(layer, self.head, self.size, mirror=True) if self.mirror \
            else self.train_model
        # Built here, before the export thread traces the same backbone layer.
        self.extractor = model.build_extractor(layer, self.size)
        self.flip_extractor = model.build_extractor(layer, self.size, flip=True) if self.mirror else None

    def micro_batch(self) -> int | None:
        """Slice size for fine-tuning's gradients, or None for whole batches."""
        cfg = self.cfg
        if not cfg.fine_tune:
            return None
        micro = cfg.fine_tune_micro_batch
        if micro is None:
            micro = 0 if self.chosen.accelerator else 8
        return micro if 0 < micro < cfg.batch_size else None

    def fit_head(self, samples, phase: str) -> None:
        """Fit the head's Dense layer on ``self.feats_of(samples)`` (tlcli/head.py)."""
        from tlcli import head

        cfg = self.cfg
        self.progress(Event("start", phase, total=None))
        X, y, groups = self.feats_of(samples), [s.label for s in samples], None
        if self.flip_feats_of is not None:  # both views of each image, kept in one CV fold
            X = np.vstack([X, self.flip_feats_of(samples)])
            y, groups = y + y, np.tile(np.arange(len(samples)), 2)
        fit = head.fit_head(X, y, len(self.labels), class_weight=self._class_weight(samples), epochs=cfg.epochs,
                            learning_rate=cfg.learning_rate, label_smoothing=cfg.label_smoothing,
                            patience=cfg.patience, seed=cfg.seed, l2=cfg.l2, groups=groups)
        self.history[phase] = fit.history
        for row in fit.history:
            self.scalars.write(phase, row["epoch"], row)
            if row["epoch"] <= fit.epochs:
                logs = {k: v for k, v in row.items() if k != "epoch"}
                self.progress(Event("epoch", phase, total=fit.epochs, completed=row["epoch"], logs=logs))
        self.progress(Event("end", phase, total=fit.epochs, completed=fit.epochs))
        self.state.update(head_epochs=fit.epochs, head_l2=fit.l2,
                          head_cv_loss={str(k): v for k, v in fit.cv_loss.items()})
        dense = self.head.layers[-1]
        dense.set_weights([fit.kernel, fit.bias])
        if dense.kernel_regularizer is not None:  # keep fine-tuning's penalty the one CV chose
            dense.kernel_regularizer.l2 = np.float32(fit.l2)

    def fine_tune_phase(self) -> None:
        """Adapt the backbone on augmented images (holdout-monitored, never ending worse than it
        started), then refit the head on every training image's features from the adapted
        backbone, as in the head phase."""
        cfg = self.cfg
        st = self.state.setdefault("fine_tune", {})
        self._compile(self.train_model, cfg.fine_tune_learning_rate)
        # The weights it starts from (on --resume too: the checkpoint is read inside fit).
        start = self.backbone.layer.get_weights()
        ds = data.image_dataset([s.path for s in self.fit_rest], self.size,
                                labels=[s.label for s in self.fit_rest], batch_size=self.global_batch,
                                max_pixels=cfg.max_pixels, shuffle_seed=cfg.seed,
                                augment_seed=cfg.seed if cfg.augment else None)
        t = _tf()
        k = len(self.labels)
        onehot = lambda img, y: (img, t.one_hot(y, k))  # noqa: E731
        val = None
        if self.holdout:
            val = data.image_dataset([s.path for s in self.holdout], self.size,
                                     labels=[s.label for s in self.holdout], batch_size=self.global_batch,
                                     max_pixels=cfg.max_pixels).map(onehot)
        self.fit(self.train_model, "fine-tune", ds.map(onehot), cfg.fine_tune_epochs, validation=val,
                 st=st, class_weight=self._class_weight(self.fit_rest),
                 patience=cfg.fine_tune_patience if val is not None else None)
        # Kept the starting weights (the holdout never improved): the plain features still hold.
        # Compared, not inferred from the bookkeeping, so adapted features never enter the cache.
        unchanged = all(np.array_equal(a, b) for a, b in zip(start, self.backbone.layer.get_weights()))
        st["improved"] = not unchanged
        extracted, cached = self.extract_features(frozen=unchanged, mirror=self.mirror, task="re-extract",
                                                  keep_plain=unchanged)
        self.extracted, self.cached = self.extracted + extracted, self.cached + cached
        self.progress(Event("info", message=f"features after fine-tuning: {extracted} extracted, {cached} from "
                            "cache or kept" + (" (the backbone kept its starting weights)" if unchanged else "")))
        self.fit_head(self.train, "head refit")

    def fit(self, m, phase, train, epochs, *, validation, st, class_weight, patience):
        """Keras fit with a checkpoint per epoch, resumable early stopping and progress events."""
        ckpt_dir = self.partial / phase.replace(" ", "-")
        cb = _PhaseCallback(self, m, phase, epochs, ckpt_dir, st, patience, validation is not None)
        initial = cb.restore(validation)
        kwargs = dict(epochs=epochs, initial_epoch=initial, verbose=0, callbacks=[cb],
                      class_weight=class_weight, validation_data=validation)
        kwargs.update(x=train)
        if initial < epochs and not st.get("stopped"):
            self.progress(Event("start", phase, total=epochs, completed=initial))
            m.fit(**kwargs)
            self.progress(Event("end", phase, total=epochs, completed=st.get("epochs_run", epochs)))
        cb.finish()

    # -- results -------------------------------------------------------------------------------
    def predict_probs(self, samples) -> np.ndarray:
        if not samples:
            return np.zeros((0, len(self.labels)), np.float32)
        from tlcli import head

        kernel, bias = self.head.layers[-1].get_weights()  # Dense(softmax); dropout is off at inference
        feats = self.feats_of(samples)
        if self.flip_feats_of is not None:  # as the classifier does (model.build_classifier)
            feats = (feats + self.flip_feats_of(samples)) / 2
        return head.softmax(feats @ kernel + bias)

    def evaluate(self) -> None:
        y = lambda ss: [s.label for s in ss]  # noqa: E731
        self.train_report = metrics.compute(y(self.train), self.predict_probs(self.train), self.labels)
        self.val_report = None
        if self.val:
            self.val_report = metrics.compute(y(self.val), self.predict_probs(self.val), self.labels,
                                              paths=[s.path for s in self.val])

    def write_bundle(self, staging: Path, *, seconds: float) -> None:
        from tlcli import plots

        t = _tf()
        cfg = self.cfg
        self.export.wait()
        self.export.write_variables()
        val = self.val_report
        meta = bundle.BundleMeta(
            tensorflow_version=t.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            labels=self.labels, image_size=self.size, input=bundle.input_spec(self.size),
            backbone=bundle.BackboneMeta(handle=self.spec.handle, preset=self.spec.preset,
                                         feature_dim=self.backbone.feature_dim),
            mirror_average=self.mirror, config=cfg.to_dict(),
            data=bundle.DataMeta(train_dir=str(Path(cfg.data_dir).absolute()),
                                 val_dir=str(Path(cfg.val_dir).absolute()) if cfg.val_dir else None,
                                 train_counts=self.count(self.train), val_counts=self.count(self.val)),
            metrics=bundle.MetricsMeta(train_accuracy=self.train_report.accuracy,
                                       val_accuracy=val.accuracy if val else None,
                                       val_loss=val.loss if val else None, val=val.to_dict() if val else None),
            training=bundle.TrainingMeta(strategy=self.chosen.description, replicas=self.chosen.replicas,
                                         global_batch_size=self.global_batch,
                                         head_epochs=self.state.get("head_epochs", 0),
                                         fine_tune_epochs=self.state.get("fine_tune", {}).get("epochs_run", 0),
                                         seconds=round(seconds, 2), history=self.history,
                                         tensorboard=self.scalars.finish(staging)),
            skipped=[s.to_dict() for s in self.skipped])
        plots.training_curves(self.history, staging / "training_curves.png")
        absolute = lambda ss: [[str(Path(s.path).absolute()), s.label] for s in ss]  # noqa: E731
        bundle.save(staging, meta, splits={"train": absolute(self.train), "val": absolute(self.val)})


def _left_behind(out: str, partial: Path) -> str:
    """What an interrupted or failed run leaves: the previous bundle, and the resume state."""
    kept = "; progress kept: run the same command with --resume to continue" \
        if (partial / "state.json").exists() else ""
    where = f"the previous model at {out} is untouched" if Path(out).exists() else f"nothing was written to {out}"
    return where + kept


def _write_error(exc: BaseException, out: str, partial: Path) -> TlcliError:
    """One line for a file error (a full disk above all) during training or the save."""
    name = getattr(exc, "filename", None) or out
    if bundle.disk_full(exc):
        return TlcliError(f"no space left on the disk while writing {name}: free some space, then train again; "
                          f"{_left_behind(out, partial)}")
    return TlcliError(f"{name}: {getattr(exc, 'strerror', None) or exc}; {_left_behind(out, partial)}")


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


def _tf():
    from tlcli._tf import tf

    return tf()


class _Background:
    """Run ``fn`` on a thread; ``wait`` joins it and re-raises what it raised."""

    def __init__(self, fn, *args):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), name="tlcli-background", daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # re-raised on the main thread by wait()
            self.error = exc

    def wait(self, raise_error: bool = True) -> None:
        self.thread.join()
        if self.error is not None and raise_error:
            raise self.error


class _GraphExport:
    """Writes the classifier's SavedModel (graph and signatures) on a background thread; then
    ``write_variables`` stores the final weights under the same object graph."""

    def __init__(self, classifier, image_size: int, labels: list[str], path: Path):
        from tlcli import model

        self.path = path
        self.module, self.signatures = model.serving_module(classifier, image_size, labels)
        self.job = _Background(self._run)

    def _run(self):
        _tf().saved_model.save(self.module, str(self.path), signatures=self.signatures)
        try:
            import matplotlib.figure  # noqa: F401  warm the import for the training curves, off the main path
        except ImportError:
            pass  # plotting reports its own error later

    def wait(self, raise_error: bool = True) -> None:
        self.job.wait(raise_error)

    def write_variables(self) -> None:
        from tensorflow.python.saved_model import fingerprinting_utils

        _tf().train.Checkpoint(root=self.module).write(str(self.path / "variables" / "variables"))
        fingerprinting_utils.write_fingerprint(str(self.path))  # it hashes the variables too


def _keras():
    from tlcli._tf import keras

    return keras()


def _make_callback_class():
    k = _keras()

    class PhaseCallback(k.callbacks.Callback):
        """Per-epoch checkpoint (weights + optimizer), early stopping whose state survives a
        restart, best-weight restore, and progress events."""

        def __init__(self, run, model, phase, epochs, ckpt_dir, st, patience, monitor):
            super().__init__()
            self.run, self.m, self.phase, self.epochs = run, model, phase, epochs
            self.ckpt_dir, self.st, self.patience, self.monitor = ckpt_dir, st, patience, monitor
            self.best_weights = None

        def _checkpoint(self):
            t = _tf()
            return t.train.Checkpoint(model=self.m, optimizer=self.m.optimizer)

        def restore(self, validation=None) -> int:
            """Continue from the checkpoint (with --resume), else start fresh. A fresh monitored
            phase first scores the starting weights, so it can never end worse than it began."""
            last = self.st.get("last_checkpoint")
            if not last or not self.run.cfg.resume:
                self.st.clear()
                if self.monitor and validation is not None:
                    self.st.update(best=float(self.m.evaluate(validation, verbose=0)[0]), best_epoch=-1, wait=0)
                    self.best_weights = self.m.get_weights()
                    self.st["best_checkpoint"] = self._checkpoint().write(str(self.ckpt_dir / "best-0"))
                return 0
            try:
                if self.st.get("best_checkpoint"):
                    self._checkpoint().read(self.st["best_checkpoint"]).expect_partial()
                    self.best_weights = self.m.get_weights()
                self._checkpoint().read(last).expect_partial()  # last: weights and optimizer state
                return int(self.st.get("epochs_run", 0))
            except Exception as exc:  # TensorFlow's DataLoss/NotFound errors, a wrong shape or type
                raise UsageError(f"--resume: the checkpoint in {self.ckpt_dir} is damaged or missing "
                                 f"({type(exc).__name__}); run without --resume to start over") from None

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            superseded = None
            self.run.history.setdefault(self.phase, []).append({"epoch": epoch + 1, **logs})
            self.run.scalars.write(self.phase, epoch + 1, logs)
            st = self.st
            st["epochs_run"] = epoch + 1
            if self.monitor:
                loss = logs.get("val_loss", math.inf)
                if loss < st.get("best", math.inf):
                    st.update(best=loss, best_epoch=epoch, wait=0)
                    self.best_weights = self.m.get_weights()
                    # One file per epoch: state.json (saved below) never names a file that a later
                    # epoch overwrote before the state caught up; the one it replaces goes after.
                    superseded = st.get("best_checkpoint")
                    st["best_checkpoint"] = self._checkpoint().write(str(self.ckpt_dir / f"best-{epoch + 1}"))
                else:
                    st["wait"] = st.get("wait", 0) + 1
                    if self.patience is not None and st["wait"] >= self.patience:
                        st["stopped"] = True
                        self.model.stop_training = True
            st["last_checkpoint"] = self._checkpoint().write(str(self.ckpt_dir / "last"))
            self.run.save_state()
            if superseded and superseded != st.get("best_checkpoint"):
                for f in Path(superseded).parent.glob(Path(superseded).name + ".*"):
                    f.unlink(missing_ok=True)
            self.run.progress(Event("epoch", self.phase, total=self.epochs, completed=epoch + 1, logs=logs))

        def finish(self):
            if self.monitor and self.best_weights is not None:
                self.m.set_weights(self.best_weights)
            self.st.setdefault("best_epoch", self.st.get("epochs_run", 1) - 1)

    return PhaseCallback


def _PhaseCallback(*args):
    return _make_callback_class()(*args)
