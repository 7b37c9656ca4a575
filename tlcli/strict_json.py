"""Standard JSON only (RFC 8259): every file and every --json output tlcli writes goes through here.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which strict parsers (JavaScript,
Go, Rust) reject; a metric that is not a finite number is written as ``null`` instead.
"""

from __future__ import annotations

import json
import math


def finite(data):
    """A copy of ``data`` (dicts, lists, tuples, scalars) with every non-finite float as None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def dumps(data, *, indent: int | None = None) -> str:
    """``data`` as standard JSON text: non-finite floats become null, and non-ASCII and control
    characters are written as \\u escapes (so the text is safe to print on a terminal)."""
    return json.dumps(finite(data), indent=indent, allow_nan=False, ensure_ascii=True)


def show(value, limit: int = 60) -> str:
    """``value`` as short, escaped JSON, safe to print on one line."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
