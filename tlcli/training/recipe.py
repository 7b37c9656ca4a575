"""The training recipe, top to bottom in ``_run``: splits (``data.scan_splits``) -> backbone ->
feature views (``features.compute_views``, cached) -> head fit (``head.fit_head``: CV picks L2 and
the epoch count) -> with --fine-tune, fine-tuning on a holdout (``finetuning.fine_tune``), feature
views again and a head refit -> reports (``head.predict_proba``) -> the bundle, written atomically.
An interrupted run keeps its state in ``.<out>.partial/`` (``run_state``) for ``--resume``; the
head phase, sub-second on cached features, is simply redone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field

from tlcli import bundle, data, files
from tlcli.config import MAX_SEED, TrainConfig, head_options, is_backbone_choice, time_budget_seconds, tunes, validate  # noqa: F401  (validate, MAX_SEED: also here for callers)
from tlcli.data import label_csv, labels_override
from tlcli.errors import BackboneError, Interrupted, TlcliError, UsageError
from tlcli.interrupts import sigterm_as_interrupt
from tlcli.model.backbone import cache_key, resolve_spec
from tlcli.progress import Advance, Callback, End, Epoch, Info, Start, Warn, silent
from tlcli.training import distributed, prelude, run_state, summaries
from tlcli.training import plan as plans


@dataclass
class TrainResult:
    model_dir: str | None  # None on a cluster's other workers (only the chief writes the bundle)
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
    extractor: str = "tf"  # what ran the frozen backbone: "tf" or "litert" (--extractor)
    # With --fine-tune: False when the holdout never improved and the starting backbone was kept.
    fine_tune_improved: bool | None = None
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    calibration: dict | None = None  # the temperature folded into the head (model.calibration)
    unknown: dict | None = None  # the unknown detector and its threshold (features.unknown); None without one
    # With --strategy multi_worker: this worker's number (0: the chief), and each worker's ``extracted``.
    worker: int | None = None
    extracted_by_worker: list[int] | None = None
    # With DIR/test/ (``data.split_folders``): the test images per class and the final accuracy on them.
    test_counts: dict[str, int] | None = None
    test_accuracy: float | None = None
    # With --labels-override: its file, SHA-256 and counts (``data.labels_override.apply``).
    labels_override: dict | None = None
    # --backbone A,B / auto: the leaderboard, winner and why (``choice.BackboneChoice.to_dict``).
    backbone_choice: dict | None = None
    # "multi_label" (the accuracies are subset accuracies: every label of a photo right); else None.
    task: str | None = None
    # With --time-budget: the plan the run followed (``plans.Plan.to_dict``).
    plan: dict | None = None
    # With --fine-tune or --time-budget: the crop views' test (``features.tta.Decision.to_dict``).
    test_time_augmentation: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _check_inputs(cfg: TrainConfig):
    """The cheap checks of the options and the image folders; returns the backbone spec, or the
    list of candidates' specs for ``--backbone A,B`` / ``auto`` (``choice.candidate_specs``)."""
    if not cfg.data_dir:
        raise UsageError("DIR: give the image folder to train on")
    validate(cfg)
    data.check_folder(cfg.data_dir)  # cheap checks first: a typo in DIR is not a network problem
    if cfg.val_dir:
        data.check_folder(cfg.val_dir, "--val-dir")
    data.split_folders(cfg.data_dir, val_dir=cfg.val_dir)  # a --val-dir beside DIR's own val/: refused now
    if cfg.labels_override:  # its form now; its paths and labels once the scan has found them
        labels_override.read(cfg.labels_override)
    if is_backbone_choice(cfg.backbone):
        from tlcli.training import choice

        return choice.candidate_specs(cfg)
    return resolve_spec(cfg.backbone, cfg.image_size, signature=cfg.backbone_signature,
                        output_key=cfg.backbone_output)


