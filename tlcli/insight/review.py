"""The review of an audit: ``review.csv`` (one row per image a finding names: its path, label,
suggested label and the evidence, with an empty ``action`` for the user) and the controls of
``audit.html`` that fill it in: an action on each image, and a button that downloads the filled
file. The page stays static: the rows are embedded in it, the script is inline, and the file is
made in the browser (a Blob); nothing is fetched. ``tlcli train --labels-override`` reads the
file back (``data.labels_override``, which owns its columns).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tlcli.data.labels_override import ACTIONS, COLUMNS
from tlcli.insight import html_report

REVIEW_CSV = "review.csv"


@dataclass
class ReviewRow:
    """One image to review: its absolute ``path``, its ``label``, the label a finding suggests
    ("" when none does) and what each finding said of it (``evidence``)."""

    path: str
    label: str
    suggested: str = ""
    evidence: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        """The row's first four columns (``COLUMNS``), before action and new_label."""
        return [self.path, self.label, self.suggested, "; ".join(self.evidence)]


def _text(value) -> str:
    """A label cell: a label, or several (a multi-label finding's list) joined by ';'."""
    return ";".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def review_rows(result) -> list[ReviewRow]:
    """The rows of ``result``'s (an ``AuditResult``) review, one per image, in this order: the
    likely mislabels (most suspicious first; these suggest a label), then the outliers, then
    the images of duplicate groups. An image several findings name has one row with each one's
    evidence. Only each finding's path, label, suggested label and score are read."""
    rows: dict[str, ReviewRow] = {}

    def add(path, label, evidence: str, suggested=""):
        row = rows.setdefault(os.path.abspath(path), ReviewRow(os.path.abspath(path), _text(label)))
        row.suggested = row.suggested or _text(suggested)
        row.evidence.append(evidence)

    for m in result.likely_mislabeled:
        alarm = "" if m.false_alarm is None else f", false alarm {m.false_alarm:.0%}"
        add(m.path, m.label, f"likely mislabel, score {m.score:.3f}{alarm}", m.suggested_label)
    for o in result.outliers:
        add(o.path, o.label, f"outlier, score {o.score:.3f}")
    for g, d in enumerate(result.near_duplicates, 1):
        for path, label, split in zip(d.paths, d.labels, d.splits):
            add(path, label, f"duplicate group {g} ({d.kind}, {split}), similarity {d.similarity:.3f}")
    return list(rows.values())


def write_csv(rows: list[ReviewRow], path) -> Path:
    """``review.csv`` at ``path`` (atomically; cells as ``html_report.csv_bytes`` writes them),
    action and new_label empty."""
    return html_report.write_csv(path, COLUMNS, [[*r.cells(), "", ""] for r in rows])


@dataclass
class Controls:
    """What ``audit.html`` needs for the review: ``control(path)``, the HTML of one image's
    action picker (empty for a path without a row); ``toolbar``, the download button; ``script``."""

    rows: list[ReviewRow]
    labels: list[str]

    def __post_init__(self):
        self._index = {r.path: i for i, r in enumerate(self.rows)}

    def control(self, path: str) -> str:
        i = self._index.get(os.path.abspath(path))
        if i is None:
            return ""
        row, esc = self.rows[i], html.escape
        others = [label for label in self.labels if label != row.label]
        target = row.suggested if row.suggested in self.labels else (others or self.labels)[0]
        actions = "".join(f'<option value="{a}">{a}</option>' for a in ACTIONS)
        targets = "".join(f'<option value="{j}"{" selected" if label == target else ""}>{esc(label)}</option>'
                          for j, label in enumerate(self.labels))
        return (f'<div class="review"><select class="action" data-row="{i}" title="action for review.csv">'
                f'<option value="">action...</option>{actions}</select> '
                f'<select class="new-label" data-row="{i}" title="relabel to" hidden>{targets}</select></div>')

    @property
    def toolbar(self) -> str:
        return ('<p class="note">Choose an action under an image (keep, relabel to the label shown beside it, '
                "or drop), download review.csv, then train with <code>tlcli train DIR --labels-override "
                "review.csv</code>: the images themselves are never changed. Images not chosen here keep their "
                'label.</p><div class="toolbar"><button type="button" id="review-download">Download review.csv'
                '</button> <span id="review-count">no action chosen</span></div>')

    @property
    def script(self) -> str:
        data = {"header": [html_report.csv_cell(c) for c in COLUMNS],
                "rows": [[html_report.csv_cell(c) for c in r.cells()] for r in self.rows],
                "labels": [html_report.csv_cell(label) for label in self.labels]}
        # Inside <script>, no "<" may start a tag: every <, > and & is a JSON escape instead.
        embedded = json.dumps(data, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e") \
            .replace("&", "\\u0026")
        return f"<script>\nconst REVIEW = {embedded};\n{_SCRIPT}</script>"


# The review's script: actions chosen per row (every picker of a row shows the same), and the
# download, quoted as Python's csv module quotes (a cell with a comma, quote or line break).
_SCRIPT = """(function () {
  const chosen = REVIEW.rows.map(() => ({action: "", label: null}));
  const pickers = (kind, i) => document.querySelectorAll("select." + kind + "[data-row='" + i + "']");
  function show(i) {
    const c = chosen[i];
    pickers("action", i).forEach(s => { s.value = c.action; });
    pickers("new-label", i).forEach(s => {
      s.hidden = c.action !== "relabel";
      if (c.label !== null) s.value = c.label;
    });
    const n = chosen.filter(x => x.action).length;
    document.getElementById("review-count").textContent = n ? n + " action(s) chosen" : "no action chosen";
  }
  document.addEventListener("change", e => {
    const t = e.target, i = t.dataset ? t.dataset.row : undefined;
    if (i === undefined) return;
    if (t.classList.contains("action")) {
      chosen[i].action = t.value;
      if (chosen[i].label === null) chosen[i].label = pickers("new-label", i)[0].value;
    } else if (t.classList.contains("new-label")) {
      chosen[i].label = t.value;
    }
    show(i);
  });
  const quoted = v => /[",\\r\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
  document.getElementById("review-download").addEventListener("click", () => {
    const rows = REVIEW.rows.map((r, i) => r.concat([chosen[i].action,
      chosen[i].action === "relabel" ? REVIEW.labels[Number(chosen[i].label)] : ""]));
    const text = [REVIEW.header].concat(rows).map(r => r.map(quoted).join(",") + "\\r\\n").join("");
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], {type: "text/csv"}));
    a.download = "review.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
  });
})();
"""
