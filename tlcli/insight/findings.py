"""The findings on a dataset's features that ``tlcli audit`` reports and ``train`` checks cheaply:
duplicates and train/val leaks, likely mislabels and outliers (``analyse``), and ``train_check``,
training's part of them. They only read the images; they never change them.

Every threshold comes from the training images themselves (printed under ``thresholds``):

- **Near-duplicates**: cosine similarity of the features centred on the training mean (raw
  backbone features share a large common component: on hymenoptera / MobileNetV2, distinct
  photos' nearest neighbours reach 0.81 uncentred and 0.70 centred). A deterministic sample of
  ``CALIBRATION_IMAGES`` training images is copied with each of ``PERTURBATIONS`` (resized and
  re-encoded, JPEG-recompressed, cropped, mirrored) and run through the same backbone; the
  threshold is the ``COPY_QUANTILE`` quantile of the copy-to-original similarities, but never
  below the ``FLOOR_QUANTILE`` quantile of each training image's similarity to its nearest
  *other* training image (exact copies left out), a level that distinct images do reach. The
  floor holds while fewer than 1 - ``FLOOR_QUANTILE`` of the training images have a near copy
  in the training split; beyond that it rises and the audit errs towards reporting fewer groups.
- **Likely mislabels**: out-of-fold probabilities (``FOLDS``-fold, the head's own solver and its
  cross-validated L2 and epoch count) through ``label_noise``: confident learning's candidates,
  flagged only where a fit of the labels (a temperature for the classifier's own errors, a noise
  rate for wrong labels) makes the label more likely wrong than right; ranked by the calibrated
  probability of the label, with the number of false alarms to expect.
- **Outliers**: each image's cosine similarity (raw features: centring on the mean of two
  classes leaves little to tell junk from the classes) to the nearest class centre (the mean
  unit vector of a training class, without the image itself); flagged below
  median - ``OUTLIER_MADS`` x 1.4826 x MAD of the training images' values (4 standard
  deviations of a normal spread, where about 3 in 100,000 images would fall by chance).
"""

from __future__ import annotations

import io
import shlex
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from tlcli import data
from tlcli.config import TrainConfig
from tlcli.data import images
from tlcli.insight import label_noise, neighbours
from tlcli.model import head
from tlcli.progress import Callback, End, Info, Start, Warn, silent

KINDS = ("train_val_leak", "across_classes", "exact", "within_class")  # most suspicious first
CALIBRATION_IMAGES = 32
COPY_QUANTILE = 0.05
FLOOR_QUANTILE = 0.99
FLOOR_SAMPLE = 2000   # training images whose nearest other image sets the floor
FOLDS = 5
OUTLIER_MADS = 4.0
MAD_SIGMA = 1.4826    # MAD -> standard deviation of a normal distribution


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _scaled(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))),
                      Image.Resampling.BILINEAR)


