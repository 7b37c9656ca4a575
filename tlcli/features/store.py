"""The feature store: feature vectors kept in sharded arrays, found by the content digest of
their image.

Layout of one store folder (one per backbone key, image size and view; ``model_store``
names it)::

    <folder>/<name>.f32    the vectors of one shard: raw little-endian float32, [rows, dim], C order
    <folder>/<name>.json   its sidecar: {"format": 1, "rows", "dim", "dtype": "<f4",
                           "digests": [row i's image digest, ...], "crc32": of the .f32 bytes,
                           "digests_crc32": of the digests joined by newlines}

A shard is written once and never changed: each writer buffers its new vectors and, every
``CHUNK_ROWS`` vectors (and when it is flushed or closed), writes one new shard under a name no
other process uses (time, host, process id, random), the ``.f32`` first and the sidecar last,
each atomically (``files.write_atomic``). A shard without its sidecar is not read, so concurrent
runs and worker processes never see a half-written shard and share no lock at all. A crash loses
at most the vectors still buffered (they are extracted again next time).

Reading lists the sidecars once, builds digest -> (shard, row), and memory-maps each ``.f32``
(no entry is read one file at a time). A shard is verified the first time one of its rows is
read: the sizes, the dtype, both checksums. A shard that fails is dropped as a whole (what it
held reads as missing, so it is recomputed into a new shard) and removed, and each vector handed
out is checked again (``valid``), so a damaged store never gives wrong features silently.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import socket
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

from tlcli import files
from tlcli.config import default_cache_dir
from tlcli.errors import TlcliError

FORMAT = 1
CHUNK_ROWS = 4096          # vectors per shard written by a long extraction (16-20 MB at 1,280-d)
FLUSH_SECONDS = 60.0       # and at least this often, so a killed run loses at most a minute's work
MAX_FEATURE = 1e6          # a vector with a larger component is damaged (no backbone's come near it)
_MAX_SIDECAR_BYTES = 256 << 20
DECODER_VERSION = 2  # bump whenever decoding or preprocessing changes: a new store folder
# A view larger than this is read from the feature store's mapped shards instead of held in RAM
# (100,000 vectors of 1,280 floats; hymenoptera's are 2 MB).
VIEWS_IN_MEMORY_BYTES = 512 << 20


def valid(vec, dim: int | None) -> bool:
    """Whether ``vec`` is a usable feature vector: a 1-D float32 numpy array (of length ``dim``
    when given), finite, every component at most ``MAX_FEATURE`` in magnitude."""
    return (isinstance(vec, np.ndarray) and vec.ndim == 1 and vec.dtype == np.float32 and vec.size > 0
            and (dim is None or vec.shape[0] == dim) and bool(np.isfinite(vec).all())
            and float(np.abs(vec).max()) <= MAX_FEATURE)


def _crc(data) -> int:
    return zlib.crc32(memoryview(data).cast("B")) & 0xFFFFFFFF


class _Shard:
    """One shard as listed: its sidecar's digests, the vectors mapped on first use."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.rows, self.dim = int(meta["rows"]), int(meta["dim"])
        self._array, self.ok = None, None   # ok: None until verified

    def array(self) -> np.ndarray | None:
        """The [rows, dim] float32 memmap, verified (sizes, checksum) on first use; None if damaged."""
        if self.ok is None:
            self.ok = self._verify()
        return self._array if self.ok else None

    def _verify(self) -> bool:
        try:
            fd, st = files.open_regular(self.path.with_suffix(".f32"))
        except OSError:
            return False
        try:
            with os.fdopen(fd, "rb") as f:
                fd = None
                if st.st_size != self.rows * self.dim * 4 or self.rows == 0:
                    return False
                # A copy-on-read mapping: the pages are the file's (not anonymous memory).
                array = np.memmap(f, dtype="<f4", mode="r", shape=(self.rows, self.dim))
        except (OSError, ValueError):
            return False
        finally:
            if fd is not None:
                os.close(fd)
        if _crc(array) != self.meta["crc32"]:
            return False
        self._array = array
        return True


    def remove(self) -> None:
        """Delete both files of a damaged shard (best effort), so it is not verified again."""
        for suffix in (".json", ".f32"):
            try:
                self.path.with_suffix(suffix).unlink()
            except OSError:
                pass


