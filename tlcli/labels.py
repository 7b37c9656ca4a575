"""The label contract: what a label may be, their order, and ``labels.txt``.

Labels are the sorted class names; label ``i`` is output unit ``i`` of every model tlcli writes
(SavedModel, ``.tflite``). A label is a non-empty string without control characters, line or
paragraph separators or lone surrogates (bytes that were not UTF-8), because ``labels.txt`` and
the ``.tflite`` metadata hold one label per line, and tables print them on one line.
"""

from __future__ import annotations

import unicodedata

from tlcli.errors import DatasetError
from tlcli.strict_json import show

# Characters a label may not hold: control characters and every line or paragraph separator.
_FORBIDDEN_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


def forbidden_char(text: str) -> str | None:
    """The first character of ``text`` that no label may hold, or None."""
    return next((c for c in text if unicodedata.category(c) in _FORBIDDEN_CATEGORIES), None)


def label_problem(label) -> str | None:
    """Why ``label`` cannot be a label (not a non-empty one-line string), or None."""
    if not isinstance(label, str):
        return f"{show(label)} is not a string"
    if not label:
        return f"{show(label)} is empty"
    bad = forbidden_char(label)
    if bad is not None:
        return f"{show(label)} holds the control character or line separator U+{ord(bad):04X}"
    return None


def check_label(name: str, what: str = "class folder") -> None:
    """Raise DatasetError for a class name that would split or garble the model's labels, naming
    it escaped (``what`` prefixes the message), so that every trained bundle loads."""
    if forbidden_char(name) is not None:
        raise DatasetError(f"{what} {name!r} has a control character, line break or non-UTF-8 byte in its "
                           "name, which would corrupt the model's labels; rename the folder")


def ordered(names) -> list[str]:
    """The labels of a set of class names, in output-unit order: sorted."""
    return sorted(set(names))


def to_text(labels: list[str]) -> str:
    """labels.txt's content (and the ``.tflite``'s labels): one label per line, "\\n"-terminated."""
    return "".join(f"{label}\n" for label in labels)


def from_text(data: bytes) -> list[str]:
    """The labels of ``to_text``'s UTF-8 bytes: split on "\\n" only, so that no other line
    separator (U+2028, U+0085 ...) inside a label can split it."""
    text = data.decode("utf-8")
    if not text:
        return []
    return (text[:-1] if text.endswith("\n") else text).split("\n")
