"""Offline model management: which backbone presets are already in the TF Hub cache, and
fetching one into it ahead of time (for an air-gapped machine, fill the cache, then copy it).

The cache is tensorflow_hub's: ``$TFHUB_CACHE_DIR``, else ``~/.cache/tlcli/tfhub``, with each
model in a folder named by the SHA-1 of its handle. Listing reads that folder only and never
imports TensorFlow.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tlcli.config import FETCH_TIMEOUT_SECONDS, hub_cache_dir
from tlcli.errors import UsageError
from tlcli.model.backbone import REMOTE_PREFIXES, BackboneSpec, cache_path
from tlcli.model.presets import PRESETS
from tlcli.progress import Callback, End, Start, silent


@dataclass(frozen=True)
class ModelStatus:
    """One backbone and its place in the cache: ``path`` is where tensorflow_hub keeps (or would
    keep) it; ``size_bytes`` is its size on disk when ``cached``, else None. ``licence`` and
    ``cpu_ms`` (ms per image through LiteRT on the 2-core development machine, None where not
    measured there): a preset's (``presets.Preset``), else None."""

    name: str | None
    handle: str
    image_size: int | None
    features: int | None
    cached: bool
    path: str
    size_bytes: int | None
    licence: str | None = None
    cpu_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelList:
    cache_dir: str
    models: list[ModelStatus]

    def to_dict(self) -> dict:
        return {"cache_dir": self.cache_dir, "models": [m.to_dict() for m in self.models]}


@dataclass(frozen=True)
class FetchResult:
    """``downloaded`` is False when the model was already in the cache (nothing was fetched)."""

    name: str | None
    handle: str
    path: str
    size_bytes: int
    downloaded: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _disk_size(folder: Path) -> int:
    """The size of the files in ``folder``. Links to folders inside it are not followed: one
    that leads back up (a folder linking to itself) would be walked without end."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:  # a dangling link: it takes no space
                pass
    return total


def status(handle: str, name: str | None = None) -> ModelStatus:
    """Whether ``handle`` is in the cache: its folder holds a ``saved_model.pb``."""
    preset = PRESETS.get(name) if name else next((p for p in PRESETS.values() if p.handle == handle), None)
    path = cache_path(handle)
    cached = (path / "saved_model.pb").is_file()
    return ModelStatus(name=preset.name if preset else name, handle=handle,
                       image_size=preset.image_size if preset else None,
                       features=preset.features if preset else None, cached=cached, path=str(path),
                       size_bytes=_disk_size(path) if cached else None,
                       licence=preset.licence if preset else None, cpu_ms=preset.cpu_ms if preset else None)


def list_models() -> ModelList:
    """Every preset, with whether it is cached and its size on disk."""
    return ModelList(str(hub_cache_dir()), [status(p.handle, p.name) for p in PRESETS.values()])


def _handle(name_or_handle: str) -> tuple[str | None, str]:
    if name_or_handle in PRESETS:
        return name_or_handle, PRESETS[name_or_handle].handle
    if name_or_handle.startswith(REMOTE_PREFIXES):
        return None, name_or_handle
    raise UsageError(f"NAME {name_or_handle}: not a preset ({', '.join(PRESETS)}) or an https:// TF Hub "
                     "or Kaggle handle; 'tlcli models list' shows the presets")


def fetch_model(name_or_handle: str, *, timeout: float = FETCH_TIMEOUT_SECONDS,
                progress: Callback = silent) -> FetchResult:
    """Download a preset (by name) or a TF Hub / Kaggle handle into the TF Hub cache, unless it
    is there already. Raises ``UsageError`` for a name that is neither, and ``BackboneError``
    (the one-line error of ``train``) when it cannot be fetched, e.g. offline, or the server
    sends nothing for ``timeout`` seconds (nothing is left in the cache then)."""
    from tlcli.model.backbone import fetch

    name, handle = _handle(name_or_handle)
    start = time.perf_counter()
    before = status(handle, name)
    if before.cached:
        return FetchResult(before.name, handle, before.path, before.size_bytes or 0, False,
                           time.perf_counter() - start)
    progress(Start("fetch", total=None))  # tensorflow_hub reports no byte counts
    path = fetch(BackboneSpec(handle, None, name), option="NAME", timeout=timeout)
    progress(End("fetch", completed=1, total=1))
    return FetchResult(before.name, handle, path, _disk_size(Path(path)), True, time.perf_counter() - start)