def _read_sidecar(path: Path) -> dict | None:
    """A shard's sidecar, or None when it is not one (damaged, cut short, foreign, planted)."""
    try:
        fd, st = files.open_regular(path)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if st.st_size > _MAX_SIDECAR_BYTES:
            return None
        try:
            meta = json.loads(f.read())
            digests = meta["digests"]
            ok = (meta["format"] == FORMAT and meta["dtype"] == "<f4" and isinstance(digests, list)
                  and len(digests) == int(meta["rows"]) and int(meta["dim"]) > 0
                  and _crc("\n".join(digests).encode()) == meta["digests_crc32"])  # join: str only
        except Exception:  # not JSON, missing or mistyped fields
            return None
    return meta if ok else None


class _ShardIndex:
    """Where each digest's vector lies over the shards of one folder: the shards in name order
    (a later shard's entry wins), shard i holding rows ``starts[i]`` .. of all shards, and
    digest -> row number. Loaded on first use; a shard that fails verification is forgotten."""

    def __init__(self, folder: Path, dim: int | None):
        self.dir, self.dim = folder, dim
        self.shards: list[_Shard] | None = None
        self.starts: list[int] = []
        self.rows: dict[str, int] = {}

    def load(self) -> None:
        if self.shards is None:
            self.shards = []
            for shard in _list_shards(self.dir):
                self.add(shard)

    def add(self, shard: _Shard) -> None:
        start = self.starts[-1] + self.shards[-1].rows if self.shards else 0
        self.shards.append(shard)
        self.starts.append(start)
        self.rows.update(zip(shard.meta["digests"], range(start, start + shard.rows)))  # no Python loop

    def locate(self, digest: str) -> tuple[np.ndarray, int] | None:
        self.load()
        row = self.rows.get(digest)
        if row is None:
            return None
        i = bisect.bisect_right(self.starts, row) - 1
        return (self.shards[i].array(), row - self.starts[i]) if self.usable(self.shards[i]) else None

    def usable(self, shard: _Shard) -> bool:
        """Whether ``shard`` verifies and holds vectors of this store's ``dim``. If not, it is
        forgotten, and a damaged one removed so it is not verified again; its vectors read as
        missing and are recomputed."""
        if shard.array() is not None and (self.dim is None or shard.dim == self.dim):
            return True
        start = self.starts[self.shards.index(shard)]
        for digest in shard.meta["digests"]:
            row = self.rows.get(digest)
            if row is not None and start <= row < start + shard.rows:
                del self.rows[digest]
        if shard.ok is False:
            shard.remove()
        return False


