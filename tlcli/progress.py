"""Progress events: the library reports through a callback; only the CLI renders them.

An event is one of eight small frozen dataclasses. A task (scan, extract, head, fine-tune, save,
convert, ...) is ``Start``, then ``Advance`` or ``Epoch`` events, then ``End``; the others are
one-off reports. A callback dispatches on the type (``match event: case Epoch(): ...``); each
event also names itself in the class attribute ``kind`` ("start", "epoch", ...), for callbacks
that filter by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class Start:
    """``task`` begins: ``total`` steps (None when unknown), ``completed`` already done (a resumed run)."""

    kind: ClassVar[str] = "start"

    task: str
    total: int | None = None
    completed: int = 0


@dataclass(frozen=True)
class Advance:
    """``task`` has done ``completed`` of ``total`` steps."""

    kind: ClassVar[str] = "advance"

    task: str
    completed: int = 0
    total: int | None = None


@dataclass(frozen=True)
class End:
    """``task`` is finished, having done ``completed`` of ``total`` steps."""

    kind: ClassVar[str] = "end"

    task: str
    completed: int = 0
    total: int | None = None


@dataclass(frozen=True)
class Epoch:
    """Epoch ``completed`` (1-based) of ``total`` of a training phase ``task``; ``logs`` holds its
    metrics (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ...)."""

    kind: ClassVar[str] = "epoch"

    task: str
    completed: int = 0
    total: int | None = None
    logs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Info:
    kind: ClassVar[str] = "info"
    message: str


@dataclass(frozen=True)
class Warn:
    kind: ClassVar[str] = "warning"
    message: str


@dataclass(frozen=True)
class Counts:
    """Images per class of the training and the validation split, and of the test split when
    DIR has a test/ folder (else None), label -> count."""

    kind: ClassVar[str] = "counts"

    train: dict
    val: dict
    test: dict | None = None


@dataclass(frozen=True)
class Skipped:
    """Unusable files: rows with ``path``, ``reason`` and ``detail``."""

    kind: ClassVar[str] = "skipped"

    files: list


ProgressEvent = Start | Advance | End | Epoch | Info | Warn | Counts | Skipped
Callback = Callable[[ProgressEvent], None]

def silent(event: ProgressEvent) -> None:
    pass


def counter(progress: Callback, task: str, check: Callable[[], None] | None = None) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that reports ``task`` as Start / Advance / End events.
    ``check`` runs first on every call and may raise to abandon the work."""
    def report(done: int, total: int) -> None:
        if check is not None:
            check()
        if done == 1:
            progress(Start(task, total=total))
        progress(Advance(task, completed=done, total=total))
        if done == total:
            progress(End(task, completed=done, total=total))

    return report
