"""Labels from a CSV file instead of class folders: ``tlcli train labels.csv``.

The file has a header: ``path,label`` (one label a photo) or ``path,labels`` (several labels a
photo, joined by ";": a multi-label set), and optionally a ``split`` column (``train``, ``val``
or ``test``, as split folders give them). A path is relative to the CSV's
folder, or absolute. The labels are the sorted set of label names, as with folders, and the
photos are listed in the order a folder scan lists them (by label, then path), so the same
photos as folders or as a CSV train the same model. A malformed file (a wrong header, bad
quoting, an empty label, one path given two labels, an unknown split) is one ``DatasetError``
naming the line; a row whose file is unusable is skipped like a file in a class folder, its
skip entry naming the line.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path

from tlcli.errors import DatasetError
from tlcli.labels import label_problem, ordered

SPLITS = ("train", "val", "test")
SEPARATOR = ";"  # between the labels of a path,labels row
MAX_CSV_BYTES = 1 << 30


@dataclass(frozen=True)
class Row:
    line: int
    path: Path
    label: str  # the label; of a multi-label row, its sorted labels joined by ";"
    split: str | None
    labels: tuple[str, ...] = ()  # a multi-label row's labels, sorted (empty for path,label)


def is_multi_label(path: str | os.PathLike) -> bool:
    """Whether the labels CSV at ``path`` has a ``labels`` column (several labels a photo):
    its header only is read; anything unreadable is left to ``read`` to report."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader([f.readline()]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "labels" in [h.strip().lower() for h in header]


def is_label_csv(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a labels CSV (a file ending in .csv) rather than a folder."""
    return str(path).lower().endswith(".csv") and not Path(path).is_dir()


def read(path: str | os.PathLike, option: str = "DIR") -> list[Row]:
    """The rows of the labels CSV at ``path``. Raises ``DatasetError`` naming the file, the line
    and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{option} {path}: no such labels file; give a CSV with a header path,label "
                           "(or a folder with one subfolder per class)")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DatasetError(f"{option} {path}: larger than {MAX_CSV_BYTES >> 20} MiB; split it or use class folders")
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f, \
                csv_problems(f"{option} {path}", lambda: reader.line_num):
            reader = csv.reader(f, strict=True)
            header = [h.strip().lower() for h in next(reader, [])]
            columns = _columns(header, path, option)
            rows = [_row(values, reader.line_num, columns, base, path, option) for values in reader
                    if any(v.strip() for v in values)]
    except OSError as exc:
        raise DatasetError(f"{option} {path}: cannot read it ({exc.strerror}); check its permissions") from None
    if not rows:
        raise DatasetError(f"{option} {path}: no rows below the header; list one photo a line as path,label")
    return _deduplicated(rows, path, option)


@contextlib.contextmanager
def csv_problems(where: str, line):
    """Turn what the csv module and the UTF-8 decoder raise inside the block into one-line
    ``DatasetError``s naming ``where`` (the option and the file) and, for bad CSV, the line
    ``line()`` (the reader's ``line_num``)."""
    try:
        yield
    except csv.Error as exc:
        raise DatasetError(f"{where}: line {line()}: not valid CSV ({exc}); fix the quoting there") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{where}: not UTF-8 text; save it as UTF-8 CSV") from None


def _columns(header: list[str], path: Path, option: str) -> dict[str, int]:
    kind = "labels" if "labels" in header else "label"
    if "path" not in header or not set(header) <= {"path", kind, "split"} or len(set(header)) != len(header) \
            or kind not in header:
        raise DatasetError(f"{option} {path}: line 1: the header must be path,label or path,labels (and "
                           f"optionally split), not {','.join(header) or 'empty'}")
    return {name: header.index(name) for name in header}


def _row(values: list[str], line: int, columns: dict[str, int], base: Path, path: Path, option: str) -> Row:
    if len(values) != len(columns):
        raise DatasetError(f"{option} {path}: line {line}: {len(values)} field(s) where the header has "
                           f"{len(columns)}; quote a value that holds a comma")
    multi = "labels" in columns
    file, label = values[columns["path"]].strip(), values[columns["labels" if multi else "label"]].strip()
    split = values[columns["split"]].strip().lower() if "split" in columns else None
    where = f"{option} {path}: line {line}"
    if not file:
        raise DatasetError(f"{where}: the path is empty; give the photo's path")
    names = tuple(sorted({part.strip() for part in label.split(SEPARATOR)})) if multi else (label,)
    for name in names:
        problem = label_problem(name)
        if problem:
            fix = f"give one-line label names joined by {SEPARATOR!r}" if multi else "give a one-line label name"
            raise DatasetError(f"{where}: the label {problem}; {fix}")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{where}: split {split!r} is none of {', '.join(SPLITS)}")
    file_path = Path(file) if os.path.isabs(file) else base / file
    return Row(line, file_path, SEPARATOR.join(names), split, names if multi else ())


def _deduplicated(rows: list[Row], path: Path, option: str) -> list[Row]:
    """One row a photo: a repeated path with the same label and split counts once; with another
    label or split it is an error naming both lines."""
    seen: dict[str, Row] = {}
    for row in rows:
        first = seen.setdefault(str(row.path), row)
        if (first.label, first.split) != (row.label, row.split):
            raise DatasetError(f"{option} {path}: line {row.line}: {row.path} is also on line {first.line} with "
                               f"another label or split; keep one of the two lines")
    return list(seen.values())


def candidates(rows: list[Row], labels: list[str] | None, split: str | None, path: Path,
               option: str) -> tuple[list[tuple[Path, int]], list[str], dict[str, int], dict[str, tuple[int, ...]]]:
    """(the (photo, label index) of the rows of ``split`` (all rows when None), in a folder scan's
    order (a multi-label row under its first label); the labels: ``labels`` when given, else the
    sorted label names of every row; each photo's line, by path; each multi-label photo's label
    indices, by path (empty for path,label rows)). Raises ``DatasetError`` for a label that is
    not one of ``labels``."""
    names = labels if labels is not None else ordered({name for r in rows for name in _names(r)})
    if labels is None and len(names) < 2:
        raise DatasetError(f"{option} {path}: only one label ({names[0]}); a classifier needs at least two")
    index = {label: i for i, label in enumerate(names)}
    chosen = [r for r in rows if split is None or (r.split or "train") == split]
    unknown = next(((r, name) for r in chosen for name in _names(r) if name not in index), None)
    if unknown is not None:
        raise DatasetError(f"{option} {path}: line {unknown[0].line}: label {unknown[1]!r} is not a label of the "
                           f"model ({', '.join(names)}); fix the label or remove the line")
    first = {str(r.path): min(index[n] for n in _names(r)) for r in chosen}
    found = sorted(chosen, key=lambda r: (first[str(r.path)], str(r.path)))
    multi = {str(r.path): tuple(sorted(index[n] for n in r.labels)) for r in found if r.labels}
    return ([(r.path, first[str(r.path)]) for r in found], list(names), {str(r.path): r.line for r in found},
            multi)


def _names(row: Row) -> tuple[str, ...]:
    return row.labels or (row.label,)
