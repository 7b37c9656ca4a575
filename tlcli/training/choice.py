"""``--backbone A,B,...`` and ``--backbone auto``: the backbone chosen on the user's training photos;
and ``--time-budget``'s plan.

``choose`` scans the images once, extracts each candidate's features of the training images
(through the feature store and the run's engine, so the chosen one's are already cached for the
run), measures each one's extraction time on one batch, and cross-validates the head on each
(``model.selection``). The best two, concatenated, are one more candidate, frozen only: kept
only when their CV accuracy is strictly higher than the best single backbone's, since they cost
both extractions. The validation and test images (--val-dir, DIR/val, DIR/test) are never
looked at. The recipe then trains with the winner as if it had been given alone.

``--time-budget`` (from ``make_plan`` on): the plan of a run inside a wall-time budget, from
rates measured on this machine, and the deadline the run keeps.

``make_plan`` is a pure function of the budget, the time already spent, the image counts and
each candidate backbone's measured rates: which candidates' features to extract (the first
always: the head-only model is the floor every run reaches), whether to fine-tune the first,
for how many epochs and at what resolution. Costs are images over rates, plus what must follow
fine-tuning (the holdout checks, the features again, the head refit and the bundle), with a
margin, so the planned run ends inside the budget when the rates hold; the fine-tuning loop
then checks the clock after every batch and every epoch (``Deadline``) for when they do not.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tlcli import data
from tlcli.config import DEFAULTS, TrainConfig, hub_cache_dir, tunes
from tlcli.errors import UsageError
from tlcli.model import selection
from tlcli.model.backbone import BackboneSpec, cache_key, concatenation, resolve_spec
from tlcli.progress import Callback, Info, silent

TIMING_IMAGES = 16  # the batch each candidate's extraction is timed on (after a warm-up call)


@dataclass
class BackboneChoice:
    """The leaderboard (``standings``, best first), the winner's name and why it won, and the
    seconds the choice took. What tlcli.json records as ``backbone_choice``."""

    standings: list[selection.Standing]
    winner: str
    reason: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"winner": self.winner, "reason": self.reason, "seconds": round(self.seconds, 2),
                "notes": list(self.notes), "candidates": [s.to_dict() for s in self.standings]}


def candidate_specs(cfg: TrainConfig) -> list[BackboneSpec]:
    """The specs of ``cfg.backbone``'s candidates: "A,B,..." (each as ``--backbone`` takes it), or
    "auto": every preset already in the TF Hub cache. Raises ``UsageError`` / ``BackboneError``."""
    from tlcli.model import hub_cache
    from tlcli.model.presets import PRESETS

    if cfg.backbone == "auto":
        names = [p.name for p in PRESETS.values() if hub_cache.status(p.handle, p.name).cached]
        if not names:
            raise UsageError(f"--backbone auto: no preset is in the TF Hub cache ({hub_cache_dir()}); "
                             "fetch some with 'tlcli models fetch NAME', or list the backbones as A,B")
    else:
        names = [n.strip() for n in cfg.backbone.split(",") if n.strip()]
    specs = [resolve_spec(n, cfg.image_size) for n in names]
    if len({s.cache_key() for s in specs}) != len(specs):
        raise UsageError(f"--backbone {cfg.backbone}: a candidate is named twice; name each backbone once")
    return specs


def _names(specs: list[BackboneSpec]) -> list[str]:
    """Short names of the candidates: the preset, else a local folder's name or the handle past
    its scheme, else (when two would share one) the handle itself."""
    short = [s.preset or (Path(s.handle).name if s.is_local else s.handle.split("://", 1)[-1]) for s in specs]
    return [n if short.count(n) == 1 else s.handle for n, s in zip(short, specs)]


def choose(cfg: TrainConfig, specs: list[BackboneSpec], progress: Callback = silent):
    """(data.Splits, BackboneChoice, the winner's spec): see the module docstring. Raises what
    the scan, ``backbone.load`` and the extraction raise, and ``UsageError`` when a class has too
    few training images to cross-validate."""
    start = time.perf_counter()
    splits = data.scan_splits(cfg, image_size=specs[0].image_size or 224, progress=progress)
    samples, k = splits.train, len(splits.labels)
    y = np.array([s.label for s in samples], int)
    names, candidates, notes = _names(specs), {}, []
    for i, (name, spec) in enumerate(zip(names, specs)):
        progress(Info(f"candidate {i + 1}/{len(specs)}: {name}"))
        found = candidate(cfg, spec, name, samples, progress)
        if found is None:
            notes.append(f"{name} left out: it runs through a signature, which --fine-tune cannot train")
        else:
            candidates[name] = found
    if not candidates:
        raise UsageError(f"--backbone {cfg.backbone}: with --fine-tune, no candidate can be trained (each runs "
                         "through a signature); train without --fine-tune")
    options = dict(class_weight=data.class_weights(y.tolist(), k) if cfg.class_weights else None, epochs=cfg.epochs,
                   learning_rate=cfg.learning_rate, label_smoothing=cfg.label_smoothing, patience=cfg.patience,
                   seed=cfg.seed, l2=cfg.l2)
    standings = selection.leaderboard([c for c, _, _ in candidates.values()], y, k, **options)
    winner_spec = candidates[standings[0].name][1]
    if len(standings) >= 2:
        pair = _concatenation(cfg, standings[:2], candidates, y, k, samples, options, notes)
        if pair is not None:
            standings = selection.ranked([*standings, pair[0]])
            if standings[0] is pair[0]:
                winner_spec = pair[1]
    reason = selection.verdict(standings)
    progress(Info(f"backbone: {reason}"))
    return splits, BackboneChoice(standings, standings[0].name, reason, time.perf_counter() - start, notes), winner_spec


def _concatenation(cfg, best_two, candidates, y, k, samples, options, notes):
    """(Standing, spec) of the best two candidates' features concatenated, or None (with a note)
    when they cannot be: --fine-tune, or input sizes that differ. When it wins, its features of
    ``samples`` go into the store under its own key, so the run does not extract them again."""
    a, b = (candidates[s.name] for s in best_two)
    pair = selection.concatenated(a[0], b[0])
    if tunes(cfg) or pair is None:
        why = "fine-tuning trains one backbone" if tunes(cfg) else "their input sizes differ"
        notes.append(f"{a[0].name} + {b[0].name} not tried: {why}")
        return None
    standing = selection.leaderboard([pair], y, k, **options)[0]
    spec = concatenation([a[1], b[1]], pair.image_size)
    if selection.ranked([best_two[0], standing])[0] is standing:
        _store_concatenated(cfg, spec, pair, samples, engine=a[2] if a[2] == b[2] else None)
    return standing, spec


def candidate(cfg: TrainConfig, spec: BackboneSpec, name: str, samples, progress: Callback = silent):
    """(selection.Candidate, spec, engine) of one backbone: its plain features of ``samples``
    (cached by the feature store under the run's own keys) and its measured ms/image; None
    with --fine-tune for a backbone run through a signature (it cannot be trained)."""
    from tlcli import features
    from tlcli.model import backbone

    loaded = backbone.load(spec, path=backbone.fetch(spec))
    if tunes(cfg) and loaded.signature is not None:
        return None
    views, extractor, runner = features.frozen_views(loaded, spec, samples, cfg=cfg, progress=progress,
                                                     cache_key=cache_key(spec, loaded.image_size))
    engine = runner if views.engine == "litert" else extractor
    ms = _ms_per_image(engine, samples, loaded.image_size, cfg.max_pixels)
    c = selection.Candidate(name, np.asarray(views.plain, np.float32), loaded.image_size, ms, [name])
    return c, spec, views.engine


def _ms_per_image(engine, samples, size: int, max_pixels: int) -> float | None:
    """Milliseconds per image of ``engine`` (a LiteRT runner, or a Keras extractor) on up to
    ``TIMING_IMAGES`` of ``samples``, decoded beforehand, after one warm-up call; None without
    a readable image."""
    from tlcli.features.extraction import model_input, tf_features

    batch = [x for x, _ in (model_input(s, size, max_pixels, None) for s in samples[:TIMING_IMAGES]) if x is not None]
    if not batch:
        return None
    x = np.stack(batch)
    run = engine if callable(engine) and not hasattr(engine, "predict") else (lambda b: tf_features(engine, b))
    run(x[:8])
    t = time.perf_counter()
    run(x)
    return (time.perf_counter() - t) * 1000 / len(x)


def _store_concatenated(cfg: TrainConfig, spec: BackboneSpec, pair: selection.Candidate, samples,
                        engine: str | None) -> None:
    """Put ``pair``'s features of ``samples`` into the store of ``spec`` (the concatenation) for
    ``engine``'s views, the ones the run will read; nothing when the parts' engines differ."""
    from tlcli.features import model_store, view_key

    if engine is None:
        return
    store = model_store(cfg.cache_dir, view_key(cache_key(spec, pair.image_size), engine), dim=pair.features.shape[1])
    for s, vec in zip(samples, pair.features):
        store.put(s.digest, vec)
    store.flush()


# ---- --time-budget: the plan from measured rates, and the deadline --------------------------------
# A fine-tuning step runs the backbone forward and backward (about three forward passes), so the
# forward rate of a backbone being fine-tuned (holdout checks, features afterwards) is taken as
# this many times its measured training rate.
FORWARD_PER_TRAIN = 3.0
# Held back from the plan for what is not proportional to images: the head refit on the new
# features, the SavedModel's variables and the bundle's files; and a share of every estimate,
# since the machine's load can change while the run goes on.
FIXED_RESERVE_S = 15.0
MARGIN = 0.15
# Fewer fine-tuning epochs than this are not worth their start (the warm-up alone takes part of one).
MIN_EPOCHS = 2
# A budgeted run without --fine-tune-epochs fine-tunes at most this many epochs; early stopping on
# the holdout usually ends it sooner on a small set.
MAX_EPOCHS = 15
# Weight averaging evaluates the holdout about once per epoch checkpoint after training.
SOUP_EVALS_PER_EPOCH = 1.0


@dataclass(frozen=True)
class Candidate:
    """A backbone the run may use, with its rates measured on this machine in images/s:
    ``extract_rate`` of its frozen features (one view), ``train_rate`` of a fine-tuning step
    (None: not measured, or it cannot be trained), at ``image_size``; ``extracted``: its
    features are already in hand (from the cache or earlier in this run)."""

    name: str
    image_size: int
    extract_rate: float
    train_rate: float | None = None
    extracted: bool = False


@dataclass
class Plan:
    """What the run will do inside ``budget_s`` (seconds), decided at ``elapsed_s`` into it:
    the ``backbones`` whose features it extracts (in order; the first is fine-tuned when
    ``fine_tune``), ``epochs`` of fine-tuning at ``image_size``, and its ``estimated_s`` end
    (seconds from the run's start). ``reason`` says why in one line; ``rates`` holds the
    measured images/s each decision used."""

    budget_s: float
    elapsed_s: float
    backbones: list[str]
    fine_tune: bool
    epochs: int
    image_size: int
    estimated_s: float
    reason: str
    rates: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for the progress output."""
        what = (f"fine-tune {self.epochs} epoch{'s' * (self.epochs != 1)} at {self.image_size} px"
                if self.fine_tune else "head only")
        return (f"plan for {format_duration(self.budget_s)}: {what}, about "
                f"{format_duration(self.estimated_s)} in all ({self.reason})")


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``; ``3600`` -> ``1h``; ``42.4`` -> ``42s``."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def finish_seconds(*, n_all: int, n_holdout: int, views: int, forward_rate: float, epochs: int) -> float:
    """Seconds that fine-tuning's ``epochs`` leave to follow them: the weight-averaging checks on
    the holdout, the ``views`` features of all ``n_all`` images through the fine-tuned backbone
    at ``forward_rate`` images/s, and the fixed reserve; all with the margin."""
    soup = SOUP_EVALS_PER_EPOCH * epochs * n_holdout / forward_rate
    return (n_all * views / forward_rate + soup) * (1 + MARGIN) + FIXED_RESERVE_S


def epoch_seconds(*, n_fit: int, n_holdout: int, train_rate: float) -> float:
    """Seconds of one fine-tuning epoch: ``n_fit`` images trained and ``n_holdout`` checked."""
    return (n_fit / train_rate + n_holdout / (FORWARD_PER_TRAIN * train_rate)) * (1 + MARGIN)


def make_plan(budget_s: float, elapsed_s: float, candidates: list[Candidate], *, n_fit: int, n_holdout: int,
              n_all: int, views: int, max_epochs: int = MAX_EPOCHS) -> Plan:
    """The plan (see the module's docstring). ``candidates`` is never empty; the first is the
    one fine-tuned (the caller puts the chosen backbone first). ``views``: feature views per
    image after fine-tuning (2 with mirror averaging). The head-only path needs the frozen
    ``views`` of every image, from ``extract_rate`` unless ``extracted``."""
    first = candidates[0]
    left = budget_s - elapsed_s
    extract = [c.name for c in candidates if c.extracted]
    rates = {c.name: {"extract": round(c.extract_rate, 2)} for c in candidates}
    for c in candidates:  # the others' features, in order, while they fit
        cost = n_all * (1 + MARGIN) / c.extract_rate
        if not c.extracted and (c is first or cost <= left):
            extract.append(c.name)
            left -= cost
    ordered = [c.name for c in candidates if c.name in extract]
    # Head only: the remaining frozen views (the mirror views wait for fine-tuning's verdict).
    head_only_s = (n_all * (views - 1) / first.extract_rate) * (1 + MARGIN) + FIXED_RESERVE_S
    plan = dict(budget_s=float(budget_s), elapsed_s=float(elapsed_s), backbones=ordered, image_size=first.image_size,
                rates=rates)
    if first.train_rate is None or first.train_rate <= 0:
        return Plan(**plan, fine_tune=False, epochs=0, estimated_s=budget_s - left + head_only_s,
                    reason="no rate of fine-tuning measured")
    rates[first.name]["train"] = round(first.train_rate, 2)
    forward = FORWARD_PER_TRAIN * first.train_rate
    per_epoch = epoch_seconds(n_fit=n_fit, n_holdout=n_holdout, train_rate=first.train_rate)
    epochs = 0
    for e in range(max_epochs, 0, -1):
        if e * per_epoch + finish_seconds(n_all=n_all, n_holdout=n_holdout, views=views, forward_rate=forward,
                                          epochs=e) <= left:
            epochs = e
            break
    if epochs < MIN_EPOCHS:
        return Plan(**plan, fine_tune=False, epochs=0, estimated_s=budget_s - left + head_only_s,
                    reason=f"{MIN_EPOCHS} epochs of {format_duration(per_epoch)} do not fit")
    used = epochs * per_epoch + finish_seconds(n_all=n_all, n_holdout=n_holdout, views=views, forward_rate=forward,
                                               epochs=epochs)
    capped = f", at most {max_epochs} epochs" if epochs == max_epochs else ""
    return Plan(**plan, fine_tune=True, epochs=epochs, estimated_s=budget_s - left + used,
                reason=f"training at {first.train_rate:.1f} images/s{capped}")


class Deadline:
    """The wall-clock end of a budget that began at ``started`` (``time.monotonic()``), or none
    (``budget_s`` None: ``left()`` is infinite)."""

    def __init__(self, budget_s: float | None, *, started: float | None = None):
        self.budget_s = budget_s
        self.started = time.monotonic() if started is None else started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()


class Planner:
    """The plan of one run's fine-tuning, made when its rate is measured: ``planner(train_rate)
    -> (epochs, reserve_s)`` as ``finetuning.fine_tune`` asks, with the plan said (an ``Info``
    event) and kept in ``plan``. ``splits``: the run's ``data.Splits``; ``extract_rate``: the
    measured images/s of the frozen features (None: all came from the cache)."""

    def __init__(self, cfg, splits, deadline: Deadline, *, name: str, image_size: int, views: int,
                 extract_rate: float | None, progress):
        self.deadline, self.progress, self.plan = deadline, progress, None
        self.name, self.image_size, self.views, self.extract_rate = name, image_size, views, extract_rate
        self.counts = dict(n_fit=len(splits.fit), n_holdout=len(splits.holdout),
                           n_all=len(splits.train) + len(splits.val) + len(splits.test))
        # --fine-tune-epochs caps the plan when it was given; its default is --fine-tune's own.
        self.max_epochs = MAX_EPOCHS if cfg.fine_tune_epochs == DEFAULTS.fine_tune_epochs else cfg.fine_tune_epochs

    def worth_measuring(self) -> bool:
        """Whether there is time to time a few fine-tuning steps (a trace and three batches, about
        as long as extracting the features took) and still finish head-only; if not, the plan is
        made now without fine-tuning."""
        n_all, views = self.counts["n_all"], self.views
        head_only = n_all * views / (self.extract_rate or 1.0) * (1 + MARGIN) + FIXED_RESERVE_S
        if self.deadline.left() >= 2 * head_only:
            return True
        self(0.0, why="no time left to time fine-tuning")
        return False

    def __call__(self, train_rate: float, *, why: str | None = None) -> tuple[int, float]:
        rate = train_rate if train_rate > 0 else None
        extract = self.extract_rate or (FORWARD_PER_TRAIN * rate if rate else 1.0)
        first = Candidate(self.name, self.image_size, extract_rate=extract, train_rate=rate, extracted=True)
        self.plan = make_plan(self.deadline.budget_s, self.deadline.elapsed(), [first], views=self.views,
                              max_epochs=self.max_epochs, **self.counts)
        if why:
            self.plan.reason = why
        self.progress(Info(self.plan.describe()))
        if not self.plan.fine_tune:
            return 0, 0.0
        reserve = finish_seconds(n_all=self.counts["n_all"], n_holdout=self.counts["n_holdout"], views=self.views,
                                 forward_rate=FORWARD_PER_TRAIN * rate, epochs=self.plan.epochs)
        return self.plan.epochs, reserve
