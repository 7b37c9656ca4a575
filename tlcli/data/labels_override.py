"""Labels fixed without touching a photo: ``tlcli train DIR --labels-override review.csv``.

The review file is what ``tlcli audit --report R`` writes as ``R/review.csv`` (``COLUMNS``),
filled in by hand or on ``audit.html``: one row a photo, its ``action`` ``keep`` (or empty),
``relabel`` (to ``new_label`` when given, else to ``suggested_label``) or ``drop``. Other columns
(``label``, ``evidence``, a spreadsheet's own) are for the reader. A ``path`` is absolute (as the
audit writes it) or relative to the data: DIR, or a labels CSV's folder. The override applies to
the scanned samples only; the user's files are never moved or changed. A cell the audit marked
as text for spreadsheets (a leading apostrophe, ``html_report.csv_cell``) is read back without it.

Every problem is one ``DatasetError`` naming the file, the line and the fix: a wrong header, a
bad action, a label that is not one of the data's, a path that is not one of its images, one
photo given two different actions, or a class left without training images.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from tlcli.data.label_csv import csv_problems
from tlcli.errors import DatasetError

OPTION = "--labels-override"
# What ``tlcli audit`` writes, in this order; ``action`` and ``new_label`` are left empty for the user.
COLUMNS = ("path", "label", "suggested_label", "evidence", "action", "new_label")
ACTIONS = ("keep", "relabel", "drop")
MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class Row:
    line: int
    path: str     # as written in the file (absolute, or relative to the data)
    action: str   # one of ACTIONS ("" is read as keep)
    label: str    # the relabel target (new_label, else suggested_label); "" for keep and drop
    given: str    # the label column, when the file has one: the label the review saw


@dataclass(frozen=True)
class Review:
    """A parsed review file: its rows (one a photo), where it is, and the SHA-256 of its bytes."""

    file: str
    sha256: str
    rows: list[Row]


def read(path: str | os.PathLike) -> Review:
    """The review file at ``path``, parsed and checked on its own (header, actions, a relabel
    with a target, one action a photo). Raises ``DatasetError``."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"{OPTION} {file}: no such file; give the review.csv that 'tlcli audit --report' "
                           "wrote, with its action column filled in")
    try:
        if file.stat().st_size > MAX_BYTES:
            raise DatasetError(f"{OPTION} {file}: larger than {MAX_BYTES >> 20} MiB; keep only the rows to change")
        raw = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{OPTION} {file}: cannot read it ({exc.strerror}); check its permissions") from None
    where = f"{OPTION} {file}"
    with csv_problems(where, lambda: reader.line_num):
        reader = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""), strict=True)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "action" not in header:
            raise DatasetError(f"{where}: line 1: the header must name at least path and action (as review.csv "
                               f"has: {','.join(COLUMNS)}), not {','.join(header) or 'empty'}")
        column = {name: header.index(name) for name in reversed(header)}  # the first of a repeated name
        rows = [_row(values, reader.line_num, len(header), column, where) for values in reader
                if any(v.strip() for v in values)]
    return Review(str(file.absolute()), hashlib.sha256(raw).hexdigest(), _one_a_photo(rows, where))


def _row(values: list[str], line: int, width: int, column: dict[str, int], where: str) -> Row:
    """One line of the file; missing trailing cells are empty (as some spreadsheets write them)."""
    def cell(name: str) -> str:
        i = column.get(name)
        return values[i].strip() if i is not None and i < len(values) else ""

    if len(values) > width:
        raise DatasetError(f"{where}: line {line}: {len(values)} fields where the header has {width}; quote a "
                           "value that holds a comma")
    path, action = cell("path"), cell("action").lower()
    if not path:
        raise DatasetError(f"{where}: line {line}: the path is empty; give the photo's path or remove the line")
    if action not in ("", *ACTIONS):
        raise DatasetError(f"{where}: line {line}: action {cell('action')!r} is none of {', '.join(ACTIONS)} "
                           "(or empty, for keep)")
    target = (cell("new_label") or cell("suggested_label")) if action == "relabel" else ""
    if action == "relabel" and not target:
        raise DatasetError(f"{where}: line {line}: relabel to what? Fill in new_label (or suggested_label)")
    return Row(line, path, action or "keep", target, cell("label"))


def _one_a_photo(rows: list[Row], where: str) -> list[Row]:
    seen: dict[str, Row] = {}
    for row in rows:
        _same_action(seen.setdefault(row.path, row), row, where)
    return list(seen.values())


