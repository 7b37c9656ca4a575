"""Fine-tuning: the backbone and the head trained together with Keras, resumably.

Every epoch writes a checkpoint (weights and Adam's moments) and the run state, so ``--resume``
continues after the last finished epoch. Early stopping on the holdout keeps its count across a
restart, and the weights of the best holdout epoch are restored at the end; the starting weights
count as a candidate, so fine-tuning never ends worse than it began; then the best checkpoints
are averaged where the holdout agrees (``Averaging``). With a micro batch each batch's gradient
is taken in slices (``MicroBatchModel``). With a time budget a few steps are timed first for the
plan, and ``DeadlineStop`` ends training in time.

``MicroBatchModel``, ``EpochCallback``, ``DeadlineStop`` and ``Averaging`` are Keras classes,
defined when first used (TensorFlow is imported lazily).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tlcli import data
from tlcli._tf import keras, tf
from tlcli.config import TrainConfig, tunes
from tlcli.errors import UsageError
from tlcli.model import classifier, multilabel
from tlcli.progress import Callback, End, Epoch, Info, Start
from tlcli.training import plan, strategy
from tlcli.training.run_state import FineTuneState, RunState

PHASE = "fine-tune"


def micro_batch_size(cfg: TrainConfig, *, accelerator: bool) -> int | None:
    """Slice size for fine-tuning's gradients (``cfg.fine_tune_micro_batch``; None: 8 on the CPU,
    whole batches on a GPU or TPU), or None for whole batches (also without fine-tuning)."""
    if not tunes(cfg):
        return None
    micro = cfg.fine_tune_micro_batch
    if micro is None:
        micro = 0 if accelerator else 8
    return micro if 0 < micro < cfg.batch_size else None


def fine_tune(one_view, backbone, fit: list, holdout: list, *, cfg: TrainConfig, batch_size: int,
              accelerator: bool, class_weight: dict | None, state: RunState, partial: Path, progress: Callback,
              scalars, static: bool = False, multi_label: bool = False, mirror_ok: bool = True, planner=None,
              deadline: plan.Deadline | None = None) -> bool:
    """Train ``one_view`` (images -> probabilities, ``model.Models.one_view``, on the loaded
    ``backbone``) on the augmented ``fit`` images (``data.augmenter``; flips only with
    ``mirror_ok``), monitored on ``holdout`` (none: every epoch counts), in micro batches on the
    CPU (``micro_batch_size``). Adam with lower rates for early layers on a warm-up + cosine
    schedule peaking at ``cfg.fine_tune_learning_rate`` (``model.classifier``); at the end the best
    epochs are averaged where the holdout agrees (``classifier.greedy_soup``), and the result is kept
    only where it beats the starting weights on the holdout beyond chance. Each epoch is
    checkpointed under ``partial/fine-tune/`` and recorded in ``state`` (``state.fine_tune``,
    ``state.history[PHASE]``), saved to ``partial``; a resumed ``state`` continues from its
    checkpoint. With ``static`` (a TPU) every batch has the same shape (``static_batches``).
    ``multi_label``: the head is one sigmoid per label, trained on each image's labels
    (``Sample.label_set``) with binary cross-entropy.

    ``planner(train_rate) -> (epochs, reserve_s)`` (a time budget): given the images/s of a few
    timed training steps, the epochs to run (0: none) and the seconds to leave before
    ``deadline`` for what follows; the loop stops when the next batch or epoch would eat into
    them. The steps are timed at ``planner.train_size`` px and training runs at its plan's
    ``image_size``, both possibly below the backbone's (``plan.training_sizes``); the holdout is
    checked at the backbone's size. Returns whether the backbone's weights changed (False: the holdout never improved
    and the starting weights were restored, or the plan had no time). Raises ``UsageError``
    for a damaged checkpoint on resume."""
    micro_batch = micro_batch_size(cfg, accelerator=accelerator)
    num_classes, image_size = int(one_view.output_shape[-1]), backbone.image_size
    t = tf()
    if multi_label:
        onehot = lambda img, y: (img, t.cast(y, t.float32))  # noqa: E731  (already multi-hot)
        targets = lambda samples: list(multilabel.targets(samples, num_classes))  # noqa: E731
    else:
        onehot = lambda img, y: (img, t.one_hot(y, num_classes))  # noqa: E731
        targets = lambda samples: [s.label for s in samples]  # noqa: E731
    if static and len(fit) < batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size}: the global batch ({batch_size}) is larger than the "
                         f"{len(fit)} images fine-tuning trains on, and a TPU drops partial batches; lower it")

    def train_data(size: int):  # the augmentation computes in float32 (tf.data: no Keras policy reaches it)
        # Decoded at the features' size and cropped down to ``size``: the detail of the larger image.
        augment = data.augmenter(mirror=mirror_ok, size=size) if cfg.augment else None
        ds = data.image_dataset([s.path for s in fit], image_size if cfg.augment else size, labels=targets(fit),
                                batch_size=batch_size, max_pixels=cfg.max_pixels, shuffle_seed=cfg.seed,
                                augment_seed=cfg.seed, augment=augment).map(onehot)
        return static_batches(ds, batch_size) if static else ds

    # A budget's plan may train below the features' size (plan.training_sizes); the holdout stays at
    # it, where the head-only model that fine-tuning must beat was fit: one model takes both sizes.
    train_size = image_size if planner is None else planner.train_size
    if train_size != image_size:
        one_view = classifier.build_classifier(backbone.layer, one_view.get_layer("head"), None)
    ds, val = train_data(train_size), None
    if holdout:
        val = data.image_dataset([s.path for s in holdout], image_size, labels=targets(holdout),
                                 batch_size=batch_size, max_pixels=cfg.max_pixels).map(onehot)
        val = static_batches(val, batch_size, pad=True) if static else val
    kind = strategy.device_kind()
    policy = strategy.resolve_precision(cfg.precision, kind=kind)
    progress(Info(f"fine-tuning precision: {policy}" + (" (auto)" if cfg.precision == "auto" else "")))
    # The weights it starts from (on --resume too: the checkpoint is read inside _fit).
    start = backbone.layer.get_weights()
    with strategy.precision_policy(policy, kind=kind):
        _train(one_view, backbone.layer, one_view.input_shape[1], ds, val, train_data=train_data, policy=policy,
               micro_batch=micro_batch, cfg=cfg, class_weight=class_weight, state=state, partial=partial,
               progress=progress, scalars=scalars, masked=static, multi_label=multi_label,
               steps_per_epoch=math.ceil(len(fit) / batch_size), planner=planner, deadline=deadline)
    # Compared, not inferred from the bookkeeping, so adapted features never enter the cache.
    unchanged = all(np.array_equal(a, b) for a, b in zip(start, backbone.layer.get_weights()))
    state.fine_tune.improved = not unchanged
    return not unchanged


def _train(one_view, backbone_layer, image_size: int | None, ds, val, *, train_data, policy: str,
           micro_batch: int | None, cfg: TrainConfig, class_weight, state: RunState, partial: Path,
           progress: Callback, scalars, masked: bool = False, multi_label: bool = False, steps_per_epoch: int = 1,
           planner=None, deadline=None) -> None:
    """The Keras fit of ``fine_tune`` under the policy ``policy`` (already set), on ``ds``. With a
    ``planner`` a few steps on ``ds`` (at its ``train_size``) are timed first (and undone), and
    training runs on ``train_data(size)`` at the size its plan chose. float32 trains
    ``one_view`` itself (its input ``image_size`` px, None: any); a mixed policy trains a copy whose
    head computes in the policy's dtype (``model.head_under_policy``) on the same backbone layer,
    and its head's weights go back to ``one_view``'s head at the end. ``masked``: the holdout's
    batches carry weights (padding: 0), so accuracy is a weighted metric."""
    from tlcli.model import classifier as model

    k = keras()
    head = one_view.get_layer("head")
    trained = one_view if policy == "float32" else model.build_classifier(
        backbone_layer, model.head_under_policy(head, policy), image_size)
    train_model = trained if not micro_batch else _micro_batch_model_class()(
        trained.input, trained.output, name="classifier", micro_batch=micro_batch)
    loss, accuracy = (k.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
                      k.metrics.BinaryAccuracy(name="accuracy")) \
        if multi_label else (k.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing), "accuracy")
    epochs, reserve = cfg.fine_tune_epochs, 0.0
    schedule = classifier.warmup_cosine(cfg.fine_tune_learning_rate, epochs * steps_per_epoch)
    train_model.compile(optimizer=classifier.build_optimizer(schedule, backbone_layer.trainable_variables), loss=loss,
                        metrics=None if masked else [accuracy], weighted_metrics=[accuracy] if masked else None)
    if planner is not None:
        epochs, reserve = planner(_measure_training(train_model, ds, class_weight=class_weight)) \
            if planner.worth_measuring() else (0, 0.0)
        if epochs < 1:
            state.fine_tune = FineTuneState(improved=False)
            return
        schedule.set_total(epochs * steps_per_epoch)
        if planner.plan.image_size != planner.train_size:  # stepped down to fit: fewer pixels a step
            ds = train_data(planner.plan.image_size)
    callback = _epoch_callback_class()(
        train_model, state, phase=PHASE, epochs=epochs, checkpoint_dir=partial / PHASE,
        patience=cfg.fine_tune_patience if val is not None else None, monitor=val is not None,
        save_state=lambda: state.save(partial), progress=progress, scalars=scalars)
    more = [_deadline_stop_class()(deadline, reserve)] if deadline is not None else []
    if val is not None:  # the starting weights and the best epochs, averaged at the end where the holdout agrees
        more.append(_averaging_class()(state, val, progress=progress, multi_label=multi_label,
                                       keep_going=lambda: deadline is None or deadline.left() > reserve / 2))
    _fit(train_model, ds, callback, validation=val, class_weight=class_weight, more=more)
    if val is not None:
        more[-1].finish()
    if trained is not one_view:
        head.layers[-1].set_weights(trained.get_layer("head").layers[1].get_weights())


# Steps timed for the plan of a time budget, after one untimed step (which traces the function).
TIMED_STEPS = 2


def _measure_training(train_model, ds, *, class_weight) -> float:
    """Images per second of ``train_model``'s training steps on ``ds`` (batches of (images,
    targets)): one step to trace, then ``TIMED_STEPS`` timed; the weights and the optimizer's
    state are put back as they were, so training starts as if none had run."""
    t = tf()
    weights, optimizer = train_model.get_weights(), train_model.optimizer
    # Adam's moments appear at the first step (back to zeros then); a loss scale keeps its value.
    before = {v.ref(): v.numpy() for v in optimizer.variables}
    images, seconds = 0, 0.0
    for i, (x, y) in enumerate(ds.take(1 + TIMED_STEPS)):
        began = time.perf_counter()
        train_model.train_on_batch(x, y, class_weight=class_weight)
        if i:
            images, seconds = images + int(x.shape[0]), seconds + time.perf_counter() - began
    train_model.set_weights(weights)
    for v in optimizer.variables:
        v.assign(before[v.ref()] if v.ref() in before else t.zeros_like(v))
    train_model.reset_metrics()
    return images / seconds if seconds > 0 else 0.0


def static_batches(ds, batch_size: int, *, pad: bool = False):
    """``ds`` (batches of (images, targets)) as batches of exactly ``batch_size``: the last
    partial batch is dropped, or with ``pad`` filled up with zero images whose weight is 0, so
    elements become (images, targets, weights) with weight 1 for every real image. Weighted
    metrics then leave the padding out; the mean loss Keras reports is that of the padded
    batches (the real images' sum over the padded count), the same factor every epoch."""
    t = tf()
    flat = ds.unbatch()
    if not pad:
        return flat.batch(batch_size, drop_remainder=True)
    flat = flat.map(lambda x, y: (x, y, t.constant(1.0)))
    x, y, _ = flat.element_spec
    filler = (t.zeros(x.shape, x.dtype), t.zeros(y.shape, y.dtype), t.constant(0.0))
    return data.padded_batches(flat, batch_size, filler)


def _fit(m, train, callback, *, validation, class_weight, more=()) -> None:
    """Keras fit from where ``callback.restore`` says, with its progress events (and the
    callbacks ``more``, after it)."""
    initial = callback.restore(validation)
    st, phase, epochs = callback.state.fine_tune, callback.phase, callback.epochs
    if initial:  # a resumed run: say where it picks up (on a cluster, every worker from the chief's epoch)
        callback.progress(Info(f"fine-tuning continues after epoch {initial} of {epochs}, from its checkpoint"
                               + (" (it had already stopped early)" if st.stopped else "")))
    if initial < epochs and not st.stopped:
        callback.progress(Start(phase, total=epochs, completed=initial))
        m.fit(x=train, epochs=epochs, initial_epoch=initial, verbose=0, callbacks=[callback, *more],
              class_weight=class_weight, validation_data=validation)
        callback.progress(End(phase, total=epochs, completed=st.epochs_run or epochs))
    callback.finish()


def __getattr__(name: str):
    if name == "MicroBatchModel":
        return _micro_batch_model_class()
    if name == "EpochCallback":
        return _epoch_callback_class()
    if name == "DeadlineStop":
        return _deadline_stop_class()
    if name == "Averaging":
        return _averaging_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _micro_batch_model_class():
    k, t = keras(), tf()

    class MicroBatchModel(k.Model):
        """A Keras Model whose ``train_step`` takes the gradient of each batch in slices of
        ``micro_batch`` images and applies their sum once: the same update as the whole batch
        (BatchNorm runs in inference mode, so no statistic depends on the batch), with the memory
        of a slice. Fine-tuning keeps every activation of the backbone for backpropagation, which
        at 32 images of 224 px is about 2.5 GB on top of TensorFlow's own."""

        def __init__(self, *args, micro_batch: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.micro_batch = int(micro_batch)

        def train_step(self, data):
            x, y, weight = k.utils.unpack_x_y_sample_weight(data)
            n = t.shape(x)[0]
            variables = self.trainable_variables
            scaling = isinstance(self.optimizer, k.mixed_precision.LossScaleOptimizer)

            def add_slice(start, *total):
                end = t.minimum(start + self.micro_batch, n)
                xs, ys = x[start:end], y[start:end]
                ws = None if weight is None else weight[start:end]
                with t.GradientTape() as tape:
                    probs = self(xs, training=True)
                    # The compiled loss is this slice's mean (+ regularisation): scaled by its
                    # share of the batch, the slices add up to the batch's loss.
                    loss = self.compiled_loss(ys, probs, ws, regularization_losses=self.losses)
                    scaled = loss * t.cast(end - start, loss.dtype) / t.cast(n, loss.dtype)
                    if scaling:  # mixed_float16: scaled up so small gradients survive float16
                        scaled = self.optimizer.get_scaled_loss(scaled)
                grads = tape.gradient(scaled, variables)
                if scaling:
                    grads = self.optimizer.get_unscaled_gradients(grads)
                self.compiled_metrics.update_state(ys, probs, ws)
                return (end, *[a + g for a, g in zip(total, grads)])

            zeros = [t.zeros_like(v) for v in variables]
            # One slice at a time: parallel iterations would keep several slices' activations alive.
            _, *total = t.while_loop(lambda start, *_: start < n, add_slice, (t.constant(0), *zeros),
                                     parallel_iterations=1)
            self.optimizer.apply_gradients(zip(total, variables))
            return {m.name: m.result() for m in self.metrics}

    return MicroBatchModel


def _remove_checkpoints(paths, *, keep) -> None:
    """Delete the files of each checkpoint prefix in ``paths`` (None entries skipped) not in ``keep``."""
    for old in paths:
        if old and old not in keep:
            for f in Path(old).parent.glob(Path(old).name + ".*"):
                f.unlink(missing_ok=True)


@functools.cache
def _epoch_callback_class():
    k, t = keras(), tf()

    class EpochCallback(k.callbacks.Callback):
        """Per-epoch checkpoint (weights + optimizer) of ``model`` under ``checkpoint_dir``,
        early stopping on ``val_loss`` (with ``monitor``; after ``patience`` epochs without
        improvement, None: never) whose count survives a restart, best-weight restore, the
        epoch rows in ``state.history[phase]`` and ``scalars``, ``save_state()`` after every
        epoch, and progress events. Its phase state is ``state.fine_tune``."""

        def __init__(self, model, state: RunState, *, phase: str, epochs: int, checkpoint_dir: Path,
                     patience: int | None, monitor: bool, save_state: Callable[[], None], progress: Callback,
                     scalars):
            super().__init__()
            self.m, self.state, self.phase, self.epochs = model, state, phase, epochs
            self.checkpoint_dir, self.patience, self.monitor = Path(checkpoint_dir), patience, monitor
            self.save_state, self.progress, self.scalars = save_state, progress, scalars
            self.best_weights = None

        def _checkpoint(self):
            return t.train.Checkpoint(model=self.m, optimizer=self.m.optimizer)

        def restore(self, validation=None) -> int:
            """Continue from the checkpoint that ``state`` names (a resumed run), else start fresh;
            returns the epoch to start from. A fresh monitored phase first scores the starting
            weights, so it can never end worse than it began."""
            st = self.state.fine_tune
            if not st.last_checkpoint:
                st = self.state.fine_tune = FineTuneState()
                if self.monitor and validation is not None:
                    st.best, st.best_epoch, st.wait = float(self.m.evaluate(validation, verbose=0)[0]), -1, 0
                    self.best_weights = self.m.get_weights()
                    st.best_checkpoint = self._checkpoint().write(str(self.checkpoint_dir / "best-0"))
                return 0
            try:
                if st.best_checkpoint:
                    self._checkpoint().read(st.best_checkpoint).expect_partial()
                    self.best_weights = self.m.get_weights()
                self._checkpoint().read(st.last_checkpoint).expect_partial()  # last: weights and optimizer
                return int(st.epochs_run)
            except Exception as exc:  # TensorFlow's DataLoss/NotFound errors, a wrong shape or type
                raise UsageError(f"--resume: the checkpoint in {self.checkpoint_dir} is damaged or missing "
                                 f"({type(exc).__name__}); run without --resume to start over") from None

        def on_epoch_end(self, epoch, logs=None):
            logs = {name: float(v) for name, v in (logs or {}).items()}
            superseded = None
            self.state.history.setdefault(self.phase, []).append({"epoch": epoch + 1, **logs})
            self.scalars.write(self.phase, epoch + 1, logs)
            st = self.state.fine_tune
            st.epochs_run = epoch + 1
            if self.monitor:
                loss = logs.get("val_loss", math.inf)
                if loss < (math.inf if st.best is None else st.best):
                    st.best, st.best_epoch, st.wait = loss, epoch, 0
                    self.best_weights = self.m.get_weights()
                    # One file per epoch (the last too): state.json never names a file that a later
                    # epoch overwrote before the state caught up; the ones it replaces go after.
                    superseded = st.best_checkpoint
                    st.best_checkpoint = self._checkpoint().write(str(self.checkpoint_dir / f"best-{epoch + 1}"))
                else:
                    st.wait += 1
                    if self.patience is not None and st.wait >= self.patience:
                        st.stopped = True
                        self.model.stop_training = True
            superseded = [superseded, st.last_checkpoint]
            st.last_checkpoint = self._checkpoint().write(str(self.checkpoint_dir / f"last-{epoch + 1}"))
            self.save_state()
            _remove_checkpoints(superseded, keep=(st.best_checkpoint, st.last_checkpoint))
            self.progress(Epoch(self.phase, total=self.epochs, completed=epoch + 1, logs=logs))

        def finish(self) -> None:
            """Restore the best weights (monitored); record the best epoch when none was."""
            st = self.state.fine_tune
            if self.monitor and self.best_weights is not None:
                self.m.set_weights(self.best_weights)
            if st.best_epoch is None:
                st.best_epoch = (st.epochs_run or 1) - 1

    return EpochCallback


@functools.cache
def _averaging_class():
    k = keras()

    class Averaging(k.callbacks.Callback):
        """Keeps the best weights by holdout loss (``classifier.keep_best``): the starting ones
        of a fresh run (scored by ``EpochCallback.restore``) and each epoch's. ``finish()``,
        after ``EpochCallback.finish``, puts their greedy soup, scored on ``validation``, into
        the model where it is no worse (trying more while ``keep_going()``), then puts the
        starting weights back unless the result's per-image holdout losses are lower beyond
        chance (``classifier.significantly_better``); both are recorded in ``state.fine_tune``."""

        def __init__(self, state: RunState, validation, *, keep_going: Callable[[], bool], progress: Callback,
                     multi_label: bool = False):
            super().__init__()
            self.state, self.validation, self.keep_going, self.progress = state, validation, keep_going, progress
            self.ingredients, self.start, self.start_losses, self.multi_label = [], None, None, multi_label

        def on_train_begin(self, logs=None):
            st = self.state.fine_tune
            if st.best is not None and st.best_epoch == -1 and not st.epochs_run:
                self.start = self.model.get_weights()
                self.start_losses = _holdout_losses(self.model, self.validation, multi_label=self.multi_label)
                classifier.keep_best(self.ingredients, st.best, self.start)

        def on_epoch_end(self, epoch, logs=None):
            classifier.keep_best(self.ingredients, float((logs or {}).get("val_loss", math.nan)),
                             self.model.get_weights())

        def finish(self) -> None:
            st = self.state.fine_tune
            if len(self.ingredients) > 1:
                def evaluate(weights):
                    self.model.set_weights(weights)
                    return float(self.model.evaluate(self.validation, verbose=0)[0])

                best = self.model.get_weights()
                weights, loss, members = classifier.greedy_soup(self.ingredients, evaluate, keep_going=self.keep_going)
                st.soup = len(members)
                self.model.set_weights(weights if len(members) > 1 else best)
                if len(members) > 1:
                    st.best = loss
                    self.progress(Info(f"fine-tuning: the average of the {len(members)} best checkpoints has a "
                                       f"holdout loss of {loss:.4f}, no worse than the best single one"))
            if self.start is not None:
                after = _holdout_losses(self.model, self.validation, multi_label=self.multi_label)
                if not classifier.significantly_better(self.start_losses, after):
                    self.model.set_weights(self.start)
                    self.progress(Info(f"fine-tuning undone: its holdout loss ({after.mean():.4f} against "
                                       f"{self.start_losses.mean():.4f}) is not lower beyond chance"))

    return Averaging


def _holdout_losses(model, validation, *, multi_label: bool = False) -> np.ndarray:
    """Each holdout image's cross-entropy under ``model`` (float64 [n]; ``multi_label``: the mean
    binary cross-entropy of its labels), in the holdout's order; padding (a batch weight of 0) is
    left out. The model runs in a replica context of its strategy (every replica the whole batch;
    the first one's answer is taken): a model built under a distribution strategy cannot be
    called from the cross-replica context a callback runs in."""
    strategy = model.distribute_strategy
    losses = []
    for batch in validation:
        answers = strategy.run(lambda x: model(x, training=False), args=(batch[0],))
        first = strategy.experimental_local_results(answers)[0]
        probs = np.clip(np.asarray(first, np.float64), 1e-12, 1 - 1e-12)
        y = np.asarray(batch[1], np.float64)
        rows = -(y * np.log(probs) + (1 - y) * np.log(1 - probs)).mean(-1) if multi_label \
            else -np.log((probs * y).sum(-1))
        losses.append(rows[np.asarray(batch[2]) > 0] if len(batch) > 2 else rows)
    return np.concatenate(losses) if losses else np.zeros(0)


@functools.cache
def _deadline_stop_class():
    k = keras()

    class DeadlineStop(k.callbacks.Callback):
        """Stops training when less than ``reserve_s`` would be left before ``deadline``
        (``plan.Deadline``) after the next batch (the longest so far), or after the next
        epoch (as long as the last one): Keras then ends the epoch, checks the holdout, stops."""

        def __init__(self, deadline: plan.Deadline, reserve_s: float):
            super().__init__()
            self.deadline, self.reserve_s, self.longest = deadline, reserve_s, 0.0
            self.epoch_began = self.batch_began = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_began = time.monotonic()

        def on_train_batch_begin(self, batch, logs=None):
            self.batch_began = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            self.longest = max(self.longest, time.monotonic() - self.batch_began)
            if self.deadline.left() < self.reserve_s + self.longest:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if self.deadline.left() < self.reserve_s + (time.monotonic() - self.epoch_began):
                self.model.stop_training = True

    return DeadlineStop
