"""``--backbone A,B,...`` and ``--backbone auto``: the backbone chosen on the user's training photos.

``choose`` scans the images once, extracts each candidate's features of the training images
(through the feature store and the run's engine, so the chosen one's are already cached for the
run), measures each one's extraction time on one batch, and cross-validates the head on each
(``model.selection``). The best two, concatenated, are one more candidate, frozen only: kept
only when their CV accuracy is strictly higher than the best single backbone's, since they cost
both extractions. The validation and test images (--val-dir, DIR/val, DIR/test) are never
looked at. The recipe then trains with the winner as if it had been given alone.

With --time-budget, each candidate is first loaded and timed, and its features already in the
store counted; ``plan.extraction_plan`` then decides which to extract (the first always), the
plan is said, and the others are left out with a note.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlcli import data
from tlcli.config import TrainConfig, head_options, hub_cache_dir, tunes
from tlcli.errors import UsageError
from tlcli.model import selection
from tlcli.model.backbone import BackboneSpec, cache_key, concatenation, resolve_spec
from tlcli.progress import Callback, Info, silent
from tlcli.training.plan import CHOICE_SHARE, ExtractionPlan, extraction_plan
from tlcli.training.plan import Candidate as Rated

TIMING_IMAGES = 16  # the batch each candidate's extraction is timed on (after a warm-up call)
_SIGNATURE_NOTE = "{name} left out: it runs through a signature, which --fine-tune cannot train"


@dataclass
class BackboneChoice:
    """The leaderboard (``standings``, best first), the winner's name and why it won, and the
    seconds the choice took. What tlcli.json records as ``backbone_choice``."""

    standings: list[selection.Standing]
    winner: str
    reason: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    # With --time-budget: which candidates were extracted, and their rates (``plan.ExtractionPlan``);
    # the run's own plan lists them (tlcli.json ``plan``).
    plan: ExtractionPlan | None = None

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


def choose(cfg: TrainConfig, specs: list[BackboneSpec], progress: Callback = silent, deadline=None):
    """(data.Splits, BackboneChoice, the winner's spec): see the module docstring. ``deadline``:
    the run's ``plan.Deadline``; with a budget, only the candidates ``plan.extraction_plan``
    allows are extracted (``_budgeted``). Raises what the scan, ``backbone.load`` and the
    extraction raise, and ``UsageError`` when a class has too few training images to cross-validate."""
    start = time.perf_counter()
    splits = data.scan_splits(cfg, image_size=specs[0].image_size or 224, progress=progress)
    samples, k = splits.train, len(splits.labels)
    y = np.array([s.label for s in samples], int)
    names, notes, plan = _names(specs), [], None
    if deadline is not None and deadline.budget_s is not None:
        candidates, plan = _budgeted(cfg, specs, names, splits, deadline, notes, progress)
    else:
        candidates = _every(cfg, specs, names, samples, notes, progress)
    if not candidates:
        raise UsageError(f"--backbone {cfg.backbone}: with --fine-tune, no candidate can be trained (each runs "
                         "through a signature); train without --fine-tune")
    options = dict(head_options(cfg), class_weight=data.class_weights(y.tolist(), k) if cfg.class_weights else None)
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
    seconds = time.perf_counter() - start
    return splits, BackboneChoice(standings, standings[0].name, reason, seconds, notes, plan), winner_spec


def _every(cfg: TrainConfig, specs, names, samples, notes: list[str], progress: Callback) -> dict:
    """The candidates (as ``_extracted`` gives them, by name), each one timed (``_measured``) and
    its features of ``samples`` extracted; a note for each one left out."""
    candidates = {}
    for i, (name, spec) in enumerate(zip(names, specs)):
        progress(Info(f"candidate {i + 1}/{len(specs)}: {name}"))
        found = _measured(cfg, spec, samples, progress)
        if found is None:
            notes.append(_SIGNATURE_NOTE.format(name=name))
        else:
            candidates[name] = _extracted(cfg, name, found, samples, progress)
    return candidates


def _budgeted(cfg: TrainConfig, specs, names, splits, deadline, notes: list[str], progress: Callback):
    """(the candidates extracted, as ``_extracted`` gives them, by name; the ExtractionPlan or None
    when none can be trained): each candidate loaded, timed and its stored features counted
    (``_measured``, ``_stored``), then only those ``plan.extraction_plan`` allows within the budget extracted,
    the plan said first; a note for each one left out. Once loading and timing have spent the
    choice's share of the budget, the candidates after them are not even loaded."""

    measured, share_ends = {}, deadline.elapsed() + CHOICE_SHARE * max(0.0, deadline.left())
    for i, (name, spec) in enumerate(zip(names, specs)):
        if measured and deadline.elapsed() > share_ends:
            notes.append(f"{name} left out: not timed, the choice's half of the budget went on timing the others")
            continue
        progress(Info(f"timing candidate {i + 1}/{len(specs)}: {name}"))
        found = _measured(cfg, spec, splits.train, progress)
        if found is None:
            notes.append(_SIGNATURE_NOTE.format(name=name))
        else:
            measured[name] = found
    if not measured:
        return {}, None
    rated = [Rated(name, m.loaded.image_size, extract_rate=1000 / m.ms if m.ms else math.inf,
                   cached=_stored(cfg, m, splits.train)) for name, m in measured.items()]
    # The share ends where it did before the timing: timing and extracting spend the same half.
    plan = extraction_plan(deadline.budget_s, deadline.elapsed(), rated, n_train=len(splits.train),
                           n_rest=len(splits.val) + len(splits.test), share_s=max(0.0, share_ends - deadline.elapsed()))
    progress(Info(plan.describe()))
    notes.extend(plan.notes)
    measured = {name: measured[name] for name in plan.backbones}  # the others' models are let go now
    candidates = {}
    for i, name in enumerate(plan.backbones):
        progress(Info(f"candidate {i + 1}/{len(plan.backbones)}: {name}"))
        candidates[name] = _extracted(cfg, name, measured.pop(name), splits.train, progress)
    return candidates, plan


class _Measured(NamedTuple):
    """One candidate ready to extract: its ``spec``, ``loaded`` backbone, ``engines`` (as
    ``features.frozen_engines`` gives them) and ``ms`` per image on the engine that will extract
    (None: no readable image timed)."""

    spec: BackboneSpec
    loaded: object
    engines: tuple
    ms: float | None


def _measured(cfg: TrainConfig, spec: BackboneSpec, samples, progress: Callback) -> _Measured | None:
    """One candidate loaded and timed on ``samples``' first images; None with --fine-tune for a
    backbone run through a signature (it cannot be trained)."""
    from tlcli import features
    from tlcli.model import backbone
    from tlcli.model.litert import PARITY_IMAGES

    loaded = backbone.load(spec, path=backbone.fetch(spec))
    if cfg.fine_tune and loaded.signature is not None:  # (a budget alone plans such a winner head-only)
        return None
    extractor, runner = features.frozen_engines(loaded, spec, cfg=cfg, progress=progress)
    if runner is not None and not features.agrees(runner, extractor, samples[:PARITY_IMAGES], progress=progress,
                                                  image_size=loaded.image_size, max_pixels=cfg.max_pixels):
        runner = None  # TensorFlow extracts then, as compute_views would decide (the warning is said)
    ms = _ms_per_image(runner or extractor, samples, loaded.image_size, cfg.max_pixels)
    return _Measured(spec, loaded, (extractor, runner), ms)


def _stored(cfg: TrainConfig, m: _Measured, samples) -> int:
    """How many of ``samples``' features the engine that will extract ``m`` has in the store."""
    from tlcli import features

    runner = m.engines[1]
    key = features.view_key(cache_key(m.spec, m.loaded.image_size), "litert" if runner is not None else "tf")
    store = features.model_store(cfg.cache_dir, key, dim=m.loaded.feature_dim)
    return sum(store.get(s.digest) is not None for s in samples)


def _extracted(cfg: TrainConfig, name: str, m: _Measured, samples, progress: Callback):
    """(selection.Candidate, spec, engine) of the candidate ``m``: its plain features of
    ``samples`` (cached by the feature store under the run's own keys) and its measured ms/image."""
    from tlcli import features

    views, _, _ = features.frozen_views(m.loaded, m.spec, samples, cfg=cfg, progress=progress, engines=m.engines,
                                        cache_key=cache_key(m.spec, m.loaded.image_size))
    c = selection.Candidate(name, np.asarray(views.plain, np.float32), m.loaded.image_size, m.ms, [name])
    return c, m.spec, views.engine


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
