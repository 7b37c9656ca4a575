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
    cached: int = 0  # of its training images' features, how many are in the feature store already


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
                    n_rest: int) -> ExtractionPlan:
    """The candidates whose features of the ``n_train`` training images the choice extracts:
    in order, the first always (the head-only model is the floor), then each other one while
    the cost of all those taken (their images not yet ``cached``, over ``extract_rate``, with
    the margin), plus the largest cost among them of the winner's ``n_rest`` other images
    (validation and test, extracted after the choice), stays within ``CHOICE_SHARE`` of the
    budget left. An infinite rate (none measured) costs nothing."""
    share = CHOICE_SHARE * max(0.0, budget_s - elapsed_s)
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
                         "(half the budget left)")
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


class Planner:
    """The plan of one run's fine-tuning, made when its rate is measured: ``planner(train_rate)
    -> (epochs, reserve_s)`` as ``finetuning.fine_tune`` asks, with the plan said (an ``Info``
    event) and kept in ``plan``. ``splits``: the run's ``data.Splits``; ``extract_rate``: the
    measured images/s of the frozen features (None: all came from the cache); ``choice``: the
    ``ExtractionPlan`` of the ``--backbone`` choice whose winner ``name`` is, which the plan
    then lists (the backbones it extracted, and every candidate's rate)."""

    def __init__(self, cfg, splits, deadline: Deadline, *, name: str, image_size: int, views: int,
                 extract_rate: float | None, progress, choice: ExtractionPlan | None = None):
        self.deadline, self.progress, self.plan, self.choice = deadline, progress, None, choice
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
        if self.choice is not None:
            self.plan.backbones = [self.name, *(n for n in self.choice.backbones if n != self.name)]
            self.plan.rates = {**self.choice.rates, **self.plan.rates}
        self.progress(Info(self.plan.describe()))
        if not self.plan.fine_tune:
            return 0, 0.0
        reserve = finish_seconds(n_all=self.counts["n_all"], n_holdout=self.counts["n_holdout"], views=self.views,
                                 forward_rate=FORWARD_PER_TRAIN * rate, epochs=self.plan.epochs)
        return self.plan.epochs, reserve