def _same_action(first: Row, row: Row, where: str) -> None:
    """Refuse ``row`` when it names the photo of an earlier row, ``first``, with another action."""
    if (first.action, first.label) != (row.action, row.label):
        raise DatasetError(f"{where}: line {row.line}: {row.path} is also on line {first.line} with another "
                           "action; keep one of the two lines")


def _text(cell: str, known) -> str:
    """``cell``, or ``cell`` without the apostrophe a spreadsheet-safe CSV put before it, if only
    that is one of ``known`` (labels)."""
    return cell[1:] if cell not in known and cell.startswith("'") and cell[1:] in known else cell


def apply(review: Review, parts: dict[str, list], labels: list[str], *, root: str | os.PathLike,
          option: str = OPTION) -> tuple[dict[str, list], dict]:
    """``parts`` ({split name: [data.Sample]}) with the relabels and drops of ``review``, and what
    the bundle records under ``labels_override``: {file, sha256, rows (photos the review names),
    relabelled, dropped, kept}. ``labels``: the data's labels (a relabel target must be one); ``root``: what a relative
    path is relative to. Raises ``DatasetError`` naming the line of an unknown path or label, of
    a row whose label column no longer matches the photo's, and for a class left without
    training images."""
    where = f"{option} {review.file}"
    index = {label: i for i, label in enumerate(labels)}
    by_path = {os.path.abspath(s.path): s for samples in parts.values() for s in samples}
    changes: dict[str, int | tuple | None] = {}  # photo -> its new label index (set), or None to drop it
    lines: dict[str, Row] = {}  # photo -> the row that named it (a path may be written two ways)
    relabelled = dropped = 0
    for row in review.rows:
        sample = by_path.get(_resolved(row.path, root))
        if sample is None and row.path.startswith("'"):
            sample = by_path.get(_resolved(row.path[1:], root))
        if sample is None:
            raise DatasetError(f"{where}: line {row.line}: {row.path} is not one of the images of the data (it may "
                               "have been skipped as unusable, or the review is of other data); remove the line")
        first = lines.setdefault(os.path.abspath(sample.path), row)
        if first is not row:
            _same_action(first, row, where)
            continue
        given = _text(row.given, index)
        if given and ";" not in given and given != labels[sample.label]:
            raise DatasetError(f"{where}: line {row.line}: {row.path} is labelled {labels[sample.label]!r} in the "
                               f"data, not {given!r} as the review says (the data changed, or the review came from "
                               "a run with another --labels-override); audit the data again, or fix the label column")
        if row.action == "drop":
            changes[os.path.abspath(sample.path)], dropped = None, dropped + 1
        elif row.action == "relabel":
            target = _target(row, sample, index, where)
            if target != (sample.labels or sample.label):
                changes[os.path.abspath(sample.path)], relabelled = target, relabelled + 1
    out = {name: _changed(samples, changes) for name, samples in parts.items()}
    left = {i for s in out.get("train", []) for i in s.label_set()}
    empty = [label for i, label in enumerate(labels) if i not in left]
    if empty:
        raise DatasetError(f"{where}: leaves no training image labelled {empty[0]!r}; keep some of them, or "
                           "take that class out of the data")
    return out, {"file": review.file, "sha256": review.sha256, "rows": len(lines), "relabelled": relabelled,
                 "dropped": dropped, "kept": len(lines) - relabelled - dropped}


def _target(row: Row, sample, index: dict[str, int], where: str) -> int | tuple[int, ...]:
    """The label index a relabel gives ``sample``; of a multi-label photo (``Sample.labels``), the
    sorted indices of the labels the target names, joined by ";". Raises ``DatasetError`` for a
    label that is not one of ``index``."""
    names = [part.strip() for part in row.label.split(";")] if sample.labels else [row.label]
    for name in names:
        if _text(name, index) not in index:
            raise DatasetError(f"{where}: line {row.line}: label {_text(name, index)!r} is not a label of the data "
                               f"({', '.join(index)}); fix the label or the action")
    found = [index[_text(name, index)] for name in names]
    return tuple(sorted(set(found))) if sample.labels else found[0]


def _resolved(path: str, root) -> str:
    return os.path.abspath(path if os.path.isabs(path) else os.path.join(root, path))


def _changed(samples: list, changes: dict[str, int | tuple | None]) -> list:
    out = []
    for s in samples:
        key = os.path.abspath(s.path)
        if key not in changes:
            out.append(s)
        elif isinstance(changes[key], tuple):  # a multi-label photo's new label set
            out.append(dataclasses.replace(s, label=changes[key][0], labels=changes[key]))
        elif changes[key] is not None:
            out.append(dataclasses.replace(s, label=changes[key]))
    return out
