"""``tlcli audit``: the duplicates, train/val leaks, likely mislabels and outliers of a dataset,
from the backbone features training computes (same scan, split and feature cache, so an audit
after ``train`` extracts nothing). The audit only reads the images; it never changes them.

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
- **Likely mislabels**: confident learning on out-of-fold probabilities (``FOLDS``-fold, the
  head's own solver and its cross-validated L2 and epoch count): per-class thresholds (the mean
  probability of class j over the images labelled j) count the images confidently of another
  class than their label, and that count, calibrated, says how many of each label to flag,
  those most probably of the other class (``confident_learning``); score = 1 - p(own label).
- **Outliers**: each image's cosine similarity (raw features: centring on the mean of two
  classes leaves little to tell junk from the classes) to the nearest class centre (the mean
  unit vector of a training class, without the image itself); flagged below
  median - ``OUTLIER_MADS`` x 1.4826 x MAD of the training images' values (4 standard
  deviations of a normal spread, where about 3 in 100,000 images would fall by chance).
"""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from tlcli import data, head, html_report, images, neighbours
from tlcli.config import DEFAULTS, TrainConfig, validate
from tlcli.progress import Callback, End, Info, Start, Warn, silent

KINDS = ("train_val_leak", "across_classes", "exact", "within_class")  # most suspicious first
CALIBRATION_IMAGES = 32
COPY_QUANTILE = 0.05
FLOOR_QUANTILE = 0.99
FLOOR_SAMPLE = 2000   # training images whose nearest other image sets the floor
FOLDS = 5
OUTLIER_MADS = 4.0
MAD_SIGMA = 1.4826    # MAD -> standard deviation of a normal distribution
REPORT_HTML = "audit.html"
HTML_FINDINGS = 300  # per kind on the page (each a thumbnail); the CSV files hold every finding
CSV_FILES = {"near_duplicates": "near_duplicates.csv", "likely_mislabeled": "likely_mislabeled.csv",
             "outliers": "outliers.csv"}


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
    score: float  # 1 - out-of-fold probability of ``label``, in [0, 1]


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
    extracted: int = 0
    cached: int = 0
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The issue's JSON schema first (near_duplicates, likely_mislabeled, outliers,
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
    from tlcli import features as feature_cache

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(samples), min(CALIBRATION_IMAGES, len(samples)), replace=False))
    stores = [feature_cache.FeatureCache(cache[0], f"{cache[1]}-copy{p}", dim=features.shape[1])
              if cache else feature_cache.NoCache() for p in range(len(PERTURBATIONS))]
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


