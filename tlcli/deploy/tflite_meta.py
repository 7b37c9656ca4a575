"""The metadata tlcli writes into a ``.tflite`` and reads back, without TensorFlow for reading.

Two named entries of the TFLite schema's own metadata (TFLite Support's metadata schema would
need the unmaintained tflite-support package): ``labels`` (``labels.txt``'s text, so a file that
travels alone still names its classes) and ``tlcli_bundle`` (the fingerprint of the SavedModel
it was exported from, so that a ``.tflite`` of another bundle with the same labels is refused).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import labels
from tlcli.bundle.schema import read_regular
from tlcli.errors import BundleError

MAX_TFLITE_BYTES = 2 << 30  # the flatbuffer format's own limit
LABELS_METADATA = "labels"  # the .tflite metadata entry with the labels (labels.from_text)
BUNDLE_METADATA = "tlcli_bundle"  # the .tflite metadata entry with the bundle's fingerprint


def check_matches(path: Path, bundle: bundles.Bundle, size: tuple, classes: int, metadata: dict,
                  fmt: str = "tflite") -> None:
    """Refuse an exported file (a .tflite, or another ``fmt`` whose metadata holds the same named
    entries) made for another model than ``bundle``: one line, saying to re-export."""
    fix = f"re-export it with 'tlcli export --format {fmt} --force --model {bundle.path}'"
    if size != (bundle.image_size, bundle.image_size) or classes != len(bundle.labels):
        raise BundleError(f"{path}: made for another model ({size[0]}x{size[1]} input, {classes} classes; "
                          f"the bundle has {bundle.image_size}x{bundle.image_size}, {len(bundle.labels)}); {fix}")
    try:
        embedded = labels.from_text(metadata[LABELS_METADATA]) if LABELS_METADATA in metadata else bundle.labels
    except UnicodeDecodeError:
        embedded = None
    if embedded != bundle.labels:
        raise BundleError(f"{path}: made for another model (its embedded labels differ from the bundle's "
                          f"{len(bundle.labels)} labels in {bundles.META_FILE}); {fix}")
    theirs, mine = metadata.get(BUNDLE_METADATA), bundle.fingerprint()
    if theirs is not None and mine is not None and theirs != mine.encode():
        raise BundleError(f"{path}: made for another model (exported from another bundle's SavedModel, "
                          f"with the same labels); {fix}")



def read_entries(buf: bytes) -> dict[str, bytes]:
    """The named metadata entries of a .tflite flatbuffer, read without TensorFlow."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(buf, 0)
    entries = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        data = model.Buffers(entry.Buffer()).DataAsNumpy()
        entries[entry.Name().decode("utf-8", "replace")] = b"" if isinstance(data, int) else data.tobytes()
    return entries



def labels_in(path: str | os.PathLike) -> list[str] | None:
    """The labels embedded in a .tflite written by ``tlcli export`` (its ``labels`` metadata
    entry), or None when the file has none. Reads the flatbuffer (a regular file) without
    TensorFlow."""
    data = read_entries(read_regular(path, MAX_TFLITE_BYTES)).get(LABELS_METADATA)
    return None if data is None else labels.from_text(data)


def embed(flat: bytes, entries: dict[str, bytes]) -> bytes | None:
    """``flat`` with the named metadata ``entries`` added (replacing any of the same name), or
    None when this TensorFlow lacks the flatbuffer tools. TFLite Support's metadata schema would
    need the unmaintained tflite-support package, so these are plain entries of the TFLite schema."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError:
        return None
    model = flatbuffer_utils.convert_bytearray_to_object(flat)
    if any(m.name == b"buffer_location" for m in model.metadata or []):
        return None  # over-2 GB layout: buffers live outside the flatbuffer
    names = {name.encode() for name in entries}
    model.metadata = [m for m in model.metadata or [] if m.name not in names]
    for name, payload in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(payload, np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def entries_for(b: bundles.Bundle) -> dict[str, bytes]:
    """The entries ``export`` embeds for bundle ``b``: its labels, and its fingerprint if it has one."""
    entries = {LABELS_METADATA: labels.to_text(b.labels).encode("utf-8")}
    fingerprint = b.fingerprint()
    if fingerprint:
        entries[BUNDLE_METADATA] = fingerprint.encode()
    return entries
