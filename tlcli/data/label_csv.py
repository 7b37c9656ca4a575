"""Labels from a CSV file instead of class folders: ``tlcli train labels.csv``.

The file has a header: ``path,label`` (one label a photo), and optionally a ``split`` column
(``train``, ``val`` or ``test``, as split folders give them). A path is relative to the CSV's
folder, or absolute. The labels are the sorted set of label names, as with folders, and the
photos are listed in the order a folder scan lists them (by label, then path), so the same
photos as folders or as a CSV train the same model. A malformed file (a wrong header, bad
quoting, an empty label, one path given two labels, an unknown split) is one ``DatasetError``
naming the line; a row whose file is unusable is skipped like a file in a class folder, its
skip entry naming the line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from tlcli.errors import DatasetError
from tlcli.labels import label_problem, ordered

SPLITS = ("train", "val", "test")
MAX_CSV_BYTES = 1 << 30


@dataclass(frozen=True)
class Row:
    line: int
    path: Path
    label: str
    split: str | None


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
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = [h.strip().lower() for h in next(reader, [])]
            columns = _columns(header, path, option)
            rows = [_row(values, reader.line_num, columns, base, path, option) for values in reader
                    if any(v.strip() for v in values)]
    except csv.Error as exc:
        raise DatasetError(f"{option} {path}: line {reader.line_num}: not valid CSV ({exc}); fix the quoting "
                           "there") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{option} {path}: not UTF-8 text; save it as UTF-8 CSV") from None
    except OSError as exc:
        raise DatasetError(f"{option} {path}: cannot read it ({exc.strerror}); check its permissions") from None
    if not rows:
        raise DatasetError(f"{option} {path}: no rows below the header; list one photo a line as path,label")
    return _deduplicated(rows, path, option)


def _columns(header: list[str], path: Path, option: str) -> dict[str, int]:
    if "path" not in header or "label" not in header or not set(header) <= {"path", "label", "split"}:
        raise DatasetError(f"{option} {path}: line 1: the header must be path,label (and optionally split), not "
                           f"{','.join(header) or 'empty'}")
    return {name: header.index(name) for name in header}


def _row(values: list[str], line: int, columns: dict[str, int], base: Path, path: Path, option: str) -> Row:
    if len(values) != len(columns):
        raise DatasetError(f"{option} {path}: line {line}: {len(values)} field(s) where the header has "
                           f"{len(columns)}; quote a value that holds a comma")
    file, label = values[columns["path"]].strip(), values[columns["label"]].strip()
    split = values[columns["split"]].strip().lower() if "split" in columns else None
    where = f"{option} {path}: line {line}"
    if not file:
        raise DatasetError(f"{where}: the path is empty; give the photo's path")
    problem = label_problem(label)
    if problem:
        raise DatasetError(f"{where}: the label {problem}; give a one-line label name")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{where}: split {split!r} is none of {', '.join(SPLITS)}")
    return Row(line, Path(file) if os.path.isabs(file) else base / file, label, split)


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
               option: str) -> tuple[list[tuple[Path, int]], list[str], dict[str, int]]:
    """(the (photo, label index) of the rows of ``split`` (all rows when None), in a folder scan's
    order; the labels: ``labels`` when given, else the sorted label names of every row; each
    photo's line, by path). Raises ``DatasetError`` for a label that is not one of ``labels``."""
    names = labels if labels is not None else ordered(r.label for r in rows)
    if labels is None and len(names) < 2:
        raise DatasetError(f"{option} {path}: only one label ({names[0]}); a classifier needs at least two")
    index = {label: i for i, label in enumerate(names)}
    chosen = [r for r in rows if split is None or (r.split or "train") == split]
    unknown = next((r for r in chosen if r.label not in index), None)
    if unknown is not None:
        raise DatasetError(f"{option} {path}: line {unknown.line}: label {unknown.label!r} is not a label of the "
                           f"model ({', '.join(names)}); fix the label or remove the line")
    found = sorted(chosen, key=lambda r: (index[r.label], str(r.path)))
    return [(r.path, index[r.label]) for r in found], list(names), {str(r.path): r.line for r in found}
