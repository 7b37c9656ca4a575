"""One self-contained HTML page of image findings, for ``audit --report`` and ``evaluate --report``.

A page is a title, a few summary lines and sections; a section holds groups of cards shown side
by side, a card one image (a JPEG thumbnail made by Pillow, embedded as a ``data:`` URI, linked to
the full image as a ``file:`` URL) with caption lines, and may end with a table. Nothing is
fetched from anywhere, so the page opens offline; every text is HTML-escaped. ``write_csv``
writes the one-row-per-finding tables beside it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tlcli import files
from tlcli.data import images
from tlcli.errors import OutputExistsError, UsageError

THUMBNAIL = 160  # the longer side of a thumbnail, in pixels


@dataclass
class Card:
    """One image: ``path`` as the finding names it, ``lines`` of caption (the first in bold)."""

    path: str
    lines: list[str] = field(default_factory=list)
    # An image about this one (a saliency overlay), shown beside it and linked to its file.
    overlay: str | None = None
    control: str = ""  # HTML under the caption (audit's review picker), made escaped by its maker


@dataclass
class Section:
    """A heading, a sentence saying what the groups are, and the groups (lists of cards)."""

    title: str
    note: str = ""
    groups: list[list[Card]] = field(default_factory=list)
    # A plain table instead of (or after) the cards: header and rows of text; none without rows.
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def shown_path(path: str, root: str | os.PathLike | None) -> str:
    """``path`` relative to ``root`` when it lies under it (as tables show it), else as given."""
    if root is None:
        return str(path)
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(root)))
    except ValueError:
        return str(path)


def thumbnail(path: str | os.PathLike, *, size: int = THUMBNAIL) -> str | None:
    """A ``data:image/jpeg;base64,...`` URI of the image at ``path`` scaled to fit ``size``
    pixels, or None when it cannot be decoded (it changed, or it is one of the skipped files)."""
    try:
        img = images.load_rgb(path)
    except images.ImageError:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
.note{color:#555}.group{display:flex;flex-wrap:wrap;gap:12px;padding:10px;margin:10px 0;
border:1px solid #ddd;border-radius:6px;background:#fafafa}
.card{width:170px;font-size:12px;overflow-wrap:anywhere}
.card img{display:block;max-width:160px;max-height:160px;border:1px solid #bbb}
.card.pair{width:340px}.pics{display:flex;gap:8px;align-items:flex-start}
.missing{width:160px;height:100px;display:flex;align-items:center;justify-content:center;
background:#eee;color:#888}.card a{color:#2a5db0}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.review{margin-top:4px}.review select{font-size:12px;max-width:160px}
.toolbar{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd}
"""


def file_url(path: str | os.PathLike) -> str:
    """The ``file:`` URL of ``path`` (made absolute against the current folder), percent-encoded."""
    return Path(os.path.abspath(path)).as_uri()


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?%?")


def _cell(value) -> str:
    """A table cell; a number (or one written as text, like "0.912" or "75.0%") right-aligned."""
    text = str(value)
    numeric = _NUMBER.fullmatch(text) is not None
    return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def _picture(path: str, cache: dict[str, str | None], title: str) -> str:
    """A thumbnail of ``path`` linked to the file (each path thumbnailed once per page)."""
    esc = html.escape
    if path not in cache:
        cache[path] = thumbnail(path)
    uri = cache[path]
    img = f'<img src="{uri}" alt="{esc(path)}">' if uri else '<div class="missing">no preview</div>'
    return f'<a href="{esc(file_url(path))}" title="{esc(title)}">{img}</a>'


def _card(card: Card, cache: dict[str, str | None]) -> str:
    esc = html.escape
    pictures = _picture(card.path, cache, "open the full image")
    if card.overlay:
        pictures = f'<div class="pics">{pictures}{_picture(card.overlay, cache, "open the overlay")}</div>'
    caption = "".join(f"<div>{'<b>' if i == 0 else ''}{esc(line)}{'</b>' if i == 0 else ''}</div>"
                      for i, line in enumerate(card.lines))
    return (f'<div class="card{" pair" if card.overlay else ""}">{pictures}{caption}'
            f'<div><a href="{esc(file_url(card.path))}">full image</a></div>{card.control}</div>')


def page(title: str, summary: list[str], sections: list[Section], *, toolbar: str = "", script: str = "") -> str:
    """The HTML text of a page (see the module docstring). Each distinct image path is
    thumbnailed once. ``toolbar`` (HTML below the summary) and ``script`` (an inline ``<script>``
    at the end) are inserted as given: their maker escapes them, and they fetch nothing."""
    esc = html.escape
    cache: dict[str, str | None] = {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    out += [f'<p class="note">{esc(line)}</p>' for line in summary]
    out += [toolbar] if toolbar else []
    for s in sections:
        out.append(f"<h2>{esc(s.title)}</h2>")
        if s.note:
            out.append(f'<p class="note">{esc(s.note)}</p>')
        groups = [g for g in s.groups if g]
        if not groups and not s.rows:
            out.append("<p>None found.</p>")
        for group in groups:
            out.append('<div class="group">')
            for card in group:
                out.append(_card(card, cache))
            out.append("</div>")
        if s.header and s.rows:
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in s.header) + "</tr>")
            out += ["<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in s.rows]
            out.append("</table>")
    out += [script] if script else []
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_page(path: str | os.PathLike, title: str, summary: list[str], sections: list[Section], **extra) -> Path:
    """Write ``page(...)`` (``extra``: its toolbar and script) to ``path`` atomically
    (``files.write_file``; raises ``TlcliError``)."""
    files.write_file(path, page(title, summary, sections, **extra).encode("utf-8"))
    return Path(path)


# What a spreadsheet takes for the start of a formula (OWASP's list), and a plain number.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def csv_cell(value) -> str:
    """``value`` as a CSV cell that a spreadsheet shows as text: one that starts like a formula
    (``= + - @``, tab, carriage return; a class folder named ``=HYPERLINK(...)``) gets a leading
    apostrophe, the spreadsheets' mark for text. Numbers are left as they are."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text) else text


def csv_bytes(header, rows) -> bytes:
    """A CSV file's bytes (UTF-8, a header row), every cell through ``csv_cell``."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow([csv_cell(v) for v in header])
    w.writerows([csv_cell(v) for v in row] for row in rows)
    return text.getvalue().encode("utf-8")


def write_csv(path: str | os.PathLike, header, rows) -> Path:
    """``csv_bytes``, written atomically (``files.write_file``)."""
    files.write_file(path, csv_bytes(header, rows))
    return Path(path)


def prepare_dir(report_dir: str | os.PathLike, *, data, force: bool, option: str = "--report") -> Path:
    """Create the report folder ``report_dir``, before any expensive work. Refused (``UsageError``):
    one that is a file, cannot be created, is not writable, or is, lies inside or contains one of
    the image folders ``data`` ((name, path) pairs); ``OutputExistsError`` for a folder that is
    not empty, unless ``force`` (its files of the same names are then replaced, nothing else)."""
    p = Path(report_dir)
    files.check_apart(p, option, data)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {p}: is a file; give a folder for the report")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise OutputExistsError(f"{option} {p}: the folder is not empty; choose another, or pass --force to "
                                "replace the report files in it")
    return files.make_folder(p, option)