def train(data_dir: str | os.PathLike | None = None, *, config: TrainConfig | None = None,
          progress: Callback = silent, given=None, **options) -> TrainResult:
    """Train a classifier on ``data_dir/<class>/*`` and write the bundle to ``config.out``.

    Options are ``TrainConfig`` fields (``out=``, ``epochs=`` ...). With ``resume=True`` the
    interrupted run into ``out`` continues with the settings it was started with; ``given``
    names the fields the caller set (default: ``options``, ``data_dir`` and the fields of
    ``config`` that differ from the defaults), and one that differs from that run is refused.
    A second run into the same ``out`` fails at once. Missing parent folders of ``out`` are created
    (and removed again when the run ends without a bundle). Raises a ``TlcliError`` subclass for every
    user error, and ``Interrupted`` on Ctrl-C or SIGTERM (the previous bundle is left intact and
    progress is kept for ``resume=True``).
    """
    started = time.monotonic()  # a --time-budget counts from here
    cfg, given = run_state.requested(data_dir, config, options, given)
    cfg, node = distributed.join(cfg, progress)  # first: a cluster's strategy is created before TensorFlow starts
    if node is not None and cfg.time_budget is not None:  # every worker raises it: they run one command
        raise UsageError(f"--time-budget {cfg.time_budget}: not on a cluster (TF_CONFIG), whose workers would "
                         "each plan on their own clock; leave it out")
    if not cfg.multi_label and cfg.data_dir and label_csv.is_label_csv(cfg.data_dir) \
            and label_csv.is_multi_label(cfg.data_dir):
        cfg = dataclasses.replace(cfg, multi_label=True)  # a labels column: several labels a photo
    spec = None if cfg.resume else _check_inputs(cfg)
    bundle.check_place(cfg.out)
    if not cfg.resume:  # before any folder of --out is made
        files.check_apart(cfg.out, "--out", [("DIR", cfg.data_dir), ("--val-dir", cfg.val_dir)], error=TlcliError)
    with sigterm_as_interrupt(), bundle.parents_made(cfg.out), bundle.lock(cfg.out):
        for note in bundle.clean_stale(cfg.out):
            progress(Info(note))
        if cfg.resume:
            cfg, state = run_state.resume(cfg, given, progress)
            spec = _check_inputs(cfg)
        else:
            state = run_state.RunState(run_state.absolute(cfg))
        folders = [("DIR", cfg.data_dir), ("--val-dir", cfg.val_dir)]
        summaries.check_target(cfg.tensorboard, data=folders)
        bundle.check_output(cfg.out, force=cfg.force, data=folders)
        from tlcli.model.backbone import fetch

        # The file check starts now, beside the TensorFlow import (and a download): the run
        # fails as fast as before on a bad handle, and the check is given up then.
        try:
            deadline = plans.Deadline(time_budget_seconds(cfg), started=started)
            splits, choice, spec = _chosen(cfg, spec, node, progress, deadline)
            with prelude.started(cfg, spec, ahead=node is None, progress=progress, splits=splits) as early:
                path = fetch(spec)
                bundle.check_free_space(cfg.out, bundle.space_needed(path, fine_tune=tunes(cfg)))
                with distributed.session(node) as finish:
                    return finish(_run(cfg, spec, path, state, early, progress, deadline, choice=choice))
        except KeyboardInterrupt:  # before the recipe's own handling: while the backbone loads, say
            raise Interrupted(f"interrupted: {run_state.left_behind(cfg.out)}") from None


def _chosen(cfg: TrainConfig, spec, node, progress: Callback, deadline: plans.Deadline):
    """(splits or None, the BackboneChoice or None, the backbone's spec): ``spec`` itself, or the
    winner among candidates (a list, see ``_check_inputs``), chosen on the training images
    (``choice.choose``, whose scan the run then reuses; within ``deadline``'s budget, if any)."""
    if not isinstance(spec, list):
        return None, None, spec
    if node is not None:
        raise UsageError(f"--backbone {cfg.backbone}: the backbone is chosen on one machine, not a cluster; "
                         "choose it there, then train the cluster with the winner as --backbone")
    from tlcli.training import choice

    return choice.choose(cfg, spec, progress, deadline)