# The copies a near-duplicate search must find: what happens to a photo on its way into a dataset twice.
PERTURBATIONS = {
    "resized to 75% and JPEG 85": lambda img: _jpeg(_scaled(img, 0.75), 85),
    "JPEG 50": lambda img: _jpeg(img, 50),
    "central crop 90%": lambda img: img.crop(images.central_box(*img.size, 0.9)),
    "mirrored": lambda img: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


@dataclass
class DuplicateGroup:
    """Images with the same content or nearly: ``similarity`` is the weakest link that joined
    the group (1.0 for identical files); ``kind`` one of ``KINDS``."""

    paths: list[str]
    labels: list[str]
    splits: list[str]
    similarity: float
    kind: str


@dataclass
class Mislabel:
    path: str
    label: str
    suggested_label: str
    score: float  # 1 - out-of-fold probability of ``label`` (calibrated), in [0, 1]
    false_alarm: float | None = None  # the probability that ``label`` is right after all


@dataclass
class Outlier:
    path: str
    label: str
    score: float  # 1 - cosine similarity to the nearest class centre, in [0, 2]


@dataclass
class AuditResult:
    """What ``audit`` found; every list most suspicious first. ``thresholds`` holds each value a
    finding was judged against, ``image_stats`` the sizes and aspect ratios of the usable images,
    ``files`` the report files written, by name."""

    data_dir: str
    val_dir: str | None
    labels: list[str]
    near_duplicates: list[DuplicateGroup]
    likely_mislabeled: list[Mislabel]
    outliers: list[Outlier]
    class_counts: dict
    skipped: list[dict]
    thresholds: dict
    imbalance: float | None = None
    image_stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    mislabel_estimate: dict = field(default_factory=dict)  # label_noise.LabelNoise.summary()
    extracted: int = 0
    cached: int = 0
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The documented JSON keys first (near_duplicates, likely_mislabeled, outliers,
        class_counts, skipped, thresholds), then the rest."""
        d = asdict(self)
        first = ("near_duplicates", "likely_mislabeled", "outliers", "class_counts", "skipped", "thresholds")
        return {k: d[k] for k in first} | {k: v for k, v in d.items() if k not in first}

    def counts(self) -> dict[str, int]:
        """Findings per kind: each duplicate kind, likely_mislabeled, outliers, skipped."""
        out = {kind: sum(g.kind == kind for g in self.near_duplicates) for kind in KINDS}
        return out | {"likely_mislabeled": len(self.likely_mislabeled), "outliers": len(self.outliers),
                      "skipped": len(self.skipped)}


# ---- near-duplicates -------------------------------------------------------------------------

def copy_similarities(samples, features: np.ndarray, *, extractor, image_size: int, centre: np.ndarray,
                      max_pixels: int, seed: int = 0, batch_size: int = 32, cache=None) -> np.ndarray:
    """float32 [m * len(PERTURBATIONS)]: the similarity (centred cosine) of each perturbed copy of
    a deterministic sample of ``CALIBRATION_IMAGES`` of ``samples`` to its original, whose
    features are the matching rows of ``features``. ``extractor``: what made ``features`` (a Keras model
    from images to features, or a LiteRT runner). ``cache``: (cache_dir, cache key) of those features, so
    that the copies' features are cached beside them (under the original's digest, one key per
    perturbation), or None. Files that no longer decode are left out."""
    from tlcli.features.store import NoStore, model_store

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(samples), min(CALIBRATION_IMAGES, len(samples)), replace=False))
    stores = [model_store(cache[0], f"{cache[1]}-copy{p}", dim=features.shape[1])
              if cache else NoStore() for p in range(len(PERTURBATIONS))]
    found, todo, arrays, rows = {}, [], [], []
    for i in pick.tolist():
        for p, store in enumerate(stores):
            vec = store.get(samples[i].digest)
            if vec is not None:
                found[(i, p)] = vec
        if all((i, p) in found for p in range(len(stores))):
            rows.append(i)
            continue
        try:
            img = images.load_rgb(samples[i].path, max_pixels=max_pixels)
        except images.ImageError:
            continue
        rows.append(i)
        for p, make in enumerate(PERTURBATIONS.values()):
            if (i, p) not in found:
                arrays.append(images.to_model_input(make(img), image_size))
                todo.append((i, p))
    if arrays:
        made = _embed(extractor, np.stack(arrays), batch_size)
        for (i, p), vec in zip(todo, made):
            found[(i, p)] = vec
            stores[p].put(samples[i].digest, vec)
        for store in stores:
            store.flush()  # the store buffers whole shards
    if not rows:
        return np.zeros(0, np.float32)
    copies = np.stack([found[(i, p)] for i in rows for p in range(len(stores))])
    originals = features[np.repeat(rows, len(stores))]
    return neighbours.similarity(copies - centre, originals - centre)


def _embed(extractor, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """float32 features of ``batch`` from a Keras extractor or a LiteRT runner (a callable)."""
    if hasattr(extractor, "predict"):
        return np.asarray(extractor.predict(batch, batch_size=batch_size, verbose=0), np.float32)
    return np.concatenate([np.asarray(extractor(batch[i:i + batch_size]), np.float32)
                           for i in range(0, len(batch), batch_size)])


def duplicate_threshold(train_features: np.ndarray, digests: list[str], copy_sims: np.ndarray, *,
                        seed: int = 0) -> dict:
    """The near-duplicate threshold (see the module docstring) and what it came from:
    {"near_duplicate", "copy_similarity", "distinct_similarity", "calibration_copies"}.
    ``train_features`` are centred."""
    first = sorted({d: i for i, d in reversed(list(enumerate(digests)))}.values())  # one row per content
    distinct = -1.0
    if len(first) >= 2:
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(first), min(FLOOR_SAMPLE, len(first)), replace=False)
        nearest = neighbours.top_k(train_features[first], 1, rows=rows).nearest()
        distinct = float(np.quantile(nearest, FLOOR_QUANTILE))
    copy = float(np.quantile(copy_sims, COPY_QUANTILE)) if len(copy_sims) else 1.0
    # Strictly above the floor: distinct images do reach it, so reaching it proves nothing.
    floor = float(np.nextafter(np.float32(distinct), np.float32(2.0)))
    return {"near_duplicate": max(copy, floor), "copy_similarity": copy, "distinct_similarity": distinct,
            "calibration_copies": int(len(copy_sims))}


def find_duplicates(samples, splits: list[str], features: np.ndarray, labels: list[str],
                    threshold: float) -> list[DuplicateGroup]:
    """Groups of ``samples`` (rows of the centred ``features``; ``splits[i]`` "train" or "val")
    with identical content (same digest) or features at least ``threshold`` similar, joined
    transitively (union-find). Time O(n^2 d / 2), memory O(``neighbours.BLOCK_ROWS`` x n) (see
    ``neighbours.pairs_above``). Sorted by kind (``KINDS`` order), then most similar first."""
    pairs = neighbours.pairs_above(features, threshold)
    by_digest: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_digest.setdefault(s.digest, []).append(i)
    exact = [(same[0], j, 1.0) for same in by_digest.values() for j in same[1:]]
    weakest: dict[int, float] = {}
    groups = neighbours.groups(len(samples), pairs + exact)
    member = {i: g for g, rows in enumerate(groups) for i in rows}
    for i, _, sim in pairs + exact:
        g = member[i]
        weakest[g] = min(weakest.get(g, 1.0), sim)
    out = []
    for g, rows in enumerate(groups):
        rows = sorted(rows, key=lambda i: (splits[i] != "train", samples[i].path))
        names = [labels[samples[i].label] for i in rows]
        where = [splits[i] for i in rows]
        identical = len({samples[i].digest for i in rows}) == 1
        kind = ("train_val_leak" if len(set(where)) > 1 else "across_classes" if len(set(names)) > 1
                else "exact" if identical else "within_class")
        out.append(DuplicateGroup([samples[i].path for i in rows], names, where,
                                  1.0 if identical else round(weakest[g], 6), kind))
    return sorted(out, key=lambda d: (KINDS.index(d.kind), -d.similarity, d.paths[0]))


# ---- likely mislabels ------------------------------------------------------------------------

def out_of_fold(X: np.ndarray, y: np.ndarray, num_classes: int, *, seed: int = 0,
                class_weights: bool = True) -> np.ndarray | None:
    """Out-of-fold probabilities [n, k] for every row of ``X``: ``head.fit_head`` picks the L2
    and the epoch count by cross-validation, then ``FOLDS`` stratified fits with those settings
    each score the rows they did not see. None when a class has fewer than 2 images."""
    y = np.asarray(y, int)
    counts = np.bincount(y, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        return None

    def weights(labels):
        return data.class_weights(labels.tolist(), num_classes) if class_weights else None

    chosen = head.fit_head(X, y, num_classes, class_weight=weights(y), seed=seed)
    folds = min(FOLDS, int(present.min()))
    fold = head.stratified_folds(y, folds, seed)
    probs = np.zeros((len(y), num_classes), np.float32)
    for f in range(folds):
        fit = head.fit_head(X[fold != f], y[fold != f], num_classes, class_weight=weights(y[fold != f]),
                            l2=chosen.l2, epochs=chosen.epochs, fixed_epochs=True, seed=seed)
        probs[fold == f] = head.predict_proba(X[fold == f], fit.kernel, fit.bias)
    return probs


# ---- outliers --------------------------------------------------------------------------------

def centre_similarity(features: np.ndarray, y: np.ndarray, train: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [n]: each row's cosine similarity to the nearest class centre (the mean unit
    vector of the ``train`` rows of a class; a training row's own class centre leaves it out).
    ``train`` is a boolean mask [n]."""
    U = neighbours.normalise(features)
    y = np.asarray(y, int)
    sums = np.zeros((num_classes, U.shape[1]), np.float64)
    np.add.at(sums, y[train], U[train])
    counts = np.bincount(y[train], minlength=num_classes).astype(np.float64)
    sims = np.full((len(U), num_classes), -np.inf)
    for j in range(num_classes):
        if counts[j]:
            sims[:, j] = neighbours.normalise((sums[j] / counts[j])[None])[0] @ U.T
    own = train & (counts[y] > 1)  # leave-one-out for the training row's own class
    loo = neighbours.normalise(sums[y[own]] - U[own])
    sims[np.nonzero(own)[0], y[own]] = np.einsum("ij,ij->i", loo, U[own])
    return sims.max(axis=1).astype(np.float32)