class FeatureStore:
    """The vectors of one store folder (see the module docstring), read and appended to.

    ``get`` returns a valid vector (``valid``, of length ``dim`` when set) or None; ``put``
    buffers one, ``flush`` writes what is buffered. Writing never raises: the store is an
    optimisation, and a read-only or full disk must not stop training (what could not be written
    is extracted again next time). ``rows`` and ``gather`` give many vectors at once."""

    def __init__(self, folder: str | os.PathLike, *, dim: int | None = None):
        self.dir = Path(folder)
        self.dim = dim
        self._index = _ShardIndex(self.dir, dim)
        self._pending: dict[str, np.ndarray] = {}
        self._since = time.monotonic()

    def get(self, digest: str) -> np.ndarray | None:
        """The stored vector of ``digest`` (float32; a read-only row of its mapped shard, so
        holding many costs no anonymous memory), or None when missing or invalid."""
        vec = self._pending.get(digest)
        if vec is None:
            found = self._index.locate(digest)
            vec = None if found is None else found[0][found[1]].view(np.ndarray)
        return vec if valid(vec, self.dim) else None

    def rows(self, digests) -> StoredRows:
        """The stored vectors of ``digests`` as a ``StoredRows`` [n, dim] read lazily from the
        shards. Raises KeyError naming the first digest that is missing (or in a damaged shard)."""
        self.flush()
        index = self._index
        index.load()
        digests = list(digests)
        try:  # itemgetter: the lookups in C (a million digests in well under a second)
            found = operator.itemgetter(*digests)(index.rows) if digests else ()
        except KeyError as exc:
            raise KeyError(exc.args[0]) from None
        refs = _refs(index.starts, np.array(found if len(digests) != 1 else (found,), np.int64))
        for i in np.unique(refs[:, 0]).tolist():  # verify each shard used, once
            if not index.usable(index.shards[i]):
                raise KeyError(next(d for d, r in zip(digests, refs[:, 0].tolist()) if r == i))
        dim = self.dim or (index.shards[refs[0, 0]].dim if len(refs) else 0)
        return StoredRows([s._array for s in index.shards], refs, dim)

    def put(self, digest: str, vec: np.ndarray) -> None:
        """Buffer ``vec`` (1-D, float32) as the vector of ``digest``; see the class docstring."""
        self._pending[digest] = np.asarray(vec, np.float32).copy()
        if len(self._pending) >= CHUNK_ROWS or time.monotonic() - self._since > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered vectors as one new shard (nothing when none is buffered)."""
        self._since = time.monotonic()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        shard = _write_shard(self.dir, pending)
        if shard is not None and self._index.shards is not None:
            self._index.add(shard)

    def gather(self, samples, found: list) -> np.ndarray | StoredRows:
        """The features [n, d] of ``samples`` once every one is stored, ``found[i]`` the vector
        of ``samples[i]`` (stored under its digest): one float32 array in memory when that is at
        most ``VIEWS_IN_MEMORY_BYTES``, else the store's rows of their digests (mapped from the
        shards, not loaded). In memory too when some could not be written, if the extraction kept
        them (``in_memory``); else one TlcliError line."""
        if not self.in_memory(len(found)):
            try:
                return self.rows([s.digest for s in samples])
            except KeyError:  # not written (a full or read-only disk)
                if any(f is None for f in found):  # fresh vectors were not kept (``in_memory``)
                    raise TlcliError(f"{self.dir}: the feature store could not be written (disk full or read-only?) "
                                     f"and the features of {len(found)} images are too many to hold in memory "
                                     "instead; free space there, or give --cache-dir on a writable disk") from None
        return np.stack(found).astype(np.float32)

    def in_memory(self, n: int) -> bool:
        """Whether the features of ``n`` images are gathered in memory (at most
        ``VIEWS_IN_MEMORY_BYTES``); beyond that an extraction keeps no fresh vector, only the
        store does, so its memory does not grow with ``n``."""
        return n * (self.dim or 0) * 4 <= VIEWS_IN_MEMORY_BYTES


def model_store(root: str | os.PathLike | None, model_key: str, *, dim: int | None = None) -> FeatureStore:
    """The store of one model key (a backbone, image size and view): ``root/store/<model
    key>-d<DECODER_VERSION>/`` (``root`` None: the default cache folder). The per-image ``.npy``
    files of earlier versions (``root/features/``) are not read: they are left for the user to
    delete."""
    return FeatureStore(Path(root or default_cache_dir()) / "store" / f"{model_key}-d{DECODER_VERSION}", dim=dim)


class NoStore:
    """For features that must not be stored (a backbone being fine-tuned)."""

    dim = None

    def get(self, digest: str):
        return None

    def put(self, digest: str, vec) -> None:
        pass

    def flush(self) -> None:
        pass

    def gather(self, samples, found: list) -> np.ndarray:
        return np.stack(found).astype(np.float32)

    def in_memory(self, n: int) -> bool:
        return True  # nowhere else to keep them


def _list_shards(folder: Path) -> list[_Shard]:
    """The shards of ``folder`` whose sidecar reads as one, in name order."""
    try:
        names = sorted(p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except OSError:
        return []
    return [_Shard(path, meta) for path in names if (meta := _read_sidecar(path)) is not None]


def _write_shard(folder: Path, pending: dict[str, np.ndarray]) -> _Shard | None:
    """Write ``pending`` (digest -> vector) as a new shard of ``folder``, its .f32 first and its
    sidecar last, each atomically, under a name no other process uses. Returns the shard (mapped
    from its file when read), or None when it could not be written: the store is an optimisation, and
    these vectors are extracted again next time."""
    digests = list(pending)
    array = np.ascontiguousarray(np.stack([pending[d] for d in digests]), dtype="<f4")
    name = f"{time.time_ns():020d}-{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = folder / f"{name}.json"
    meta = {"format": FORMAT, "rows": len(digests), "dim": int(array.shape[1]), "dtype": "<f4",
            "crc32": _crc(array), "digests_crc32": _crc("\n".join(digests).encode()), "digests": digests}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path.with_suffix(".f32"), array.tobytes())
        files.write_atomic(path, json.dumps(meta).encode())  # last: the shard now exists
    except OSError:
        return None
    return _Shard(path, meta)  # mapped from its file when read (not kept: a long run's would fill RAM)


def _refs(starts: list[int], numbers: np.ndarray) -> np.ndarray:
    """(shard, row in it) [n, 2] of row numbers over all shards, shard i starting at starts[i]."""
    if not len(numbers):
        return np.zeros((0, 2), np.int64)
    starts = np.array(starts, np.int64)
    shard_of = np.searchsorted(starts, numbers, side="right") - 1
    return np.stack([shard_of, numbers - starts[shard_of]], axis=1)


class StoredRows:
    """Rows of several memory-mapped shards, seen as one read-only float32 matrix [n, dim]
    without loading it: ``refs`` [n, 2] holds (shard, row) for each row. ``X[index]`` (an integer
    array, or a slice) gathers those rows into a new array; ``chunks(size)`` yields consecutive
    blocks of at most ``size`` rows, so memory stays bounded by the block; ``take`` and
    ``stacked`` make other StoredRows without reading anything. ``np.asarray(X)`` loads it all
    (for code that needs an array). ``head.fit_head`` accepts it as X."""

    ndim = 2

    def __init__(self, arrays: list, refs: np.ndarray, dim: int):
        self.arrays, self.refs = arrays, refs
        self.shape = (len(refs), dim)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or self.dtype, copy=False)

    def take(self, index) -> StoredRows:
        """The rows ``index`` (integer array or slice), still unread."""
        return StoredRows(self.arrays, self.refs[index], self.shape[1])

    def stacked(self, other: StoredRows) -> StoredRows:
        """These rows followed by ``other``'s (of the same width), still unread."""
        refs = other.refs + np.array([len(self.arrays), 0])
        return StoredRows(self.arrays + other.arrays, np.concatenate([self.refs, refs]), self.shape[1])

    def __getitem__(self, index) -> np.ndarray:
        refs = self.refs[index]
        out = np.empty((len(refs), self.shape[1]), np.float32)
        for s in np.unique(refs[:, 0]):
            mine = refs[:, 0] == s
            out[mine] = self.arrays[s][refs[mine, 1]]
        return out

    def chunks(self, size: int):
        """Consecutive blocks of at most ``size`` rows, in order. A run of at least ``size // 4``
        rows that are consecutive in one shard comes as that shard's own mapped rows (no copy);
        shorter runs are gathered into copied blocks."""
        refs = self.refs
        ends = np.r_[np.flatnonzero((refs[1:, 0] != refs[:-1, 0]) | (refs[1:, 1] != refs[:-1, 1] + 1)) + 1,
                     len(refs)].tolist() if len(refs) else []
        start, pending = 0, 0  # pending: rows start - pending .. start wait to be gathered
        for end in ends:
            if end - start >= max(1, size // 4):
                yield from self._gathered(start - pending, start, size)
                shard, first = int(refs[start, 0]), int(refs[start, 1])
                for i in range(start, end, size):
                    yield self.arrays[shard][first + i - start:first + min(end, i + size) - start]
                pending = 0
            else:
                pending += end - start
            start = end
        yield from self._gathered(start - pending, start, size)

    def _gathered(self, start: int, stop: int, size: int):
        for i in range(start, stop, size):
            yield self[i:min(stop, i + size)]