def _run(cfg: TrainConfig, spec, backbone_path: str, state: run_state.RunState, early: prelude.Prelude,
         progress: Callback, deadline: plans.Deadline, *, choice=None) -> TrainResult:
    """The recipe. The SavedModel graph is written on a worker thread while features are
    extracted; however the run ends the worker is waited for and the staging folder goes unless
    the bundle is in. Ctrl-C raises ``Interrupted``, a file error ``TlcliError``, both one line."""
    from tlcli.insight import plots

    start, partial = time.perf_counter(), run_state.partial_dir(cfg.out)
    if not cfg.resume and partial.exists():
        shutil.rmtree(partial, ignore_errors=True)
    scalars = summaries.ScalarLog(cfg.tensorboard, partial=partial, out=cfg.out)
    pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlcli")
    out = staging = graph = None
    try:
        chosen, loaded, splits, models, litert, pixels = _backbone_and_splits(cfg, spec, backbone_path, early, progress)
        batch, mirror = cfg.batch_size * chosen.replicas, models.flip_extractor is not None
        # The SavedModel's graph does not depend on the weights: traced and written in the background
        # while LiteRT's parity is measured and the backbone extracts; the variables wait till the end.
        staging = bundle.staging_dir(cfg.out)
        export = _saved_model(cfg, models, loaded, splits, staging, mirror=mirror, chosen=chosen)
        graph = pool.submit(export.write_graph)
        prelude.check_parity(cfg, chosen, loaded, splits, models, litert, early, progress)
        views_of = _views_step(cfg, spec, chosen, loaded, splits, models, litert, batch=batch, progress=progress)
        fit_head = functools.partial(_fit_head, cfg=cfg, labels=splits.labels, keras_head=models.head,
                                     state=state, progress=progress, scalars=scalars)
        early.finish()  # what it extracted is in the store now, and its runner is free
        with chosen.strategy.scope():
            began = time.monotonic()  # (and the mirror views wait for fine-tuning, which changes them)
            views = early.credit(views_of(mirror=mirror and not tunes(cfg), pixels=pixels), loaded.image_size)
            extracted, cached, engine = views.extracted, views.cached, views.engine
            planner = functools.partial(_planner, cfg, spec, loaded, splits, deadline, mirror=mirror, choice=choice,
                                      rate=extracted / max(1e-3, time.monotonic() - began), progress=progress)
            progress(Info(f"features: {extracted} extracted, {cached} from cache"))
            fit = fit_head(views, splits.fit if tunes(cfg) and splits.holdout else splits.train, "head")
            state.save(partial)
            if tunes(cfg):
                graph.result()  # fine-tuning must not run while the graph is being traced
                views = _fine_tuned(cfg, chosen, models, loaded, splits, views, views_of, batch=batch, mirror=mirror,
                                    state=state, partial=partial, progress=progress, scalars=scalars, planner=planner())
                extracted, cached, engine = extracted + views.extracted, cached + views.cached, views.engine
                views, export, graph = _test_time(cfg, chosen, models, loaded, splits, views, views_of, (export, graph),
                                                  pool, mirror=mirror, state=state, deadline=deadline,
                                                  progress=progress)
                fit = fit_head(views, splits.train, "head refit")
        reports = summaries.view_reports(views, fit, splits.labels, splits.train, splits.val, splits.test)
        checks = _checks(cfg, splits, views, fit, models, litert, loaded, views_of, progress)
        progress(Start("save", total=1))
        state.unknown = _fit_unknown(export, views, splits, seed=cfg.seed)  # on the final features
        meta = summaries.run_meta(cfg, spec, splits=splits, image_size=loaded.image_size,
                                  feature_dim=loaded.feature_dim, mirror=mirror, reports=reports, chosen=chosen,
                                  global_batch=batch, state=state, fit=fit, seconds=time.perf_counter() - start,
                                  extractor=engine, loaded=loaded, choice=choice)
        meta.audit = checks  # counts only: the findings themselves are 'tlcli audit''s
        graph.result()
        export.write_variables()
        meta.training.tensorboard = scalars.finish(staging)
        plots.training_curves(state.history, staging / "training_curves.png")
        bundle.save(staging, meta, splits=splits.recorded())
        out = bundle.commit(staging, cfg.out, force=cfg.force)
    except KeyboardInterrupt:
        if out is None:  # once the new bundle is in, the run has succeeded
            raise Interrupted(f"interrupted: {run_state.left_behind(cfg.out)}") from None
    except Exception as exc:
        if out is None and (isinstance(exc, OSError) or files.disk_full(exc)):
            raise run_state.write_error(exc, cfg.out) from None
        raise
    finally:
        futures.wait([graph] if graph else [])  # what it raised is moot now
        pool.shutdown()
        if staging is not None and out is None:
            shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.rmtree(partial, ignore_errors=True)
        progress(End("save", total=1, completed=1))
    except KeyboardInterrupt:
        pass  # the run has succeeded; what is left of the partial folder goes at the next run
    return _result(cfg, out, splits, reports, state, chosen, batch=batch, seconds=time.perf_counter() - start,
                   mirror=mirror, counts=(extracted, cached), engine=engine, choice=meta.backbone_choice)


