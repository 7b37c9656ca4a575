"""Everything tlcli shows stays readable in an 80-column terminal: progress rows keep their
numbers, tables cut no label or number, and paths wrap after a "/"."""

import io
import re

from rich.console import Console

from tlcli.cli import render
from tlcli.deploy.inference import Prediction
from tlcli.progress import Advance, Epoch, Start


def _screen(renderable=None, width=80, **console) -> list[str]:
    buf = io.StringIO()
    con = Console(file=buf, width=width, color_system=None, **console)
    if renderable is not None:
        con.print(renderable)
    return buf, con


def _lines(buf) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    return [line.rstrip() for line in text.replace("\r", "\n").split("\n") if line.strip()]


def test_progress_rows_keep_count_rate_and_times_at_80_columns():
    buf, con = _screen(force_terminal=True)
    logs = {"loss": 0.12345, "accuracy": 0.9, "val_loss": 0.3456, "val_accuracy": 0.912}
    with render.progress_display(con) as p:
        p(Start("extract (mirror)", total=12345))
        p(Advance("extract (mirror)", completed=12000, total=12345))
        p(Start("head cv", total=300))
        p(Advance("head cv", completed=42, total=300))
        p(Start("fine-tune", total=5))
        p(Epoch("fine-tune", total=5, completed=2, logs=logs))
    rows = {line.split()[0]: line for line in _lines(buf)[-3:]}
    assert all(len(line) <= 80 for line in rows.values())
    assert "12000/12345" in rows["extract"] and "42/300" in rows["head"] and "2/5" in rows["fine-tune"]
    assert all(re.search(r"\d:\d\d:\d\d", line) for line in rows.values()), "elapsed time on every row"
    assert "holdout 91.2%" in rows["fine-tune"], "the held-out part named for what it is, never 'val'"


def test_log_lines_carry_the_total_and_the_rate():
    clock = [0.0]
    buf, con = _screen()
    p = render.LogProgress(con, interval=0.0, clock=lambda: clock[0])
    p(Start("extract", total=200))
    clock[0] = 10.0
    p(Advance("extract", completed=100, total=200))
    assert _lines(buf) == ["extract 100/200 0:00:10 10.0/s"]


def test_five_ranked_classes_keep_every_label_and_number_at_80_columns():
    labels = ["outwear", "trousers", "longsleeve", "t-shirt", "dress"]
    p = Prediction("photos/2024/holiday/beach/IMG_0001.jpg",
                   [{"label": label, "probability": 0.2 - i * 0.01} for i, label in enumerate(labels)])
    buf, _ = _screen(render.predictions_table("tflite", 5, [p], 80))
    lines = _lines(buf)
    shown = "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    for i, label in enumerate(labels):
        assert f"{label} {100 * (0.2 - i * 0.01):.1f}%" in shown
    assert lines[-2].rstrip().endswith("┘") or lines[-1].rstrip().endswith("┘"), "the right border is there"


def test_paths_wrap_after_a_slash_not_inside_a_name():
    long = "/data/photos/" + "/".join(f"folder_{i:02d}" for i in range(12)) + "/IMG_0001.jpg"
    table = render.kv_table("Training summary")
    table.add_row("model", render.path_cell(long))
    buf, _ = _screen(table)
    cells = [line.split("│")[2].strip() for line in _lines(buf) if line.count("│") == 3]
    assert "".join(cells) == long
    assert all(cell.endswith("/") for cell in cells[:-1]), cells


def test_three_long_labels_stack_rather_than_lose_a_column():
    p = Prediction("sample_data/images/green_stripes/green_stripes_00.jpg",
                   [{"label": "green_stripes", "probability": 1.0}, {"label": "blue_checks", "probability": 0.0},
                    {"label": "red_discs", "probability": 0.0}])
    buf, _ = _screen(render.predictions_table("tflite", 3, [p], 80))
    lines = _lines(buf)
    assert all(len(line) <= 80 and line.endswith(("┓", "┃", "┩", "│", "┘")) for line in lines[1:])
    assert "red_discs 0.0%" in "\n".join(lines)
    short = Prediction("bees/1.jpg", [{"label": "bees", "probability": 0.9}, {"label": "ants", "probability": 0.1}])
    buf, _ = _screen(render.predictions_table("tf", 2, [short], 80))
    assert "#2" in buf.getvalue(), "short labels stay side by side"
