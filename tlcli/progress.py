"""Progress events: the library reports through a callback; only the CLI renders them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Event:
    """``kind`` is one of: start, advance, end (a task with ``total`` steps), epoch (``logs``),
    info and warning (``message``)."""

    kind: str
    task: str = ""
    total: int | None = None
    completed: int = 0
    logs: dict = field(default_factory=dict)
    message: str = ""


Callback = Callable[[Event], None]


def silent(event: Event) -> None:
    pass


def counter(progress: Callback, task: str, check: Callable[[], None] | None = None) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that reports ``task`` as start / advance / end events.
    ``check`` runs first on every call and may raise to abandon the work."""
    def report(done: int, total: int) -> None:
        if check is not None:
            check()
        if done == 1:
            progress(Event("start", task, total=total))
        progress(Event("advance", task, completed=done, total=total))
        if done == total:
            progress(Event("end", task, completed=done, total=total))

    return report