def _views_step(cfg, spec, chosen, loaded, splits, models, litert, *, batch: int, progress: Callback):
    """The run's feature step (``distributed.views_step``) over all its images, with every option
    but the views' own (``mirror``, ``frozen``, ``keep``, ``task``, ...) given."""
    return functools.partial(
        distributed.views_step(chosen), splits.train + splits.val + splits.test,
        extractors=(models.extractor, models.flip_extractor),
        cache_key=cache_key(spec, loaded.image_size), cache_dir=cfg.cache_dir,
        image_size=loaded.image_size, batch_size=batch, max_pixels=cfg.max_pixels, progress=progress, litert=litert,
        static=chosen.static_shapes)


def _checks(cfg, splits, views, fit, models, litert, loaded, views_of, progress: Callback) -> dict:
    """Training's own data check (``findings.train_check``): out of the strategy's scope (128
    calibration copies), on this worker only."""
    from tlcli.insight import findings

    return findings.train_check(cfg, splits, views, fit, extractors=(models.extractor, litert),
                                image_size=loaded.image_size, progress=progress,
                                cache_key=None if tunes(cfg) else views_of.keywords["cache_key"])


def _planner(cfg, spec, loaded, splits, deadline: plans.Deadline, *, mirror: bool, rate: float,
             progress: Callback, choice=None) -> plans.Planner | None:
    """The plan maker of a --time-budget run (None without one); ``rate``: the images/s of the
    frozen features just measured (0: all came from the cache); ``choice``: the BackboneChoice
    of ``--backbone A,B`` / ``auto`` or None."""
    if deadline.budget_s is None:
        return None
    return plans.Planner(cfg, splits, deadline, name=choice.winner if choice else spec.preset or spec.handle,
                         image_size=loaded.image_size, views=2 if mirror else 1, extract_rate=rate or None,
                         progress=progress, choice=choice and choice.plan, resizable=loaded.any_size,
                         augment=cfg.augment)


