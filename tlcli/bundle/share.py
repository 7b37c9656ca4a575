"""A copy of a bundle to give to others, without the trainer's folders (``tlcli share``).

A bundle records where it was trained: ``tlcli.json`` holds the absolute image folders
(``data.train_dir``, ``config.data_dir``), ``--out``, ``--cache-dir``, the TensorBoard folder, a
local backbone's path and where exports were written, and ``splits.json`` every image's
absolute path; a TensorBoard log inside the bundle names the host in its file names. The shared
copy keeps the model and everything ``predict``, ``evaluate``, ``serve`` and ``export`` read, and:

- ``splits.json`` lists each image relative to its folder (training images to ``DIR``, validation
  images to ``--val-dir`` when there was one): ``tlcli export --data DIR`` on a machine with the
  same images measures parity and calibrates on the recorded splits, under ``DIR``;
- ``tlcli.json`` has no absolute path: the folders are null (or empty), a local backbone is its folder's
  name, exports and a ``--labels-override`` review are named by file, and any other mention of those
  folders (or of the home folder) is replaced by ``DIR``, ``VAL_DIR``, ``OUT``, ``CACHE_DIR``, ``MODEL``
  or ``~``. It stays format ``FORMAT_VERSION`` with the same keys and types: this and the previous
  tlcli read it;
- TensorBoard logs and files tlcli did not write are left out (``ShareResult.left_out``).
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tlcli.bundle.format import META_FILE, SPLITS_FILE, load, splits_text
from tlcli.bundle.place import (
    _ATOMIC_TMP,
    _BUNDLE_FILES,
    _EXPORT_SUFFIXES,
    _OPENVINO,
    _VARIABLES,
    OPENVINO_DIR,
    check_output,
    commit,
    lock,
    staging_dir,
)
from tlcli.errors import UsageError
from tlcli.files import real_path, write_file, write_json

_PRIVATE_CONFIG = ("data_dir", "val_dir", "out", "cache_dir", "labels_override")  # TrainConfig's paths


@dataclass
class ShareResult:
    """``path``: the shared copy; ``files``: files copied besides the two rewritten; ``images``:
    splits.json's entries, now relative to their folder; ``left_out``: what was not copied."""

    path: str
    files: int
    images: int
    left_out: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def share(model_dir: str | os.PathLike, *, out: str | os.PathLike, force: bool = False) -> ShareResult:
    """Write a copy of the bundle ``model_dir`` to ``out`` without the trainer's folders (see the
    module docstring), atomically; an existing ``out`` is replaced only with ``force`` and only if
    it is a bundle. Raises ``BundleError`` for a bad bundle, ``UsageError`` / ``TlcliError`` for
    an ``out`` that cannot be written (the bundle itself, or a folder inside it, included)."""
    b = load(model_dir)
    out = check_output(out, force=force)
    real, mine = real_path(out), real_path(b.path)
    if real == mine or mine in real.parents or real in mine.parents:
        raise UsageError(f"--out {out}: {'is' if real == mine else 'overlaps'} the bundle --model {b.path}; "
                         "choose another --out, outside it")
    raw = b.meta.to_dict()
    tensorboard = raw.get("training", {}).get("tensorboard")
    logs = Path(tensorboard).parts[0] if tensorboard and not os.path.isabs(tensorboard) else None
    with lock(out):
        staging, done = staging_dir(out), False
        try:
            files, left_out = _copy(b.path, staging, logs)
            write_json(staging / META_FILE, shareable_meta(raw, b.path))
            images = 0
            if b.recorded_splits is not None:
                splits = shareable_splits(b.splits(), raw.get("data", {}))
                images = len(splits["train"]) + len(splits["val"])
                write_file(staging / SPLITS_FILE, splits_text(splits).encode("ascii"))
            path = commit(staging, out, force=force)
            done = True
        finally:
            if not done:
                shutil.rmtree(staging, ignore_errors=True)
    return ShareResult(str(path), files, images, left_out)