def outlier_threshold(train_sims: np.ndarray) -> dict:
    """{"outlier", "outlier_median", "outlier_mad"}: median - OUTLIER_MADS x MAD_SIGMA x MAD."""
    med = float(np.median(train_sims))
    mad = float(np.median(np.abs(train_sims - med)))
    return {"outlier": med - OUTLIER_MADS * MAD_SIGMA * mad, "outlier_median": med, "outlier_mad": mad}


def engine_of(engine: str, extractors, cache_key: str | None):
    """(what embeds images, its cache key or None) for features made by ``engine`` ("tf" or
    "litert"): the Keras extractor or the LiteRT runner of ``extractors``, and ``cache_key``
    with that engine's suffix (``features.view_key``)."""
    from tlcli.features.views import view_key

    keras_extractor, runner = extractors
    chosen = runner if engine == "litert" and runner is not None else keras_extractor
    return chosen, cache_key and view_key(cache_key, "litert" if chosen is runner else "tf")


def analyse(splits, features: np.ndarray, *, extractor, image_size: int, max_pixels: int, seed: int = 0,
             cache=None, progress: Callback = silent, mislabels: bool = True) -> AuditResult:
    """The findings on ``splits`` (a ``data.Splits``) whose train + val + test images have the
    plain ``features`` (rows in that order; a group across splits is a ``train_val_leak``).
    ``extractor`` makes the calibration copies' features, cached under ``cache`` (see
    ``copy_similarities``). Without ``mislabels`` the out-of-fold fits are skipped (``train``
    has its own)."""
    samples = splits.train + splits.val + splits.test
    n_train, labels = len(splits.train), splits.labels
    where = ["train"] * n_train + ["val"] * len(splits.val) + ["test"] * len(splits.test)
    y = np.array([s.label for s in samples], int)
    centre = features[:n_train].mean(axis=0)
    centred = features - centre
    progress(Start("audit", total=None))
    copies = copy_similarities(splits.train, features[:n_train], extractor=extractor, image_size=image_size,
                               centre=centre, max_pixels=max_pixels, seed=seed, cache=cache)
    thresholds = duplicate_threshold(centred[:n_train], [s.digest for s in splits.train], copies, seed=seed)
    dups = find_duplicates(samples, where, centred, labels, thresholds["near_duplicate"])
    flagged: list[Mislabel] = []
    estimate: dict = {}
    if mislabels:
        probs = out_of_fold(features[:n_train], y[:n_train], len(labels), seed=seed)
        if probs is not None:
            found = label_noise.find(probs, y[:n_train])
            thresholds["mislabel"] = {label: float(v) for label, v in zip(labels, found.thresholds)}
            estimate = found.summary()
            flagged = [Mislabel(samples[i].path, labels[y[i]], labels[c], round(score, 6), round(alarm, 6))
                       for i, c, score, alarm in found.flagged]
        else:
            progress(Warn("likely mislabels: not looked for, a class has fewer than 2 training images"))
    sims = centre_similarity(features, y, np.arange(len(samples)) < n_train, len(labels))
    thresholds |= outlier_threshold(sims[:n_train])
    far = [i for i in np.argsort(sims, kind="stable").tolist() if sims[i] < thresholds["outlier"]]
    outliers = [Outlier(samples[i].path, labels[y[i]], round(float(1.0 - sims[i]), 6)) for i in far]
    progress(End("audit", total=None))
    train_counts = splits.counts(splits.train)
    present = [n for n in train_counts.values() if n]
    class_counts = {"train": train_counts, "val": splits.counts(splits.val)}
    if splits.test:
        class_counts["test"] = splits.counts(splits.test)
    return AuditResult(
        data_dir="", val_dir=None, labels=labels, near_duplicates=dups, likely_mislabeled=flagged,
        outliers=outliers, class_counts=class_counts,
        skipped=[s.to_dict() for s in splits.skipped], thresholds=thresholds, mislabel_estimate=estimate,
        imbalance=round(max(present) / min(present), 4) if present else None, warnings=list(splits.warnings))