def confident_learning(probs: np.ndarray, y: np.ndarray) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """([(row, suggested class, score)], per-class thresholds [k]) from out-of-fold ``probs``
    [n, k] and labels ``y`` [n], most suspicious (lowest probability of its label) first.

    Confident learning (Northcutt et al., 2021; cleanlab's prune-by-noise-rate): the threshold
    t_j of class j is the mean probability of j over the images labelled j (inf without any).
    An image is *confidently* of class j when p_j >= t_j (the most probable such class); the
    counts of (label i, confident class j), scaled so that each label's row sums to the images
    with that label, estimate how many images labelled i are really j. That many images labelled
    i, those with the largest p_j - p_i, are the suspects of (i, j); a suspect whose most
    probable class is its own label is dropped. Score: 1 - p(own label), in [0, 1]."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, int)
    n, k = probs.shape
    t = np.array([probs[y == j, j].mean() if (y == j).any() else np.inf for j in range(k)])
    above = probs >= t[None, :]
    counted = above.any(axis=1)
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    joint = np.zeros((k, k))
    np.add.at(joint, (y[counted], confident[counted]), 1.0)
    scale = np.bincount(y, minlength=k) / np.maximum(joint.sum(axis=1), 1.0)
    suggested: dict[int, int] = {}
    for i, j in zip(*np.nonzero(joint * scale[:, None] * (1 - np.eye(k)) >= 0.5)):
        rows = np.nonzero(y == i)[0]
        margin = probs[rows, j] - probs[rows, i]
        for r in rows[np.argsort(-margin, kind="stable")[:int(round(joint[i, j] * scale[i]))]].tolist():
            if r not in suggested or probs[r, j] > probs[r, suggested[r]]:
                suggested[r] = int(j)
    own = probs[np.arange(n), y]
    ranked = sorted((r for r in suggested if probs[r].argmax() != y[r]), key=lambda r: (own[r], r))
    return [(r, suggested[r], float(1.0 - own[r])) for r in ranked], t


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


# ---- the rest of the picture -----------------------------------------------------------------

def _size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:  # the header only
            return img.size
    except Exception:  # changed since the scan: it simply is not counted
        return None


def image_stats(samples, image_size: int) -> dict:
    """Width, height and aspect ratio (width / height) of ``samples``' files: min, median and max,
    and how many have a shorter side below ``image_size`` (upscaled for the model). Sizes are
    read from the file headers (EXIF orientation not applied)."""
    with ThreadPoolExecutor(8) as pool:
        sizes = [s for s in pool.map(_size, [s.path for s in samples]) if s]
    if not sizes:
        return {}
    w, h = np.array(sizes, float).T
    stats = {name: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
             for name, v in (("width", w), ("height", h), ("aspect_ratio", w / h))}
    return stats | {"images": len(sizes), "smaller_than_input": int((np.minimum(w, h) < image_size).sum())}


# ---- the command -----------------------------------------------------------------------------

def audit(data_dir: str | os.PathLike, *, val_dir: str | os.PathLike | None = None,
          val_split: float = DEFAULTS.val_split, seed: int = DEFAULTS.seed, backbone: str = DEFAULTS.backbone,
          image_size: int | None = None, cache_dir: str | os.PathLike | None = None,
          batch_size: int = DEFAULTS.batch_size, max_pixels: int = DEFAULTS.max_pixels, strict: bool = False,
          extractor: str = DEFAULTS.extractor, report_dir: str | os.PathLike | None = None, force: bool = False,
          progress: Callback = silent) -> AuditResult:
    """Audit ``data_dir/<class>/*`` (and ``val_dir``, or the ``val_split`` that ``train`` with the
    same ``seed`` makes): scan and split exactly as ``tlcli train`` does, features of the frozen
    ``backbone`` through the same cache, then the findings of the module docstring.
    ``report_dir``: also write ``REPORT_HTML`` (thumbnails side by side) and ``CSV_FILES`` there;
    a folder that is not empty is refused unless ``force``. Never writes into the image folders.
    Raises ``UsageError`` for a bad option, ``DatasetError`` / ``BackboneError`` as ``train``."""
    from tlcli.backbone import fetch, resolve_spec

    start = time.perf_counter()
    cfg = TrainConfig(data_dir=str(data_dir), val_dir=str(val_dir) if val_dir else None, val_split=val_split,
                      seed=seed, backbone=backbone, image_size=image_size,
                      cache_dir=str(cache_dir) if cache_dir else None, batch_size=batch_size,
                      max_pixels=max_pixels, strict=strict, extractor=extractor, tensorboard=None)
    validate(cfg)
    data.check_folder(cfg.data_dir)
    if cfg.val_dir:
        data.check_folder(cfg.val_dir, "--val-dir")
    out_dir = None
    if report_dir is not None:
        out_dir = html_report.prepare_dir(report_dir, data=[("DIR", cfg.data_dir), ("--val-dir", cfg.val_dir)],
                                          force=force)
    spec = resolve_spec(cfg.backbone, cfg.image_size)
    path = fetch(spec)
    views, splits, extractor, size, key = dataset_features(cfg, spec, path, progress)
    result = findings(splits, views.plain, extractor=extractor, image_size=size, max_pixels=cfg.max_pixels,
                      seed=cfg.seed, cache=(cfg.cache_dir, key), progress=progress)
    result.data_dir, result.val_dir = str(data_dir), cfg.val_dir
    result.extracted, result.cached = views.extracted, views.cached
    result.image_stats = image_stats(splits.train + splits.val, size)
    if out_dir is not None:
        result.files = write_report(result, out_dir)
    result.seconds = time.perf_counter() - start
    return result


def engine_of(engine: str, extractors, cache_key: str | None):
    """(what embeds images, its cache key or None) for features made by ``engine`` ("tf" or
    "litert"): the Keras extractor or the LiteRT runner of ``extractors``, and ``cache_key``
    with that engine's suffix (``features.view_key``)."""
    from tlcli.features import view_key

    keras_extractor, runner = extractors
    chosen = runner if engine == "litert" and runner is not None else keras_extractor
    return chosen, cache_key and view_key(cache_key, "litert" if chosen is runner else "tf")


def dataset_features(cfg: TrainConfig, spec, path: str, progress: Callback = silent):
    """(plain feature views of train + val, data.Splits, what embeds images, image size, cache
    key): the scan, split, engine (``--extractor``) and cache key of ``training.train``, so that
    its cached features are found."""
    from tlcli import backbone, features, litert_backbone, model

    loaded = backbone.load(spec, path=path)
    splits = data.scan_splits(cfg, image_size=loaded.image_size, progress=progress)
    extractor = model.build_extractor(loaded.layer, loaded.image_size)
    runner = None
    if litert_backbone.engine_for(cfg.extractor) == "litert":
        runner = litert_backbone.prepare(loaded, spec, cache_dir=cfg.cache_dir, progress=progress)
    key = features.cache_key(spec, loaded.image_size)
    views = features.compute_views(splits.train + splits.val, extractors=(extractor, None), cache_key=key,
                                   cache_dir=cfg.cache_dir, image_size=loaded.image_size, batch_size=cfg.batch_size,
                                   max_pixels=cfg.max_pixels, progress=progress, litert=runner)
    progress(Info(f"features: {views.extracted} extracted, {views.cached} from cache"))
    embed, key = engine_of(views.engine, (extractor, runner), key)
    return views, splits, embed, loaded.image_size, key


def findings(splits, features: np.ndarray, *, extractor, image_size: int, max_pixels: int, seed: int = 0,
             cache=None, progress: Callback = silent, mislabels: bool = True) -> AuditResult:
    """The findings on ``splits`` (a ``data.Splits``) whose train + val images have the plain
    ``features`` (rows in that order). ``extractor`` makes the calibration copies' features,
    cached under ``cache`` (see ``copy_similarities``).
    Without ``mislabels`` the out-of-fold fits are skipped (``train`` has its own)."""
    samples = splits.train + splits.val
    n_train, labels = len(splits.train), splits.labels
    where = ["train"] * n_train + ["val"] * len(splits.val)
    y = np.array([s.label for s in samples], int)
    centre = features[:n_train].mean(axis=0)
    centred = features - centre
    progress(Start("audit", total=None))
    copies = copy_similarities(splits.train, features[:n_train], extractor=extractor, image_size=image_size,
                               centre=centre, max_pixels=max_pixels, seed=seed, cache=cache)
    thresholds = duplicate_threshold(centred[:n_train], [s.digest for s in splits.train], copies, seed=seed)
    dups = find_duplicates(samples, where, centred, labels, thresholds["near_duplicate"])
    flagged: list[Mislabel] = []
    if mislabels:
        probs = out_of_fold(features[:n_train], y[:n_train], len(labels), seed=seed)
        if probs is not None:
            ranked, t = confident_learning(probs, y[:n_train])
            thresholds["mislabel"] = {label: float(v) for label, v in zip(labels, t)}
            flagged = [Mislabel(samples[i].path, labels[y[i]], labels[c], round(score, 6)) for i, c, score in ranked]
        else:
            progress(Warn("likely mislabels: not looked for, a class has fewer than 2 training images"))
    sims = centre_similarity(features, y, np.arange(len(samples)) < n_train, len(labels))
    thresholds |= outlier_threshold(sims[:n_train])
    far = [i for i in np.argsort(sims, kind="stable").tolist() if sims[i] < thresholds["outlier"]]
    outliers = [Outlier(samples[i].path, labels[y[i]], round(float(1.0 - sims[i]), 6)) for i in far]
    progress(End("audit", total=None))
    train_counts = splits.counts(splits.train)
    present = [n for n in train_counts.values() if n]
    return AuditResult(
        data_dir="", val_dir=None, labels=labels, near_duplicates=dups, likely_mislabeled=flagged,
        outliers=outliers, class_counts={"train": train_counts, "val": splits.counts(splits.val)},
        skipped=[s.to_dict() for s in splits.skipped], thresholds=thresholds,
        imbalance=round(max(present) / min(present), 4) if present else None, warnings=list(splits.warnings))


# ---- train's cheap part ------------------------------------------------------------------------

# train's check compares every pair of images (O(n^2 d): 100,000 took 1.5 min here, a million
# would take hours and hold its views twice); above this many it is left to 'tlcli audit'.
TRAIN_CHECK_MAX_IMAGES = 100_000


def train_check(cfg: TrainConfig, splits, views, fit, *, extractors, image_size: int, cache_key: str | None,
                progress: Callback = silent) -> dict | None:
    """``train``'s cheap part of the audit. When it finds something, one warning line (through
    ``progress`` and in ``splits.warnings``) points to ``tlcli audit``. Returns what ``train``
    records in tlcli.json under ``audit``: {"train_val_duplicates": groups of
    kind train_val_leak (identical or near, as ``audit`` finds them), "likely_mislabeled": images
    flagged by ``confident_learning`` on the head fit's own out-of-fold probabilities (the rows
    it cross-validated: ``fit.oof_rows``; a mirror view's row counts for its image),
    "cross_validated": how many images those were}. ``cfg``: the run's TrainConfig;
    ``cache_key``: its frozen features' (the calibration copies are cached beside them), or None
    (with fine-tuning: the copies are made afresh). ``extractors``: (the Keras extractor, the
    LiteRT runner or None); the copies go through the engine that made ``views``. None, with
    one Info line, above ``TRAIN_CHECK_MAX_IMAGES`` images."""
    if len(splits.train) + len(splits.val) > TRAIN_CHECK_MAX_IMAGES:
        progress(Info(f"data check skipped: more than {TRAIN_CHECK_MAX_IMAGES:,} images make it too slow here; "
                      f"run 'tlcli audit {cfg.data_dir}' to check for duplicates and mislabelled images"))
        return None
    plain, _ = views.of(splits.train + splits.val)
    extractor, key = engine_of(views.engine, extractors, cache_key)
    result = findings(splits, plain, extractor=extractor, image_size=image_size, max_pixels=cfg.max_pixels,
                      seed=cfg.seed, cache=(cfg.cache_dir, key) if key else None, mislabels=False)
    leaks = sum(g.kind == "train_val_leak" for g in result.near_duplicates)
    n = len(splits.train)
    mislabeled = checked = 0
    if len(fit.oof_rows):
        image = np.asarray(fit.oof_rows) % n  # fit_views stacks the mirror rows after the plain ones
        sums = np.zeros((n, fit.oof_probs.shape[1]))
        np.add.at(sums, image, fit.oof_probs)
        seen = np.unique(image)
        probs = sums[seen] / np.bincount(image, minlength=n)[seen][:, None]
        ranked, _ = confident_learning(probs, np.array([splits.train[i].label for i in seen]))
        mislabeled, checked = len(ranked), len(seen)
    found = [f"{leaks} group(s) of identical or near-identical images across train and val"] if leaks else []
    found += [f"{mislabeled} likely mislabelled training image(s)"] if mislabeled else []
    command = f"tlcli audit {cfg.data_dir}" + (f" --val-dir {cfg.val_dir}" if cfg.val_dir else "")
    if found:
        warning = f"{' and '.join(found)}; run '{command}' to see them"
        progress(Warn(warning))
        splits.warnings.append(warning)
    return {"train_val_duplicates": leaks, "likely_mislabeled": mislabeled, "cross_validated": checked}


def write_report(result: AuditResult, out_dir) -> dict[str, str]:
    """``REPORT_HTML`` and the ``CSV_FILES`` of ``result`` in ``out_dir``; returns {name: path}.
    Paths in the page are shown relative to DIR (or --val-dir) when under it. Raises ``TlcliError``."""
    from pathlib import Path

    out_dir = Path(out_dir)
    roots = [r for r in (result.val_dir, result.data_dir) if r]

    def rel(path):
        return next((html_report.shown_path(path, r) for r in roots
                     if html_report.shown_path(path, r) != str(path)), str(path))

    written = {}
    written[CSV_FILES["near_duplicates"]] = html_report.write_csv(
        out_dir / CSV_FILES["near_duplicates"], ("group", "kind", "similarity", "path", "label", "split"),
        [(g, d.kind, f"{d.similarity:.6f}", p, label, split) for g, d in enumerate(result.near_duplicates, 1)
         for p, label, split in zip(d.paths, d.labels, d.splits)])
    written[CSV_FILES["likely_mislabeled"]] = html_report.write_csv(
        out_dir / CSV_FILES["likely_mislabeled"], ("path", "label", "suggested_label", "score"),
        [(m.path, m.label, m.suggested_label, f"{m.score:.6f}") for m in result.likely_mislabeled])
    written[CSV_FILES["outliers"]] = html_report.write_csv(
        out_dir / CSV_FILES["outliers"], ("path", "label", "score"),
        [(o.path, o.label, f"{o.score:.6f}") for o in result.outliers])
    Card, Section = html_report.Card, html_report.Section
    sections = [
        Section("Near-duplicates", "Each row is one group: identical files, or the same photo resized, "
                "recompressed, cropped or mirrored. train_val_leak inflates the validation accuracy; "
                "across_classes means conflicting labels; within_class is redundant.",
                [[Card(p, [f"{d.kind} ({d.similarity:.3f})", f"{label} / {split}", rel(p)])
                  for p, label, split in zip(d.paths, d.labels, d.splits)]
                 for d in result.near_duplicates[:HTML_FINDINGS]]),
        Section("Likely mislabels", "Out-of-fold, the head found another class far more likely than the "
                "label; check the image and move it if the suggestion is right.",
                [[Card(m.path, [f"{m.label} -> {m.suggested_label}", f"score {m.score:.3f}", rel(m.path)])
                  for m in result.likely_mislabeled[:HTML_FINDINGS]]]),
        Section("Outliers", "Far from every class: junk, placeholders, or a class the dataset lacks.",
                [[Card(o.path, [o.label, f"score {o.score:.3f}", rel(o.path)])
                  for o in result.outliers[:HTML_FINDINGS]]]),
        Section("Images per class", "", header=["class", "train", "val"],
                rows=[[label, n, result.class_counts["val"].get(label, 0)]
                      for label, n in result.class_counts["train"].items()]),
        Section("Skipped files", "", header=["file", "reason"],
                rows=[[rel(s["path"]), s["reason"]] for s in result.skipped]),
        Section("Thresholds", "", header=["name", "value"],
                rows=[[k, v] for k, v in result.thresholds.items()]),
    ]
    counts = result.counts()
    summary = [f"{result.data_dir}" + (f" (val: {result.val_dir})" if result.val_dir else ""),
               ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()),
               f"At most {HTML_FINDINGS} findings of each kind are shown, most suspicious first; the CSV files "
               "beside this page list every one."]
    written[REPORT_HTML] = html_report.write_page(out_dir / REPORT_HTML, "tlcli audit", summary, sections)
    return {name: str(p) for name, p in written.items()}