def _fine_tuned(cfg, chosen, models, loaded, splits, views, views_of, *, batch: int, mirror: bool, state, partial,
                progress: Callback, scalars, planner=None):
    """Fine-tune the backbone (``finetuning.fine_tune``), then the feature views the head is
    refit on: re-extracted, or ``views`` kept when the backbone kept its starting weights (the
    holdout never improved), since the plain features still hold then."""
    from tlcli.training import finetuning

    if planner is not None and loaded.signature is not None:
        planner(0.0, why="a backbone run through its signature cannot be fine-tuned")
        improved = state.fine_tune.improved = False
    else:
        improved = finetuning.fine_tune(
            models.one_view, loaded, splits.fit, splits.holdout, cfg=cfg, batch_size=batch,
            accelerator=chosen.accelerator, class_weight=_class_weight(cfg, splits.fit, splits.labels),
            state=state, partial=partial, progress=progress, scalars=scalars, static=chosen.static_shapes,
            multi_label=cfg.multi_label, mirror_ok=cfg.mirror is not False, planner=planner,
            deadline=planner and planner.deadline)
    state.plan = planner and planner.plan and planner.plan.to_dict()
    views = views_of(mirror=mirror, frozen=not improved, keep=None if improved else views, task="re-extract")
    progress(Info(f"features after fine-tuning: {views.extracted} extracted, {views.cached} from cache or kept"
                  + ("" if improved else " (the backbone kept its starting weights)")))
    return views


def _test_time(cfg, chosen, models, loaded, splits, views, views_of, written, pool, *, mirror: bool, state,
               deadline: plans.Deadline, progress: Callback):
    """Test-time augmentation (``features.tta``), after fine-tuning: (the views the head is refit
    on, the SavedModel writer, the future of its graph's write). The crop views of the training
    images are extracted and kept when cross-validation on them says they help (then those of
    the other images too); ``written`` (the writer, its graph's future) is then replaced: the
    graph is written again, once the first write is done, with the classifier that averages the
    crop views too. The decision is recorded in ``state.tta``."""
    from tlcli.features import tta
    from tlcli.model import classifier as model

    why = "not for a multi-label model" if cfg.multi_label else \
        plans.no_time_for(len(views.samples) * (1 + mirror), state.plan, deadline)
    if why:
        state.tta = tta.skipped(why, mirror=mirror).to_dict()
        progress(Info(f"test-time augmentation: {state.tta['summary']}"))
        return views, *written
    with chosen.strategy.scope():
        crop_of = functools.partial(model.build_extractor, loaded.layer, loaded.image_size, crop=True)
        extractors = (crop_of(), crop_of(flip=True) if mirror else None)
    options = dict(views_of.keywords, mirror=mirror, frozen=not state.fine_tune.improved, extractors=extractors,
                   litert=None, cache_key=tta.crop_key(views_of.keywords["cache_key"]), task="extract crop")
    step = distributed.views_step(chosen)  # (views_of is over every image: the crop views start with the train's)
    crop = step(splits.train, **options)
    decision = tta.decide(tta.rows_of(views, splits.train), crop, splits.train, len(splits.labels), mirror=mirror,
                          holdout=splits.holdout if state.fine_tune.improved else (),
                          class_weight=_class_weight(cfg, splits.train, splits.labels), **head_options(cfg))
    if decision.kept and splits.val + splits.test:
        crop = tta.joined(crop, step(splits.val + splits.test, **options))
        decision.extracted, decision.cached = crop.extracted, crop.cached
    state.tta = decision.to_dict()
    progress(Info(f"test-time augmentation: {state.tta['summary']}"))
    if not decision.kept:
        return views, *written
    written[1].result()  # one write at a time, into the same folder
    export = _saved_model(cfg, models, loaded, splits, written[0].path, mirror=mirror, chosen=chosen, crop=True)
    return tta.averaged(views, crop), export, pool.submit(export.write_graph)