# ---- train's cheap part ------------------------------------------------------------------------

# train's check compares every pair of images (O(n^2 d): 100,000 took 1.5 min here, a million
# would take hours and hold its views twice); above this many it is left to 'tlcli audit'.
TRAIN_CHECK_MAX_IMAGES = 100_000


def check_warning(leaks: int, found: label_noise.LabelNoise | None, across: str, command: str) -> str | None:
    """``train``'s one warning line, or None: the ``leaks`` groups of duplicates across the
    splits (``across``), and the likely mislabels only when ``found`` is strong, with the false
    alarms expected among them; ``command`` (the audit, with the same backbone, size, split and
    cache) shows them."""
    parts = [f"{leaks} group(s) of identical or near-identical images across {across}"] if leaks else []
    parts += [label_noise.warning(found)] if found is not None and found.strong else []
    return f"{' and '.join(parts)}; run '{command}' to see them" if parts else None


def train_check(cfg: TrainConfig, splits, views, fit, *, extractors, image_size: int, cache_key: str | None,
                progress: Callback = silent) -> dict | None:
    """``train``'s cheap part of the audit. When it finds something, one warning line (through
    ``progress`` and in ``splits.warnings``) points to ``tlcli audit``. Returns what ``train``
    records in tlcli.json under ``audit``: {"train_val_duplicates": groups of
    kind train_val_leak (identical or near, as ``audit`` finds them), "likely_mislabeled": images
    flagged by ``label_noise.find`` on the head fit's own out-of-fold probabilities (the rows
    it cross-validated: ``fit.oof_rows``; a mirror view's row counts for its image),
    "cross_validated": how many images those were, "mislabels_expected_false_alarms" and
    "mislabels_strong", "mislabels_p_value": the false alarms expected among them, whether the
    finding is strong (the mislabels are part of the warning only then) and the p-value that
    decides it}. ``cfg``: the run's TrainConfig;
    ``cache_key``: its frozen features' (the calibration copies are cached beside them), or None
    (with fine-tuning: the copies are made afresh). ``extractors``: (the Keras extractor, the
    LiteRT runner or None); the copies go through the engine that made ``views``. None, with
    one Info line, above ``TRAIN_CHECK_MAX_IMAGES`` images."""
    if len(splits.train) + len(splits.val) + len(splits.test) > TRAIN_CHECK_MAX_IMAGES:
        progress(Info(f"data check skipped: more than {TRAIN_CHECK_MAX_IMAGES:,} images make it too slow here; "
                      f"run 'tlcli audit --model {shlex.quote(str(cfg.out))}' to check for duplicates and "
                      "mislabeled images"))
        return None
    plain, _ = views.of(splits.train + splits.val + splits.test)
    extractor, key = engine_of(views.engine, extractors, cache_key)
    result = analyse(splits, plain, extractor=extractor, image_size=image_size, max_pixels=cfg.max_pixels,
                      seed=cfg.seed, cache=(cfg.cache_dir, key) if key else None, mislabels=False)
    leaks = sum(g.kind == "train_val_leak" for g in result.near_duplicates)
    n = len(splits.train)
    found = None
    checked = 0
    if len(fit.oof_rows) and not cfg.multi_label:  # a multi-label fit's missing or extra labels: audit's
        image = np.asarray(fit.oof_rows) % n  # fit_views stacks the mirror rows after the plain ones
        sums = np.zeros((n, fit.oof_probs.shape[1]))
        np.add.at(sums, image, fit.oof_probs)
        seen = np.unique(image)
        probs = sums[seen] / np.bincount(image, minlength=n)[seen][:, None]
        found = label_noise.find(probs, np.array([splits.train[i].label for i in seen]))
        checked = len(seen)
    across = "train and val" + (" or test" if splits.test else "")
    warning = check_warning(leaks, found, across, f"tlcli audit --model {shlex.quote(str(cfg.out))}")
    if warning:
        progress(Warn(warning))
        splits.warnings.append(warning)
    flagged = len(found.flagged) if found else 0
    return {"train_val_duplicates": leaks, "likely_mislabeled": flagged, "cross_validated": checked,
            "mislabels_expected_false_alarms": round(found.expected_false_alarms, 2) if found else 0.0,
            "mislabels_strong": bool(found and found.strong),
            "mislabels_p_value": float(f"{found.p_value:.3g}") if found else 1.0}


