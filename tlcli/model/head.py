"""Training the softmax head on cached feature vectors, fast enough to cross-validate.

With features cached, an epoch is one full-batch gradient step (Nesterov, step 1/L) over every
training vector, so many epochs cost milliseconds. This fits the head's Dense(softmax) layer:
L2 on the kernel, label smoothing and per-class weights in the loss (the head's Dropout only acts
while fine-tuning). Two settings are chosen from the training images alone, by stratified k-fold
cross-validation: the L2 strength (from a log grid) and the number of
epochs (early stopping on each held-out fold's loss, best weights restored; the epoch count
is where the mean held-out loss is lowest), on every image up to ``CV_MAX_IMAGES`` and on a
stratified sample of them above (``_cv_sample``: at least ``CV_MIN_PER_CLASS`` of each class).
The head is then refit on every training image.

All folds and L2 values train at once as one batched numpy computation in the row space of the
features (exact for an L2-regularised linear model, and much smaller when images < features).

At scale (X too large for a float64 copy, an ``np.memmap``, or the feature store's
``StoredRows``) the refit streams instead: float32 blocks of ``CHUNK_ROWS`` rows, the same
iterations in feature space (gradient descent from zero never leaves the row space, and the
step's Lipschitz bound is the same), so memory is bounded by a block and the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tlcli.errors import TlcliError

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
FOLDS = 5
CV_MAX_IMAGES = 1000  # cross-validate on a stratified sample of about this many vectors (see _cv_sample)
CV_MIN_PER_CLASS = 5 * FOLDS  # but at least this many images of each class: 5 held out in every fold
# ... unless that makes the batched fits' logits [sample rows, classes, fits] more than this many
# cells an epoch (computed a block of rows at a time, but each cell costs a product with the
# features three times an epoch): then fewer per class, down to FOLDS (one held out in every
# fold), so that a thousand classes cross-validate on 5,000 rows, not 25,000.
CV_MAX_CELLS = 100_000_000
CHUNK_ROWS = 16384    # rows per block of the streamed refit (80 MB of float32 at 1,280-d)
# Rows per block of an in-memory fit's epoch: a block's logits and its share of the gradient
# are computed while its rows are in the cache (256 rows of 1,281 float32: 1.3 MB, within a
# core's L2), so an epoch reads the features from memory once, not twice.
BLOCK_ROWS = 256
IN_MEMORY_BYTES = 256 << 20  # a plain array whose float64 copy fits in this is fit in memory


@dataclass
class HeadFit:
    kernel: np.ndarray  # [features, classes]
    bias: np.ndarray    # [classes]
    l2: float
    epochs: int
    cv_loss: dict = field(default_factory=dict)      # l2 -> best mean held-out loss
    # Per epoch: loss/accuracy of the refit on all images (up to ``epochs``), and val_loss /
    # val_accuracy, the mean over held-out folds for the chosen L2 (until early stopping).
    history: list = field(default_factory=list)
    # The cross-validated rows (indices into X) and their out-of-fold probabilities [rows, classes]:
    # each row scored by the fold fit, at the chosen L2, that did not train on it. Empty without CV.
    oof_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    oof_probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def softmax(z, axis: int = -1, *, overwrite: bool = False):
    """Softmax of the logits ``z`` along ``axis``; with ``overwrite``, computed in ``z``'s own
    memory (a fresh logits array or a reused buffer the caller is done with)."""
    top = z.max(axis=axis, keepdims=True)
    if overwrite:
        z -= top
    else:
        z = z - top
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


# A diverging step overflows: fit_head reports that as one error, not as numpy warnings.
@np.errstate(over="ignore", invalid="ignore")
def _train(Z, Y, weights, l2, *, epochs, step=None, val_mask=None, patience=None, on_epoch=None):
    """Batched full-batch Nesterov gradient descent, one step per epoch, step size 1/L from the
    loss's Lipschitz bound (so it converges whatever the feature scale). Z [n, r]; Y [n, k] soft
    targets; weights [g, n] per-fit sample weights (0 = not in this fit's training part); l2 [g].
    Returns W [g, r, k], b [g, k] (the best epoch's when val_mask [g, n] is given), per-epoch
    held-out losses and accuracies [epochs, g], and the first fit's per-epoch training
    (loss, accuracy). Computed in Z's dtype (``fit_head`` gives float32), an epoch in blocks of
    ``BLOCK_ROWS`` rows. ``on_epoch(epoch)`` is called after each epoch."""
    g, n = weights.shape
    r, k = Z.shape[1], Y.shape[1]
    dtype = Z.dtype
    # Every array is laid out [..., k, g] (the fits last): a softmax over the k classes is then
    # a reduction across rows of g contiguous numbers, not g reductions of k strided ones (8x
    # faster for 20 fits of two classes).
    wn = (weights / weights.sum(axis=1, keepdims=True)).T[:, None, :].astype(dtype)  # [n, 1, g], columns sum to 1
    # Softmax cross-entropy has curvature <= 1/2 along any logit direction.
    Zb = np.hstack([Z, np.ones((n, 1), dtype)])
    if step:
        lr = np.full(g, step, dtype)
    else:  # one eigenvalue per distinct weighting (a fold's fits differ only in l2), fanned out
        distinct, which = np.unique(weights, axis=0, return_inverse=True)
        dn = distinct / distinct.sum(axis=1, keepdims=True)
        top = np.array([_top_eigenvalue(Zb, w) for w in dn])
        lr = 1.0 / (0.5 * top[np.ravel(which)] + 2 * l2)
    lr = lr.astype(dtype)[None, None, :]  # a float64 step would make every epoch's update float64
    decay = (2.0 * l2[None, None, :] * np.r_[np.ones(r), 0.0][:, None, None]).astype(dtype)  # no L2 on the bias
    W = np.zeros((r + 1, k, g), dtype)
    prev = W.copy()
    labels = Y.argmax(axis=1)
    best, best_W = np.full(g, np.inf), W.copy()
    wait, stopped, losses, accs, train_log = np.zeros(g, int), np.zeros(g, bool), [], [], []
    vm = (val_mask.T / val_mask.sum(axis=1)).astype(dtype) if val_mask is not None else None  # [n, g]

    def probs(M, rows):  # [m, k, g] for a block of rows, one matmul for every fit
        return softmax((Zb[rows] @ M.reshape(r + 1, k * g)).reshape(-1, k, g), axis=1, overwrite=True)

    for epoch in range(1, epochs + 1):
        look = W + (epoch - 1) / (epoch + 2) * (W - prev)
        grad, loss0, acc0 = np.zeros((r + 1, k * g), dtype), 0.0, 0.0
        for rows in _row_blocks(n):  # each block's logits and gradient while it is in the cache
            P = probs(look, rows)
            G = (P - Y[rows, :, None]) * wn[rows]
            # Training loss / accuracy of the first fit, at the point the gradient was taken.
            lab, w0 = labels[rows], wn[rows, 0, 0]
            loss0 -= float((np.log(np.clip(P[np.arange(len(lab)), lab, 0], 1e-12, 1.0)) * w0).sum())
            acc0 += float(((P[:, :, 0].argmax(axis=1) == lab) * w0).sum())
            grad += Zb[rows].T @ G.reshape(-1, k * g)
        train_log.append((loss0, acc0))
        new = look - lr * (grad.reshape(r + 1, k, g) + decay * look)
        active = ~stopped
        prev[:, :, active], W[:, :, active] = W[:, :, active], new[:, :, active]
        if vm is not None:
            val, acc = np.zeros(g), np.zeros(g)
            for rows in _row_blocks(n):
                Pv, lab = probs(W, rows), labels[rows]
                nll = -np.log(np.clip(Pv[np.arange(len(lab)), lab, :], 1e-12, 1.0))  # [m, g]
                val += (nll * vm[rows]).sum(axis=0)
                acc += ((Pv.argmax(axis=1) == lab[:, None]) * vm[rows]).sum(axis=0)
            losses.append(val)
            accs.append(acc)
            improved = (val < best) & active
            best[improved], wait[improved] = val[improved], 0
            best_W[:, :, improved] = W[:, :, improved]
            wait[~improved & active] += 1
            if patience is not None:
                stopped |= wait >= patience
        if on_epoch is not None:
            on_epoch(epoch)
        if stopped.all():
            break
    out = best_W if vm is not None else W
    return out[:-1].transpose(2, 0, 1), out[-1].T, np.array(losses), np.array(accs), train_log


def _row_blocks(n: int):
    """Slices of ``BLOCK_ROWS`` consecutive rows covering range(n)."""
    return (slice(start, start + BLOCK_ROWS) for start in range(0, n, BLOCK_ROWS))


def _top_eigenvalue(Zb: np.ndarray, w: np.ndarray, *, tolerance: float = 1e-9, most: int = 300) -> float:
    """The largest eigenvalue of the weighted Gram matrix ``(Zb * w[:, None]).T @ Zb`` (Zb [n, r],
    w [n] >= 0), by power iteration on products with Zb, never forming the [r, r] matrix: ``most``
    products of 4nr FLOP where a full eigendecomposition costs ~10 r^3 (seconds at r = 1280).
    It stops once the residual |A v - rho v| is below ``tolerance`` * rho, which puts the Rayleigh
    quotient rho within far less than that of the eigenvalue (the error is quadratic in the
    residual). Features' Gram matrices have one dominant direction (their mean), so a few tens
    of products suffice; where they do not, the answer is ``np.linalg.eigvalsh``'s."""
    Zb = np.asarray(Zb, np.float64)  # once: float32 products would not reach the tolerance
    v = np.ones(Zb.shape[1]) / np.sqrt(Zb.shape[1])  # deterministic: the same run gives the same step
    for _ in range(most):
        u = Zb.T @ (w * (Zb @ v))
        rho = float(v @ u)
        if rho <= 0:
            break
        if np.linalg.norm(u - rho * v) <= tolerance * rho:
            return rho
        v = u / np.linalg.norm(u)
    return float(np.linalg.eigvalsh((Zb * w[:, None]).T @ Zb)[-1])


@np.errstate(over="ignore", invalid="ignore")
def _train_streamed(X, y, k, label_smoothing, sw, l2, *, epochs, step, chunk, on_epoch=None):
    """``_train`` for one fit without held-out rows, in feature space, streaming X in float32
    blocks of at most ``chunk`` rows (each epoch one pass; the step's Gram matrix one more).
    Each block costs its two products (logits, gradient) in float32 into buffers kept across
    blocks, the softmax and the gradient of the loss computed in place; only the sums over
    blocks (gradient, loss) are float64. Held: the parameters [d + 1, k], the buffers
    [chunk, k], and per row a float32 weight and an int label, never an [n, d] matrix.
    Returns (kernel [d, k] float32, bias [k] float32, per-epoch training (loss, accuracy))."""
    n, d = X.shape
    wn = (sw / sw.sum()).astype(np.float32)
    labels = y if label_smoothing < 1 else np.zeros_like(y)  # the argmax of the soft targets
    lr = step or 1.0 / (0.5 * np.linalg.eigvalsh(_weighted_gram(X, wn, chunk))[-1] + 2 * l2)
    decay = 2.0 * l2 * np.r_[np.ones(d), 0.0][:, None]  # no L2 on the bias row
    W = np.zeros((d + 1, k))
    prev, train_log = W.copy(), []
    logits, part = np.empty((chunk, k), np.float32), np.empty((d, k), np.float32)
    every = np.arange(chunk)
    off, hit = np.float32(label_smoothing / k), np.float32(1.0 - label_smoothing)
    for epoch in range(1, epochs + 1):
        look = W + (epoch - 1) / (epoch + 2) * (W - prev)
        kernel, bias = look[:-1].astype(np.float32), look[-1].astype(np.float32)
        grad, loss, acc = np.zeros_like(W), 0.0, 0.0
        for start, block in _chunks(X, chunk):
            m = len(block)
            P, w, lab, at = logits[:m], wn[start:start + m], labels[start:start + m], every[:m]
            np.matmul(block, kernel, out=P)
            P += bias
            softmax(P, axis=1, overwrite=True)
            p0 = P[at, lab]
            loss -= float(np.dot(np.log(np.maximum(p0, 1e-12)), w))
            acc += float(w[P.argmax(axis=1) == lab].sum(dtype=np.float64))
            # The loss's gradient in the logits, in place: w * (P - targets), the targets
            # label_smoothing / k everywhere plus 1 - label_smoothing at the label.
            P -= off
            P[at, y[start:start + m]] -= hit
            P *= w[:, None]
            np.matmul(block.T, P, out=part)
            grad[:-1] += part
            grad[-1] += P.sum(axis=0, dtype=np.float64)
        train_log.append((loss, acc))
        prev, W = W, look - lr * (grad + decay * look)
        if on_epoch is not None:
            on_epoch(epoch)
    return W[:-1].astype(np.float32), W[-1].astype(np.float32), train_log


def _weighted_gram(X, wn, chunk: int) -> np.ndarray:
    """The Gram matrix [d + 1, d + 1] (float64) of [X 1] with rows weighted by ``wn``, in float32
    block products (A.T @ A: numpy's symmetric product, half the work)."""
    d = X.shape[1]
    gram = np.zeros((d + 1, d + 1))
    for start, block in _chunks(X, chunk):
        w = wn[start:start + len(block)]
        scaled = block * np.sqrt(w)[:, None]
        gram[:d, :d] += scaled.T @ scaled
        gram[:d, d] += block.T @ w
    gram[d, :d], gram[d, d] = gram[:d, d], wn.sum(dtype=np.float64)
    return gram


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified fold index per sample (deterministic)."""
    fold = np.zeros(len(y), int)
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def fit_head(X, y: np.ndarray, num_classes: int, *, class_weight: dict | None = None,
             epochs: int = 300, learning_rate: float | None = None, label_smoothing: float = 0.1,
             patience: int = 20, seed: int = 0, l2: float | None = None,
             groups: np.ndarray | None = None, fixed_epochs: bool = False,
             chunk_rows: int | None = None, on_epoch=None) -> HeadFit:
    """Fit the head on features X [n, d] with integer labels y [n] -> kernel [d, k], bias [k].

    X is a numpy array (float32 or float64), an ``np.memmap``, or rows of the feature store
    (``store.StoredRows``); it is never copied whole. ``chunk_rows=None`` fits a plain array whose
    float64 copy fits in ``IN_MEMORY_BYTES`` in memory, and streams anything else in blocks of
    ``CHUNK_ROWS``; a number streams in blocks of that many rows (the same fit, in float32).
    ``l2=None`` picks it by cross-validation from ``L2_GRID``; the epoch count (<= ``epochs``) is
    picked by cross-validation when every class has >= 2 images, else ``epochs`` is used;
    ``fixed_epochs`` always runs exactly ``epochs`` (no early stopping).
    ``learning_rate=None`` uses 1/L, the largest step that provably converges.
    ``groups`` [n] marks rows that are views of one image (augmented copies): cross-validation
    keeps each group within one fold, so no image is scored by a fit that saw another view of it.
    The result keeps the out-of-fold probabilities of every cross-validated row (``oof_rows``,
    ``oof_probs``): each from the fold fit, at the chosen L2, that did not see it.
    ``on_epoch(stage, epoch, epochs, fits)`` follows the work: "cross-validation", then "refit".
    Raises ``TlcliError`` naming the learning rate and L2 when a loss or weight is not finite
    (a step too large for the features, or features that are not finite).
    """
    y = np.asarray(y, int)
    if not hasattr(X, "shape"):  # a list of rows
        X = np.asarray(X, np.float64)
    stream = chunk_rows is not None or not _in_memory(X)
    chunk = chunk_rows or CHUNK_ROWS
    if not stream:
        X = np.asarray(X, np.float64)
    if not _finite(X, chunk):
        raise TlcliError("the backbone's features hold NaN, infinite or huge values, so no head can be fit; "
                         "check the backbone (--backbone), or choose another one")
    k = num_classes
    cw = np.array([class_weight.get(c, 1.0) for c in range(k)]) if class_weight else np.ones(k)
    sw = cw[y]
    grid = L2_GRID if l2 is None else (l2,)
    # In memory: the row space of all the images, for the refit, and for CV too when it uses them all.
    Z, V = (None, None) if stream else _row_space(X, return_basis=True)
    cv = None
    if not (fixed_epochs and l2 is not None):
        cv = _cross_validate(X, Z, y, k, label_smoothing, sw, grid, groups=groups, epochs=epochs,
                             learning_rate=learning_rate, patience=patience, seed=seed, on_epoch=on_epoch)
    if cv is None:
        chosen_l2, best_epochs, val_curve, cv_loss = (grid[len(grid) // 2] if l2 is None else l2), epochs, [], {}
        oof_rows, oof_probs = np.zeros(0, int), np.zeros((0, k))
    else:
        chosen_l2, best_epochs, val_curve, cv_loss, oof_rows, oof_probs = cv
        if fixed_epochs:
            best_epochs = epochs
    # Refit on every image: in memory in the row space of all of them (the kernel mapped back to
    # features), or streamed in feature space.
    refit = None if on_epoch is None else (lambda e: on_epoch("refit", e, best_epochs, 1))
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged fit is reported just below
        if stream:
            kernel, bias, train_log = _train_streamed(X, y, k, label_smoothing, sw, chosen_l2, epochs=best_epochs,
                                                      step=learning_rate, chunk=chunk, on_epoch=refit)
        else:
            W, b, _, _, train_log = _train(Z.astype(np.float32), _targets(y, k, label_smoothing, np.float32),
                                           sw[None, :], np.array([chosen_l2]),
                                           epochs=best_epochs, step=learning_rate, on_epoch=refit)
            kernel, bias = (V @ W[0]).astype(np.float32), b[0].astype(np.float32)
    _check_finite([kernel, bias, train_log, [cv_loss.get(chosen_l2, 0.0)]], learning_rate, chosen_l2)
    history = []
    for e in range(max(best_epochs, len(val_curve))):
        row = {"epoch": e + 1}
        if e < len(train_log):
            row["loss"], row["accuracy"] = train_log[e]
        if e < len(val_curve):
            row["val_loss"], row["val_accuracy"] = val_curve[e]
        history.append(row)
    return HeadFit(kernel, bias, chosen_l2, best_epochs, cv_loss, history, oof_rows,
                   oof_probs.astype(np.float32))


def _in_memory(X) -> bool:
    return type(X) is np.ndarray and X.size * 8 <= IN_MEMORY_BYTES


def _chunks(X, size: int):
    """(start, float32 block) over consecutive blocks of at most ``size`` rows of X."""
    blocks = X.chunks(size) if hasattr(X, "chunks") else (X[i:i + size] for i in range(0, X.shape[0], size))
    start = 0
    for block in blocks:
        yield start, np.asarray(block, np.float32)
        start += len(block)


def _finite(X, chunk: int) -> bool:
    """Whether every feature is finite and small enough for its square to be (block by block at scale)."""
    with np.errstate(over="ignore", invalid="ignore"):  # NaN, infinity, or so large their squares overflow
        if isinstance(X, np.ndarray) and X.dtype == np.float64:
            return bool(np.isfinite(np.einsum("ij,ij->", X, X)))
        total = 0.0
        for _, block in _chunks(X, chunk):
            total += float(np.einsum("ij,ij->", block, block, dtype=np.float64))
        return bool(np.isfinite(total))


def _targets(y: np.ndarray, k: int, label_smoothing: float, dtype=np.float64) -> np.ndarray:
    """Soft targets [len(y), k]: the label's one-hot, smoothed."""
    return (np.eye(k, dtype=dtype)[y] * (1.0 - label_smoothing) + label_smoothing / k).astype(dtype)


def _cross_validate(X, Z, y, k, label_smoothing, sw, grid, *, groups, epochs, learning_rate, patience, seed,
                    on_epoch=None):
    """Stratified k-fold CV over ``grid`` on the sample ``_cv_sample`` draws (whole groups,
    gathered from X), all fits batched, in float32 (half float64's time; its rounding is far
    below the differences cross-validation decides on). ``Z``: X's row space when X is in memory (used
    when the sample is every row), else None. Returns (chosen l2, epoch count, mean held-out
    (loss, accuracy) per epoch, l2 -> best mean held-out loss, CV row indices, their
    out-of-fold probabilities), or None when some class has fewer than 2 groups."""
    n = len(y)
    rng = np.random.default_rng(seed)
    if groups is None:
        group = first = np.arange(n)
    else:
        _, first, group = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        if (y[first][group] != y).any():
            raise ValueError("fit_head: every row of a group must have the same label")
    n_groups = len(first)  # first: the first row of each group, for its label
    chosen, rate = _cv_sample(y[first], n / max(n_groups, 1), k, rng, fits=len(grid) * FOLDS)
    sample = np.nonzero(np.isin(group, chosen))[0]
    counts = np.bincount(y[first[chosen]], minlength=k)
    folds = min(FOLDS, int(counts[counts > 0].min())) if n else 0
    if folds < 2:
        return None
    # Each row stands for 1 / (its class's sampling rate) rows of X, in the fits and in the
    # held-out loss, so the CV's class balance is X's (all 1 when every row is used).
    row_weight = 1.0 / rate[y[sample]]
    Zs = Z if Z is not None and len(sample) == n else _row_space(np.asarray(X[sample], np.float64))
    gfold = np.zeros(n_groups, int)
    gfold[chosen] = stratified_folds(y[first[chosen]], folds, seed)
    fold = gfold[group[sample]]
    g_l2 = np.repeat(np.asarray(grid, np.float64), folds)
    g_fold = np.tile(np.arange(folds), len(grid))
    train_mask = (fold[None, :] != g_fold[:, None]).astype(np.float64)
    weights = train_mask * (sw[sample] * row_weight)[None, :]
    step = None if on_epoch is None else (lambda e: on_epoch("cross-validation", e, epochs, len(g_l2)))
    W, b, losses, accs, _ = _train(Zs.astype(np.float32), _targets(y[sample], k, label_smoothing, np.float32),
                                   weights, g_l2, epochs=epochs, step=learning_rate,
                                   val_mask=(1.0 - train_mask) * row_weight, patience=patience, on_epoch=step)
    losses = np.where(np.isnan(losses), np.inf, losses)  # a diverged fit is never the one chosen
    # Mean held-out loss per (l2, epoch), each fold counted at its best epoch so far (as
    # restored by early stopping); a fold that stopped keeps its best loss.
    shape = (len(losses), len(grid), folds)
    best_so_far = np.minimum.accumulate(losses.reshape(shape), axis=0).mean(axis=2)
    raw = losses.reshape(shape).mean(axis=2)
    raw_acc = accs.reshape(shape).mean(axis=2)
    cv_loss = {lam: float(best_so_far[:, i].min()) for i, lam in enumerate(grid)}
    best_i = int(np.argmin([cv_loss[lam] for lam in grid]))
    val_curve = [(float(raw[e, best_i]), float(raw_acc[e, best_i])) for e in range(len(raw))]
    # Each row scored by its own fold's fit (best weights, as early stopping restored them).
    oof = np.zeros((len(sample), k))
    with np.errstate(over="ignore", invalid="ignore"):
        for f in range(folds):
            rows, g = fold == f, best_i * folds + f
            oof[rows] = softmax(Zs[rows] @ W[g] + b[g])
    return grid[best_i], int(np.argmin(raw[:, best_i])) + 1, val_curve, cv_loss, sample, oof


def _cv_sample(labels: np.ndarray, rows_per_group: float, k: int, rng, *,
               fits: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The groups cross-validation uses (sorted indices into ``labels``, each group's label) and
    each class's sampling rate [k] (the share of its groups taken). Every group when they hold
    at most CV_MAX_IMAGES rows. Else a stratified random sample: each class its share of
    CV_MAX_IMAGES rows, but at least CV_MIN_PER_CLASS groups (or all it has), so that every
    class is in every fold often enough to score (a uniform sample of 1,000 rows over 100
    classes left some class with one row, and no cross-validation at all). The sample's size
    then depends on the classes' sizes only up to CV_MAX_IMAGES and CV_MIN_PER_CLASS, not on
    n, so data drawn from one distribution at any n gets the same kind of sample. With many
    classes the minimum shrinks (to FOLDS at least) so that the ``fits`` batched fits' arrays
    stay within CV_MAX_CELLS cells."""
    n_groups = len(labels)
    counts = np.bincount(labels, minlength=k)
    if n_groups * rows_per_group <= CV_MAX_IMAGES:
        return np.arange(n_groups), np.ones(k)
    share = np.round(CV_MAX_IMAGES / rows_per_group * counts / n_groups).astype(int)
    per_class = min(CV_MIN_PER_CLASS, max(FOLDS, int(CV_MAX_CELLS / (fits * k * k * rows_per_group))))
    quota = np.minimum(counts, np.maximum(share, per_class))
    order = rng.permutation(n_groups)
    order = order[np.argsort(labels[order], kind="stable")]  # by class, random within each
    rank = np.arange(n_groups) - (np.cumsum(counts) - counts)[labels[order]]
    chosen = np.sort(order[rank < quota[labels[order]]])
    return chosen, np.where(counts > 0, quota / np.maximum(counts, 1), 1.0)


def fit_views(views, samples, num_classes: int, **options) -> HeadFit:
    """``fit_head`` on the feature views of ``samples`` (objects with ``.label``):
    ``views.stacked`` gives their plain features followed by their mirror views' (when there
    are some), in RAM or as the feature store's rows, which fit_head streams without copying;
    both views of an image are one group, so cross-validation keeps them in one fold.
    ``options`` are fit_head's."""
    X = views.stacked(samples)
    y, groups = [s.label for s in samples], None
    if len(X) != len(samples):  # the mirror rows follow
        y, groups = y + y, np.tile(np.arange(len(samples)), 2)
    return fit_head(X, y, num_classes, groups=groups, **options)


def predict_views(views, samples, fit: HeadFit, *, activation=softmax) -> np.ndarray:
    """The head's probabilities [n, k] for ``samples`` from their feature views, mirror views
    averaged as the saved classifier averages them; read in blocks of ``CHUNK_ROWS`` images."""
    plain, mirror = views.of(samples, lazy=True)
    if len(plain) <= CHUNK_ROWS:
        return predict_proba(np.asarray(plain), fit.kernel, fit.bias, activation=activation,
                             mirror_features=None if mirror is None else np.asarray(mirror))
    blocks = [predict_proba(plain[i:i + CHUNK_ROWS], fit.kernel, fit.bias, activation=activation,
                            mirror_features=None if mirror is None else mirror[i:i + CHUNK_ROWS])
              for i in range(0, len(plain), CHUNK_ROWS)]
    return np.concatenate(blocks)


def predict_proba(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray, *,
                  mirror_features: np.ndarray | None = None, activation=softmax) -> np.ndarray:
    """The head's forward pass in numpy: activation(features @ kernel + bias), float32 [n, k]
    (the sigmoid head passes its own). With ``mirror_features`` (the mirror views' features) the
    head sees the mean of both views, as the saved classifier does (``build_classifier(mirror=True)``)."""
    features = np.asarray(features, np.float32)
    if mirror_features is not None:
        features = (features + np.asarray(mirror_features, np.float32)) / 2
    if not len(features):
        return np.zeros((0, np.shape(kernel)[1]), np.float32)
    return activation(features @ kernel + bias).astype(np.float32)


def _check_finite(arrays, learning_rate, l2) -> None:
    """Refuse a fit whose losses or (float32) weights are NaN or infinite: it would predict nothing."""
    if all(np.isfinite(np.asarray(a, np.float64)).all() for a in arrays):
        return
    if learning_rate is not None:
        raise TlcliError(f"--learning-rate {learning_rate}: the head's fit diverged (its loss or weights became "
                         f"NaN or infinite, with --l2 {l2}); choose a smaller --learning-rate, or leave it out for "
                         "the automatic step, which cannot diverge")
    raise TlcliError(f"the head's fit diverged (its loss or weights became NaN or infinite, with the automatic "
                     f"--learning-rate and --l2 {l2}): the backbone's features are too large; check the backbone "
                     "(--backbone), or choose another one")


def _row_space(X, return_basis=False):
    """Coordinates of X's rows in an orthonormal basis of their span: Z = X V, V [d, r]."""
    n, d = X.shape
    if n >= d:
        V = np.eye(d)
    else:
        _, s, Vt = np.linalg.svd(X, full_matrices=False)
        V = Vt[s > s.max() * 1e-10].T if s.size else np.zeros((d, 0))
    Z = X @ V
    return (Z, V) if return_basis else Z


