"""The bundle's metadata schema: tlcli.json and splits.json, checked once by ``bundle.load``.

A bundle may come from anyone, so every value that sizes memory, names a file or reaches a
terminal is checked for type and range before use, and every problem is one ``BundleError``
line naming the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from tlcli import files
from tlcli.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from tlcli.errors import BundleError
from tlcli.labels import label_problem
from tlcli.strict_json import show

MAX_META_BYTES = 64 << 20      # tlcli.json: config, metrics, history, skipped files
MAX_SPLITS_BYTES = 512 << 20   # splits.json: two paths per training image, millions of images
SPLITS_FIX = ("unreadable or corrupt", "delete it and pass --data DIR to export, or retrain")

def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of ``path`` (symlinks followed) if it is a regular file of at most ``limit``
    bytes. A FIFO, socket or device is refused without blocking on it or reading it. Raises
    ``BundleError`` naming the file."""
    path = Path(path)
    try:
        fd, st = files.open_regular(path)
    except files.NotRegularFile as exc:
        raise BundleError(f"{path}: not a regular file ({exc.kind}); the bundle is damaged "
                          "or crafted; retrain it or restore the file") from None
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; the bundle is incomplete; retrain it or restore the file") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            raise BundleError(f"{path}: larger than {limit // (1 << 20)} MiB, far beyond what tlcli writes; "
                              "the bundle is damaged or crafted; retrain it or restore the file")
    return data



