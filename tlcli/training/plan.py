"""``--time-budget``: the plan of a run inside a wall-time budget, from rates measured on this
machine, and the deadline the run keeps.

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

from tlcli.config import DEFAULTS
from tlcli.data import augment
from tlcli.progress import Info

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
# The share of the budget left that choosing among --backbone candidates may spend extracting
# their features. A choice only pays through the model trained on its winner, so the choice and
# that winner's fine-tuning get at most half each; what the choice does not spend is left on the
# clock for the fine-tuning plan, made afterwards from the time then left.
CHOICE_SHARE = 0.5
# Training resolutions are multiples of the backbones' stride (32: a MobileNet's or an EfficientNet's
# last feature map is 1/32 of the input), and never below half the features' size or this floor.
RESOLUTION_STEP = 32
MIN_RESOLUTION = 96


@dataclass(frozen=True)
class Candidate:
    """A backbone the run may use, with its rates measured on this machine in images/s:
    ``extract_rate`` of its frozen features (one view, at ``image_size``), ``train_rate`` of a
    fine-tuning step (None: not measured, or it cannot be trained) at ``train_size`` (None:
    ``image_size``); ``extracted``: its features are already in hand (from the cache or earlier
    in this run); ``resizable``: it takes images of any size, so it may train below ``image_size``;
    ``augment``: it trains on random crops (a lower size only cancels their zoom)."""

    name: str
    image_size: int
    extract_rate: float
    train_rate: float | None = None
    extracted: bool = False
    cached: int = 0  # of its training images' features, how many are in the feature store already
    train_size: int | None = None
    resizable: bool = False
    augment: bool = True


@dataclass
class Plan:
    """What the run will do inside ``budget_s`` (seconds), decided at ``elapsed_s`` into it:
    the ``backbones`` whose features it extracts (in order; the first is fine-tuned when
    ``fine_tune``), ``epochs`` of fine-tuning at ``image_size`` px, and its ``estimated_s`` end
    (seconds from the run's start). ``feature_size``: the backbone's own input size, at which the
    features, the head, the holdout checks and the bundle stay (``image_size`` may be lower:
    ``training_sizes``; None in plans made before it). ``reason`` says why in one line; ``rates``
    holds the measured images/s each decision used (``train_size``: the px the training rate was
    measured at, where that is not the features' size)."""

    budget_s: float
    elapsed_s: float
    backbones: list[str]
    fine_tune: bool
    epochs: int
    image_size: int
    estimated_s: float
    reason: str
    rates: dict = field(default_factory=dict)
    feature_size: int | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for the progress output."""
        what = "head only"
        if self.fine_tune:
            what = f"fine-tune {self.epochs} epoch{'s' * (self.epochs != 1)} at {self.image_size} px"
            if self.feature_size and self.feature_size != self.image_size:
                what += f" (features at {self.feature_size} px)"
        return (f"plan for {format_duration(self.budget_s)}: {what}, about "
                f"{format_duration(self.estimated_s)} in all ({self.reason})")


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``; ``3600`` -> ``1h``; ``42.4`` -> ``42s``."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def crop_zoom(area: tuple[float, float] | None = None, ratio: tuple[float, float] | None = None, *,
              steps: int = 1000) -> float:
    """How much larger objects look in training than in the whole image: E[1/sqrt(a)] for the
    share ``a`` of a square image's area that ``augment.random_resized_crop`` keeps (``area``,
    ``ratio``: default ``augment.CROP_AREA``, ``CROP_RATIO``) and resizes back to the full frame.

    TensorFlow's sampler (``augment.crop_box``) does not draw ``a`` uniformly: it draws the
    aspect ratio r (width / height) uniformly in ``ratio``, then the height h (a share of the
    image's) uniformly from sqrt(lo / r) up to the largest that keeps the area within hi and the
    box inside the image, h1 = min(sqrt(hi / r), 1 / r, 1); so a = h^2 r and, for each r,
    E[1/sqrt(a)] = ln(h1 / h0) / ((h1 - h0) sqrt(r)). That is averaged over r (midpoint rule,
    ``steps`` points) where a box exists; none at all: the sampler keeps the whole image (1.0).
    For the default crops it is 1.35 (a uniform area would give 1.27)."""
    lo, hi = augment.CROP_AREA if area is None else area
    r0, r1 = augment.CROP_RATIO if ratio is None else ratio
    zooms = []
    for i in range(steps):
        r = r0 + (r1 - r0) * (i + 0.5) / steps
        h0, h1 = math.sqrt(lo / r), min(math.sqrt(hi / r), 1 / r, 1.0)
        if h1 - h0 > 1e-9:
            zooms.append(math.log(h1 / h0) / ((h1 - h0) * math.sqrt(r)))
        elif h1 - h0 > -1e-9:  # one height only
            zooms.append(1 / (h0 * math.sqrt(r)))
    return sum(zooms) / len(zooms) if zooms else 1.0


def training_sizes(native: int, *, resizable: bool) -> list[int]:
    """The resolutions fine-tuning may train at, best first, for a backbone whose features are at
    ``native`` px. FixRes (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"):
    the random resized crops enlarge objects ``crop_zoom()`` times, so training at ``native /
    crop_zoom()`` shows them at the size the features see them at ``native``, and costs fewer
    pixels a step; the head is then refit on features at ``native`` (the recipe's head refit),
    FixRes's own remedy for the shift of the pooled features' statistics. That size, rounded to
    a multiple of ``RESOLUTION_STEP``, comes first (``native`` itself when it rounds to it or
    above), then each lower multiple down to the floor (half of ``native``, at least
    ``MIN_RESOLUTION``). ``[native]`` for a backbone that is not ``resizable`` or too small to
    go lower."""
    floor = math.ceil(max(MIN_RESOLUTION, native / 2) / RESOLUTION_STEP) * RESOLUTION_STEP
    if not resizable or floor > native:
        return [native]
    matched = round(native / crop_zoom() / RESOLUTION_STEP) * RESOLUTION_STEP
    top = native if matched >= native else max(matched, floor)
    return [top, *range((top - 1) // RESOLUTION_STEP * RESOLUTION_STEP, floor - 1, -RESOLUTION_STEP)]


def scaled_rate(rate: float, measured_size: int, size: int) -> float:
    """Images/s at ``size`` px of a step measured at ``rate`` images/s at ``measured_size`` px:
    a model, erring on the slow side both ways. Above the measured size the rate falls with the
    pixels (a convolutional backbone's work grows with them, and fixed per-step costs only
    soften that); below it the rate rises with the side only, not the pixels, since the fixed
    costs (the optimizer's update, the micro batches' loop, the input pipeline) stay:
    ``bench/resolution.py`` measured MobileNetV2's step 1.5 to 2.1 times as fast at 160 px as
    at 224 px, and 2.0 to 2.7 times at 128 px (1.96 and 3.06 times fewer pixels; 1.4 and 1.75
    times the side), on a shared 2-core machine."""
    ratio = measured_size / size
    return rate * (ratio if ratio > 1 else ratio ** 2)


def finish_seconds(*, n_all: int, n_holdout: int, views: int, forward_rate: float, epochs: int) -> float:
    """Seconds that fine-tuning's ``epochs`` leave to follow them: the weight-averaging checks on
    the holdout, the ``views`` features of all ``n_all`` images through the fine-tuned backbone
    at ``forward_rate`` images/s, and the fixed reserve; all with the margin."""
    soup = SOUP_EVALS_PER_EPOCH * epochs * n_holdout / forward_rate
    return (n_all * views / forward_rate + soup) * (1 + MARGIN) + FIXED_RESERVE_S


def epoch_seconds(*, n_fit: int, n_holdout: int, train_rate: float, forward_rate: float | None = None) -> float:
    """Seconds of one fine-tuning epoch: ``n_fit`` images trained at ``train_rate`` and
    ``n_holdout`` checked at ``forward_rate`` (default: ``FORWARD_PER_TRAIN`` times the first)."""
    forward_rate = forward_rate or FORWARD_PER_TRAIN * train_rate
    return (n_fit / train_rate + n_holdout / forward_rate) * (1 + MARGIN)


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
                feature_size=first.image_size, rates=rates)
    if first.train_rate is None or first.train_rate <= 0:
        return Plan(**plan, fine_tune=False, epochs=0, estimated_s=budget_s - left + head_only_s,
                    reason="no rate of fine-tuning measured")
    rates[first.name]["train"] = round(first.train_rate, 2)
    measured = first.train_size or first.image_size
    if measured != first.image_size:
        rates[first.name]["train_size"] = measured
    counts = dict(n_all=n_all, n_holdout=n_holdout, views=views, max_epochs=max_epochs)
    sizes = training_sizes(first.image_size, resizable=first.resizable and first.augment)
    # The holdout checks and the features afterwards run at the features' size.
    forward = FORWARD_PER_TRAIN * scaled_rate(first.train_rate, measured, first.image_size)
    for size in sizes:  # the highest resolution at which MIN_EPOCHS fit
        rate = scaled_rate(first.train_rate, measured, size)
        per_epoch = epoch_seconds(n_fit=n_fit, n_holdout=n_holdout, train_rate=rate, forward_rate=forward)
        epochs, used = _epochs_that_fit(left, per_epoch, forward_rate=forward, **counts)
        if epochs >= MIN_EPOCHS:
            break
    else:
        return Plan(**plan, fine_tune=False, epochs=0, estimated_s=budget_s - left + head_only_s,
                    reason=f"{MIN_EPOCHS} epochs of {format_duration(per_epoch)} do not fit, even at {size} px")
    plan["image_size"] = size
    return Plan(**plan, fine_tune=True, epochs=epochs, estimated_s=budget_s - left + used,
                reason=_why(first, size, rate, sizes, cap=max_epochs if epochs == max_epochs else None))


def _epochs_that_fit(left: float, per_epoch: float, *, forward_rate: float, n_all: int, n_holdout: int, views: int,
                     max_epochs: int) -> tuple[int, float]:
    """(the most epochs, at most ``max_epochs``, that fit in ``left`` seconds with what must
    follow them (``finish_seconds``), and those seconds); (0, 0.0) when not even one fits."""
    for e in range(max_epochs, 0, -1):
        used = e * per_epoch + finish_seconds(n_all=n_all, n_holdout=n_holdout, views=views,
                                              forward_rate=forward_rate, epochs=e)
        if used <= left:
            return e, used
    return 0, 0.0


def _why(first: Candidate, size: int, rate: float, sizes: list[int], *, cap: int | None) -> str:
    """The reason of a plan that fine-tunes ``first`` at ``size`` px and ``rate`` images/s (the
    first of ``sizes`` that fits; ``cap``: the epochs it was capped at, if it was)."""
    measured = first.train_size or first.image_size
    why = f"training at {rate:.1f} images/s" if size == measured else \
        f"training at an estimated {rate:.1f} images/s from {first.train_rate:.1f} at {measured} px"
    if size < sizes[0]:
        why += f"; {MIN_EPOCHS} epochs at {sizes[0]} px do not fit"
    elif size < first.image_size:
        why += f", {size} px matching the crops' {crop_zoom():.2f}x zoom"
    elif not first.augment:
        why += "; at the backbone's size: no crops to match (--no-augment)"
    elif not first.resizable and training_sizes(first.image_size, resizable=True)[0] < first.image_size:
        why += f"; the backbone takes only {first.image_size} px"
    return why + (f", at most {cap} epochs" if cap else "")


@dataclass
class ExtractionPlan:
    """Which ``--backbone`` candidates' training features the choice extracts (``backbones``, in
    the candidates' order), planned at ``elapsed_s`` into ``budget_s``: at most ``share_s`` (the
    choice's share) with the winner's other features; ``estimated_s`` of it is planned. ``notes``:
    one line per candidate left out, saying why; ``rates``: each one's measured images/s."""

    budget_s: float
    elapsed_s: float
    share_s: float
    backbones: list[str]
    estimated_s: float
    notes: list[str]
    rates: dict = field(default_factory=dict)

    def describe(self, width: int = 80) -> str:
        """One line for the progress output, within ``width`` columns: the candidates by name
        when they fit, else counted."""
        head = f"choice plan for {format_duration(self.budget_s)}: extract "
        tail = f" (about {format_duration(self.estimated_s)} of {format_duration(self.share_s)})"
        names = ", ".join(self.backbones)
        if self.notes:
            names += f"; leave out {len(self.notes)}"
        if len(head + names + tail) > width:
            names = f"{len(self.backbones)} of {len(self.backbones) + len(self.notes)} candidates"
        return head + names + tail


def extraction_plan(budget_s: float, elapsed_s: float, candidates: list[Candidate], *, n_train: int,
                    n_rest: int, share_s: float | None = None) -> ExtractionPlan:
    """The candidates whose features of the ``n_train`` training images the choice extracts:
    in order, the first always (the head-only model is the floor), then each other one while
    the cost of all those taken (their images not yet ``cached``, over ``extract_rate``, with
    the margin), plus the largest cost among them of the winner's ``n_rest`` other images
    (validation and test, extracted after the choice), stays within ``CHOICE_SHARE`` of the
    budget left (``share_s``: what is left of that share when timing the candidates spent some of
    it). An infinite rate (none measured) costs nothing."""
    share = CHOICE_SHARE * max(0.0, budget_s - elapsed_s) if share_s is None else share_s
    taken, notes, spent, rest = [], [], 0.0, 0.0
    for c in candidates:
        todo = max(0, n_train - c.cached)
        cost, after = todo / c.extract_rate * (1 + MARGIN), n_rest / c.extract_rate * (1 + MARGIN)
        if c is candidates[0] or spent + cost + max(rest, after) <= share:
            taken.append(c.name)
            spent, rest = spent + cost, max(rest, after)
        else:
            others = f" and the winner's {n_rest} others up to {_seconds(max(rest, after))}" if n_rest else ""
            notes.append(f"{c.name} left out: its {todo} images would take {_seconds(cost)}{others}, over the "
                         f"{_seconds(max(0.0, share - spent))} left of the {_seconds(share)} the choice may spend "
                         "(half the budget left when it began)")
    rates = {c.name: {"extract": round(c.extract_rate, 2)} for c in candidates if math.isfinite(c.extract_rate)}
    return ExtractionPlan(float(budget_s), float(elapsed_s), share, taken, spent + rest, notes, rates)


def _seconds(seconds: float) -> str:
    """``format_duration``, with a tenth of a second below 10 s (``1.4s``)."""
    return f"{seconds:.1f}s" if seconds < 10 else format_duration(seconds)


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


def no_time_for(vectors: int, plan: dict | None, deadline: Deadline) -> str | None:
    """Why the time left cannot hold ``vectors`` more features through TensorFlow (test-time
    augmentation's crop views), or None when it can or there is no budget: at the slower of the
    ``plan``'s (``Plan.to_dict``) measured extraction rate and its forward rate of fine-tuning at
    the features' size, with the margin and the fixed reserve for the head refit and the bundle."""
    if deadline.budget_s is None:
        return None
    plan = plan or {"rates": {}, "backbones": [None]}
    rates, size = plan["rates"].get(plan["backbones"][0], {}), plan.get("feature_size") or plan.get("image_size")
    train = rates.get("train") and scaled_rate(rates["train"], rates.get("train_size", size), size)
    rate = min([r for r in (rates.get("extract"), FORWARD_PER_TRAIN * (train or 0.0)) if r], default=None)
    if rate is None:
        return "no extraction rate measured"
    need = vectors * (1 + MARGIN) / rate + FIXED_RESERVE_S
    return f"needs about {format_duration(need)}, {format_duration(deadline.left())} left" \
        if need > deadline.left() else None


class Planner:
    """The plan of one run's fine-tuning, made when its rate is measured: ``planner(train_rate)
    -> (epochs, reserve_s)`` as ``finetuning.fine_tune`` asks, with the plan said (an ``Info``
    event) and kept in ``plan``. ``splits``: the run's ``data.Splits``; ``extract_rate``: the
    measured images/s of the frozen features (None: all came from the cache); ``resizable``: the
    backbone takes any image size (``LoadedBackbone.any_size``). The training rate is measured at
    ``train_size``; the plan's ``image_size`` is where training then runs (it may be lower, only
    with ``augment``: the random crops whose zoom it cancels).
    ``choice``: the ``ExtractionPlan`` of the ``--backbone`` choice whose winner ``name`` is,
    which the plan then lists (the backbones it extracted, and every candidate's rate)."""

    def __init__(self, cfg, splits, deadline: Deadline, *, name: str, image_size: int, views: int,
                 extract_rate: float | None, progress, resizable: bool = False, choice: ExtractionPlan | None = None,
                 augment: bool = True):
        self.deadline, self.progress, self.plan, self.choice = deadline, progress, None, choice
        self.name, self.image_size, self.views, self.extract_rate = name, image_size, views, extract_rate
        # A lower training size only cancels the random crops' zoom: without crops it would show
        # objects smaller than the features will see them.
        self.resizable, self.augment = resizable, augment
        self.counts = dict(n_fit=len(splits.fit), n_holdout=len(splits.holdout),
                           n_all=len(splits.train) + len(splits.val) + len(splits.test))
        # --fine-tune-epochs caps the plan when it was given; its default is --fine-tune's own.
        self.max_epochs = MAX_EPOCHS if cfg.fine_tune_epochs == DEFAULTS.fine_tune_epochs else cfg.fine_tune_epochs

    def worth_measuring(self) -> bool:
        """Whether there is time to time a few fine-tuning steps (a trace and three batches, about
        as long as extracting the features took) and still finish head-only; if not, the plan is
        made now without fine-tuning."""
        n_all, views = self.counts["n_all"], self.views
        # No rate: every feature came from the store, and the head-only model needs none extracted.
        head_only = (n_all * views / self.extract_rate * (1 + MARGIN) if self.extract_rate else 0.0) + FIXED_RESERVE_S
        if self.deadline.left() >= 2 * head_only:
            return True
        self(0.0, why="no time left to time fine-tuning")
        return False

    @property
    def train_size(self) -> int:
        """The resolution to measure training at: the best of ``training_sizes``."""
        return training_sizes(self.image_size, resizable=self.resizable and self.augment)[0]

    def __call__(self, train_rate: float, *, why: str | None = None) -> tuple[int, float]:
        """The plan for ``train_rate`` images/s measured at ``train_size`` (0: none)."""
        rate = train_rate if train_rate > 0 else None
        forward = FORWARD_PER_TRAIN * scaled_rate(rate, self.train_size, self.image_size) if rate else None
        first = Candidate(self.name, self.image_size, extract_rate=self.extract_rate or forward or 1.0, train_rate=rate,
                          extracted=True, train_size=self.train_size, resizable=self.resizable,
                          augment=self.augment)
        self.plan = make_plan(self.deadline.budget_s, self.deadline.elapsed(), [first], views=self.views,
                              max_epochs=self.max_epochs, **self.counts)
        if why:
            self.plan.reason = why
        if self.extract_rate is None and rate is None:  # a stand-in rate, not a measured one: not recorded
            self.plan.rates[self.name].pop("extract", None)
        if self.choice is not None:
            self.plan.backbones = [self.name, *(n for n in self.choice.backbones if n != self.name)]
            self.plan.rates = {**self.choice.rates, **self.plan.rates}
        self.progress(Info(self.plan.describe()))
        if not self.plan.fine_tune:
            return 0, 0.0
        reserve = finish_seconds(n_all=self.counts["n_all"], n_holdout=self.counts["n_holdout"], views=self.views,
                                 forward_rate=forward, epochs=self.plan.epochs)
        return self.plan.epochs, reserve