def _result(cfg, out, splits, reports, state, chosen, *, batch: int, seconds: float, mirror: bool, counts,
            engine: str, choice: dict | None = None) -> TrainResult:
    """The TrainResult of a finished run; ``counts``: (features extracted, from the cache)."""
    train_report, val_report, test_report = reports
    return TrainResult(
        model_dir=str(out), labels=splits.labels, train_counts=splits.counts(splits.train),
        val_counts=splits.counts(splits.val), train_accuracy=train_report.accuracy,
        val_accuracy=val_report.accuracy if val_report else None, val_loss=val_report.loss if val_report else None,
        head_epochs=state.head.epochs, fine_tune_epochs=state.fine_tune.epochs_run, extracted=counts[0],
        cached=counts[1], strategy=chosen.description, replicas=chosen.replicas, global_batch_size=batch,
        seconds=seconds, mirror=mirror, extractor=engine,
        fine_tune_improved=state.fine_tune.improved if tunes(cfg) else None, plan=state.plan,
        skipped=[s.to_dict() for s in splits.skipped], warnings=splits.warnings, history=state.history,
        test_counts=splits.counts(splits.test) if test_report else None,
        test_accuracy=test_report.accuracy if test_report else None, calibration=state.calibration,
        unknown=state.unknown, labels_override=splits.override, backbone_choice=choice,
        task=bundle.TASK_MULTI_LABEL if cfg.multi_label else None, test_time_augmentation=state.tta)


def _backbone_and_splits(cfg: TrainConfig, spec, backbone_path: str, early: prelude.Prelude, progress: Callback):
    """(strategy, loaded backbone, splits, models, LiteRT runner, pixels kept for it; None without LiteRT):
    TensorFlow loads the backbone (and LiteRT's) while the file check of ``early`` runs."""
    from tlcli._tf import keras
    from tlcli.model import backbone
    from tlcli.model import classifier as model
    from tlcli.model import litert as litert_backbone
    from tlcli.training import strategy

    keras().utils.set_random_seed(cfg.seed)
    chosen, litert = strategy.choose(cfg.strategy), None
    with chosen.strategy.scope():
        try:
            loaded = backbone.load(spec, trainable=tunes(cfg), path=backbone_path, io_device=chosen.io_device)
        except BackboneError:  # one that cannot be trained (a Keras 3 signature): a budget plans head-only
            if cfg.fine_tune or cfg.time_budget is None:
                raise
            loaded = backbone.load(spec, path=backbone_path, io_device=chosen.io_device)
    # Converted out of the strategy's scope: traced in a mirrored one, the function captures the
    # distributed variables, which the converter cannot lift (UnliftableError: TensorFlow's features).
    if litert_backbone.engine_for(cfg.extractor) == "litert" \
            and not (chosen.accelerator and cfg.extractor == "auto"):  # a TPU found only now
        litert = litert_backbone.prepare(loaded, spec, cache_dir=cfg.cache_dir, runner=early.runner,
                                         progress=progress)
    with chosen.strategy.scope():
        splits = early.splits()
        progress(Info(f"strategy: {chosen.description}; global batch "
                       f"{cfg.batch_size * chosen.replicas} ({cfg.batch_size} per replica)"))
        if chosen.hint:
            progress(Warn(chosen.hint))
        models = model.build_models(loaded, len(splits.labels), dropout=cfg.dropout, l2=cfg.l2 or 0.0,
                                    seed=cfg.seed, mirror=tunes(cfg) if cfg.mirror is None else cfg.mirror,
                                    activation="sigmoid" if cfg.multi_label else "softmax")
    return chosen, loaded, splits, models, litert, early.pixels if litert else None