def read_json(path: Path, limit: int, problem: str, fix: str):
    """Parse ``path`` (a regular file of at most ``limit`` bytes, UTF-8 JSON). Raises
    ``BundleError``: "<path>: <problem> (<why>); <fix>"."""
    raw = read_regular(path, limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 at byte {exc.start}"
    except (ValueError, RecursionError) as exc:
        why = f"not JSON: {str(exc)[:80]}" if isinstance(exc, ValueError) else "nested too deeply"
    raise BundleError(f"{path}: {problem} ({why}); {fix}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)




def check_labels(labels, where: str) -> list[str]:
    """``labels`` if it is a list of >= 2 distinct labels (see ``label_problem``)."""
    fix = "retrain or restore the file"
    if not isinstance(labels, list):
        raise BundleError(f"{where}: \"labels\" must be a list of class names, not {show(labels)}; {fix}")
    if len(labels) < 2:
        raise BundleError(f"{where}: \"labels\" must hold at least two class names, not {show(labels)}; {fix}")
    for label in labels:
        problem = label_problem(label)
        if problem:
            raise BundleError(f"{where}: \"labels\": {problem}; {fix}")
    if len(set(labels)) != len(labels):
        dup = next(label for i, label in enumerate(labels) if label in labels[:i])
        raise BundleError(f"{where}: \"labels\": {show(dup)} appears twice; {fix}")
    return list(labels)


def _type_ok(value, annotation: str) -> bool:
    """Whether a JSON value fits a dataclass field annotation ("int", "float | None",
    "list[str]", ...; the items of a list or dict are not checked). An annotation with a part
    this does not know (a type added later, a nested dataclass) is not checked."""
    names = [part.strip().split("[")[0] for part in annotation.split("|")]
    if not set(names) <= {"None", "bool", "int", "float", "str", "list", "dict"}:
        return True
    for name in names:
        if name == "None" and value is None:
            return True
        if name == "bool" and isinstance(value, bool):
            return True
        if name == "int" and _is_int(value):
            return True
        if name == "float" and (_is_int(value) or isinstance(value, float)) and math.isfinite(value):
            return True
        if name == "str" and isinstance(value, str) and "\x00" not in value:
            return True
        if name == "list" and isinstance(value, list):
            return True
        if name == "dict" and isinstance(value, dict):
            return True
    return False


def check_fields(obj, cls, where: str, prefix: str = "") -> None:
    """The keys of the JSON object ``obj`` that are fields of the dataclass ``cls`` must have
    their declared types (``_type_ok``); a field whose type is itself a dataclass (``cls._nested``)
    must be an object, checked the same way. Unknown keys are allowed (a newer tlcli may add some).
    Raises ``BundleError`` naming the field as ``"section"."key"``."""
    fix = "retrain or restore the file"
    nested = getattr(cls, "_nested", {})
    for f in dataclasses.fields(cls):
        if f.name not in obj or f.name == "extra":
            continue
        name, value = f'{prefix}"{f.name}"', obj[f.name]
        if f.name in nested:
            if not isinstance(value, dict):
                raise BundleError(f"{where}: {name} must be an object, not {show(value)}; {fix}")
            check_fields(value, nested[f.name], where, f"{name}.")
        elif not _type_ok(value, str(f.type)):
            raise BundleError(f"{where}: {name} must be {f.type}, not {show(value)}; {fix}")


def check_config(config, where: str) -> None:
    """``config`` must be a dict whose known ``TrainConfig`` fields have their declared types,
    with ``max_pixels`` >= 1 and ``image_size`` (when set) in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]. Unknown keys are
    allowed (a newer tlcli may add some)."""
    from tlcli.config import TrainConfig

    fix = "retrain or restore the file"
    if not isinstance(config, dict):
        raise BundleError(f"{where}: \"config\" must be an object, not {show(config)}; {fix}")
    check_fields(config, TrainConfig, where, '"config".')
    pixels = config.get("max_pixels")
    if pixels is not None and not (_is_int(pixels) and pixels >= 1):
        raise BundleError(f"{where}: \"config\".\"max_pixels\" must be an integer >= 1, not {show(pixels)}; {fix}")
    size = config.get("image_size")
    if size is not None and not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise BundleError(f"{where}: \"config\".\"image_size\" must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
                          f"not {show(size)}; {fix}")


def check_meta(meta, path: Path, meta_cls=None) -> tuple[list[str], int]:
    """Validate parsed tlcli.json; returns (labels, image_size). With ``meta_cls`` (the dataclass
    of the schema, ``bundle.BundleMeta``), every known field is also checked (``check_fields``).
    Raises ``BundleError``."""
    where = f"{path}: corrupt bundle metadata"
    fix = "retrain or restore the file"
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: must be a JSON object, not {show(meta)}; {fix}")
    version = meta.get("format_version", 0)
    if not (_is_int(version) and version >= 0):
        raise BundleError(f"{where}: \"format_version\" must be an integer >= 0, not {show(version)}; {fix}")
    for key in ("labels", "image_size"):
        if key not in meta:
            raise BundleError(f"{where}: \"{key}\" is missing; {fix}")
    labels = check_labels(meta["labels"], where)
    size = meta["image_size"]
    if not (_is_int(size) and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE):
        raise BundleError(f"{where}: \"image_size\" must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
                          f"not {show(size)}; {fix}")
    if "config" in meta:
        check_config(meta["config"], where)
    exports = meta.get("exports", {})
    if not (isinstance(exports, dict) and all(isinstance(v, dict) for v in exports.values())):
        raise BundleError(f"{where}: \"exports\" must be an object of objects, not {show(exports)}; {fix}")
    if meta.get("unknown") is not None:
        check_unknown(meta["unknown"], where)
    if meta_cls is not None:
        check_fields(meta, meta_cls, where)
    _check_task(meta, len(labels), where)
    return labels, size


def check_unknown(unknown, where: str) -> None:
    """tlcli.json's ``unknown``: an object whose ``threshold`` is a finite number (the score above
    which a photo is called unknown) and whose ``target_rate``, when given, is in [0, 1]."""
    fix = "retrain or restore the file"
    threshold = unknown.get("threshold") if isinstance(unknown, dict) else None
    if not _type_ok(threshold, "float"):  # a finite number, not a bool
        raise BundleError(f"{where}: \"unknown\" must be an object with a finite number \"threshold\", not "
                          f"{show(unknown)}; {fix}")
    rate = unknown.get("target_rate", 0.0)
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate <= 1.0):
        raise BundleError(f"{where}: \"unknown\".\"target_rate\" must be a number in [0, 1], not {show(rate)}; {fix}")


def _check_task(meta: dict, num_labels: int, where: str) -> None:
    """``task`` is absent, "single_label" or "multi_label"; a multi-label bundle has one
    threshold in [0, 1] per label, and a single-label one none."""
    fix = "retrain or restore the file"
    task, thresholds = meta.get("task"), meta.get("thresholds")
    if task not in (None, "single_label", "multi_label"):
        raise BundleError(f"{where}: \"task\" must be \"single_label\" or \"multi_label\", not {show(task)}; {fix}")
    if task != "multi_label":
        if thresholds is not None:
            raise BundleError(f"{where}: \"thresholds\" is set but \"task\" is not \"multi_label\"; {fix}")
        return
    if not (isinstance(thresholds, list) and len(thresholds) == num_labels
            and all(_type_ok(t, "float") and 0.0 <= t <= 1.0 for t in thresholds)):
        raise BundleError(f"{where}: \"thresholds\" must be {num_labels} numbers in [0, 1] (one per label), not "
                          f"{show(thresholds)}; {fix}")


def check_splits(splits, num_labels: int, path: Path) -> dict:
    """Validate parsed splits.json: {"train": [[path, label], ...], "val": [...]} with string
    paths and integer labels in [0, num_labels). Returns {"train": [...], "val": [...]}."""
    problem, fix = SPLITS_FIX
    if not isinstance(splits, dict):
        raise BundleError(f"{path}: {problem} (must be a JSON object, not {show(splits)}); {fix}")
    out = {}
    for key in ("train", "val"):
        entries = splits.get(key, [])
        if not isinstance(entries, list):
            raise BundleError(f"{path}: {problem} (\"{key}\" must be a list, not {show(entries)}); {fix}")
        for i, entry in enumerate(entries):
            ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
                  and "\x00" not in entry[0] and _is_int(entry[1]) and 0 <= entry[1] < num_labels)
            if not ok:
                raise BundleError(f"{path}: {problem} (\"{key}\"[{i}] must be [path, label index in "
                                  f"0..{num_labels - 1}], not {show(entry)}); {fix}")
        out[key] = entries
    return out
