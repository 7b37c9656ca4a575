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