def _saved_model(cfg: TrainConfig, models, loaded, splits, staging, *, mirror: bool, chosen, crop: bool = False):
    """The run's SavedModel writer: with the ``tlcli`` signature of an unknown detector
    (``features.unknown``) when the training images allow one (single-label models only: its class
    means need one label a photo). Built here, on this thread, before
    the graph is traced on another; its model in the scope of the ``chosen`` strategy, as the others.
    ``crop``: the classifiers average the crop views too (test-time augmentation, ``features.tta``)."""
    from tlcli.bundle import savedmodel as serving
    from tlcli.features import unknown
    from tlcli.model import classifier as model

    detector, classifier = None, models.classifier
    with chosen.strategy.scope():
        if crop:
            classifier = model.build_classifier(loaded.layer, models.head, loaded.image_size, mirror=mirror, crop=True)
        if not cfg.multi_label and unknown.possible([s.label for s in splits.train], len(splits.labels)):
            with_features = model.build_classifier(loaded.layer, models.head, loaded.image_size, mirror=mirror,
                                                   crop=crop, with_features=True)
            detector = (with_features, unknown.graph_rank(loaded.feature_dim, len(splits.train)))
    return serving.SavedModelExport(classifier, loaded.image_size, splits.labels, staging, unknown=detector)


def _fit_unknown(export, views, splits, *, seed: int) -> dict | None:
    """Fit the unknown detector and its threshold on the training images' final features (after
    fine-tuning, their features have changed) and hand it to ``export``; returns what tlcli.json
    records of it, or None when ``export`` has no ``tlcli`` signature."""
    from tlcli.features import unknown

    if export.unknown_rank is None:
        return None
    detector, info = unknown.fit_views(views, splits.train, len(splits.labels), rank=export.unknown_rank, seed=seed)
    export.set_unknown(detector.arrays())
    return info


def _class_weight(cfg: TrainConfig, samples, labels) -> dict | None:
    if cfg.multi_label:
        return None  # each label's present and absent photos are balanced in its own fit (model.multilabel)
    return data.class_weights([s.label for s in samples], len(labels)) if cfg.class_weights else None


def _fit_head(views, samples, phase: str, *, cfg: TrainConfig, labels, keras_head, state, progress, scalars):
    """The head step (``head.fit_views``), recorded in ``state`` and ``scalars`` and loaded into
    ``keras_head``; the final head of the model is calibrated (``model.calibration``)."""
    from tlcli.model import calibration, head
    from tlcli.model import classifier as model

    cv, done = f"{phase} cv", [0]

    def on_epoch(stage: str, epoch: int, epochs: int, fits: int) -> None:
        if stage == "cross-validation":  # its fits run together: each epoch advances all of them
            if not done[0]:
                progress(Start(cv, total=epochs))
            done[0] = epoch
            progress(Advance(cv, completed=epoch, total=epochs))
        elif epoch == 1:
            if done[0]:  # early stopping ended the cross-validation at done[0] epochs: it is complete
                progress(End(cv, completed=done[0], total=done[0]))
            progress(Start(phase, total=epochs))

    final = phase == "head refit" or not tunes(cfg)  # the model's final head (fine-tuning starts uncalibrated)
    options = dict(head_options(cfg), on_epoch=on_epoch)
    if cfg.multi_label:
        from tlcli.model import multilabel

        fit, truth = multilabel.fit_views(views, samples, len(labels), class_weights=cfg.class_weights, **options)
        fit, info = multilabel.finish(fit, truth, calibrate=final)
        if final:
            state.calibration = info
    else:
        fit = head.fit_views(views, samples, len(labels), class_weight=_class_weight(cfg, samples, labels),
                             **options)
    if final and not cfg.multi_label:
        y = [s.label for s in samples]
        fit, state.calibration = calibration.calibrate(fit, [y[i % len(y)] for i in fit.oof_rows.tolist()])
    state.history[phase] = fit.history
    for row in fit.history:
        scalars.write(phase, row["epoch"], row)
        if row["epoch"] <= fit.epochs:
            progress(Epoch(phase, total=fit.epochs, completed=row["epoch"],
                           logs={k: v for k, v in row.items() if k != "epoch"}))
    progress(End(phase, total=fit.epochs, completed=fit.epochs))
    state.head = run_state.HeadState(fit.epochs, fit.l2, {str(k): v for k, v in fit.cv_loss.items()})
    model.load_head_weights(keras_head, fit.kernel, fit.bias, fit.l2)
    return fit