def _copy(src: Path, dst: Path, logs: str | None) -> tuple[int, list[str]]:
    """Copy the bundle's own files (see ``place.foreign_entries``) but tlcli.json, splits.json and
    the TensorBoard folder ``logs``; returns (files copied, names of what was left out)."""
    copied, left_out = 0, []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name in (META_FILE, SPLITS_FILE):
            continue
        if entry.is_symlink() or _ATOMIC_TMP.fullmatch(name):
            left_out.append(name)
        elif entry.is_file() and (name in _BUNDLE_FILES or name.endswith(_EXPORT_SUFFIXES)):
            shutil.copyfile(entry, dst / name)
            copied += 1
        elif entry.is_dir() and name in ("variables", "assets", OPENVINO_DIR) and name != logs:
            allowed = {"variables": _VARIABLES.fullmatch, OPENVINO_DIR: _OPENVINO.fullmatch}.get(name, lambda n: True)
            for root, _, names in os.walk(entry):
                for n in names:
                    p = Path(root) / n
                    if p.is_symlink() or not p.is_file() or not allowed(n):
                        left_out.append(str(p.relative_to(src)))
                        continue
                    target = dst / p.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)
                    copied += 1
        else:
            left_out.append(name + ("/ (TensorBoard log)" if name == logs else "/" if entry.is_dir() else ""))
    return copied, left_out


def shareable_splits(splits: dict, data: dict) -> dict:
    """``splits`` ({"train": [[path, label], ...], "val": [...]}) with each path relative to its
    folder in ``data`` (tlcli.json's ``data``): train_dir, or val_dir for validation images when
    the run had one. A relative path (a shared bundle's) is kept; an absolute one outside its
    folder is left out."""
    roots = {"train": data.get("train_dir"), "val": data.get("val_dir") or data.get("train_dir")}
    out = {}
    for key in ("train", "val"):
        root = roots[key]
        out[key] = [[path if not os.path.isabs(path) else _under(path, root), label]
                    for path, label in splits.get(key, [])
                    if not os.path.isabs(path) or (root and _under(path, root))]
    return out


def _under(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` ("/"-separated), or None when it is not inside ``root``."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    return None if rel == os.curdir or rel.startswith(os.pardir) else Path(rel).as_posix()


def shareable_meta(meta: dict, bundle_path: Path) -> dict:
    """tlcli.json's ``meta`` (``BundleMeta.to_dict()``) without absolute paths (see the module
    docstring), same keys and types."""
    meta = copy.deepcopy(meta)
    config, data = meta.get("config") or {}, meta.get("data") or {}
    labels = [(data.get("val_dir") or config.get("val_dir"), "VAL_DIR"),
              (data.get("train_dir") or config.get("data_dir"), "DIR"), (config.get("out"), "OUT"),
              (config.get("cache_dir"), "CACHE_DIR"), (str(Path(bundle_path).absolute()), "MODEL")]
    try:
        labels.append((str(Path.home()), "~"))
    except (RuntimeError, KeyError):
        pass
    roots = sorted(((os.path.normpath(r), name) for r, name in labels
                    if isinstance(r, str) and os.path.isabs(r) and os.path.normpath(r) != os.sep),
                   key=lambda pair: -len(pair[0]))
    for key in _PRIVATE_CONFIG:  # TrainConfig's types: data_dir and out are strings, the others may be null
        if config.get(key) is not None:
            config[key] = "" if key in ("data_dir", "out") else None
    if isinstance(config.get("tensorboard"), str) and os.path.isabs(config["tensorboard"]):
        config["tensorboard"] = None
    for holder in (meta.get("backbone") or {}, config):
        key = "handle" if holder is not config else "backbone"
        if isinstance(holder.get(key), str) and os.path.isabs(holder[key]):
            holder[key] = Path(holder[key]).name
    for key in ("train_dir", "val_dir"):
        if key in data:
            data[key] = None
    override = meta.get("labels_override")
    if isinstance(override, dict) and isinstance(override.get("file"), str):
        override["file"] = Path(override["file"]).name  # the digest still says which review it was
    training = meta.get("training") or {}
    if isinstance(training.get("tensorboard"), str):
        training["tensorboard"] = None  # absolute: elsewhere; relative: the log, left out of the copy
    meta["exports"] = {Path(name).name: _shareable_export(entry) for name, entry in (meta.get("exports") or {}).items()
                       if not os.path.isabs(name)}
    return _replaced(meta, roots)


def _shareable_export(entry: dict) -> dict:
    entry = dict(entry)
    for key in ("path", "labels_path"):
        if isinstance(entry.get(key), str):
            entry[key] = Path(entry[key]).name
    if isinstance(entry.get("parity_data"), str) and entry["parity_data"].startswith("images in "):
        entry["parity_data"] = "images in the folder given with --data"
    return entry


def _replaced(value, roots: list[tuple[str, str]]):
    """``value`` with each mention of a folder in ``roots`` (longest first) replaced by its name,
    in every string at every level (the skipped files' paths, what a newer tlcli added)."""
    if isinstance(value, dict):
        return {k: _replaced(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, roots) for v in value]
    if isinstance(value, str):
        for root, name in roots:
            value = value.replace(root + os.sep, name + "/").replace(root, name)
        return value
    return value
