"""Backbones: resolve a preset / TF Hub or Kaggle handle / local SavedModel, load, validate."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from tlcli import files
from tlcli._tf import hub, tf
from tlcli.config import FETCH_TIMEOUT_SECONDS, hub_cache_dir
from tlcli.errors import BackboneError
from tlcli.model.presets import PRESETS

REMOTE_PREFIXES = ("http://", "https://", "gs://")  # handles that tensorflow_hub resolves, not local paths


def cache_key(spec: "BackboneSpec", image_size: int) -> str:
    """The cache key of a backbone's features at ``image_size``, as ``train``, ``audit`` and the
    cached LiteRT conversion use it; the feature step adds each view's and engine's suffix."""
    return f"{spec.cache_key()}-{image_size}"


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone comes from. ``image_size`` is None when only the model can tell."""

    handle: str
    image_size: int | None
    preset: str | None = None

    @property
    def is_local(self) -> bool:
        return not self.handle.startswith(REMOTE_PREFIXES)

    def cache_key(self) -> str:
        """Identifies the weights: the handle, or for a local model its path and file times."""
        parts = [self.handle]
        if self.is_local:
            root = Path(self.handle)
            for f in sorted([root / "saved_model.pb", *root.glob("variables/*")]):
                if f.exists():
                    st = f.stat()
                    parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=10).hexdigest()


def resolve_spec(backbone: str, image_size: int | None = None) -> BackboneSpec:
    """Turn ``--backbone`` into a spec. Raises ``BackboneError`` for a value that is none of
    a preset name, an http(s) handle or an existing SavedModel directory."""
    if backbone in PRESETS:
        p = PRESETS[backbone]
        return BackboneSpec(p.handle, image_size or p.image_size, p.name)
    if backbone.startswith(REMOTE_PREFIXES):
        known = next((p for p in PRESETS.values() if p.handle == backbone.rstrip("/")), None)
        return BackboneSpec(backbone, image_size or (known.image_size if known else None),
                            known.name if known else None)
    path = Path(backbone).expanduser()
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise BackboneError(f"--backbone {backbone}: directory has no saved_model.pb; give a TF2 "
                                "SavedModel directory, a preset name or a TF Hub handle")
        return BackboneSpec(str(path.absolute()), image_size)
    raise BackboneError(f"--backbone {backbone}: not a preset ({', '.join(PRESETS)}), an https:// "
                        "TF Hub or Kaggle handle, or an existing SavedModel directory")


def cache_path(handle: str) -> Path:
    """Where tensorflow_hub keeps ``handle``: a folder named by the SHA-1 of the handle."""
    return hub_cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()


def _running_here(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # another machine's (a shared cache): only tensorflow_hub's own rule can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def clear_stale_download(handle: str) -> list[str]:
    """Remove the lock file of a download of ``handle`` left by a process of this machine that no
    longer runs (killed mid-download), and its temporary folder. tensorflow_hub would wait for
    such a lock until its folder had not grown for 10 minutes. A lock of a running process, or of
    another machine, is left alone. Returns what was removed. Raises ``BackboneError`` when the
    lock is not a regular file (tensorflow_hub would block reading it)."""
    module = cache_path(handle)
    lock = Path(f"{module}.lock")
    try:
        fd, _st = files.open_regular(lock)
    except files.NotRegularFile as exc:
        raise BackboneError(f"--backbone {handle}: the TF Hub cache's lock file {lock} is {exc.kind}, not a "
                            "regular file; remove it") from None
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        content = f.read(4096).decode("utf-8", "replace")
    m = re.fullmatch(r"(.+)\.([0-9]+)\.([0-9a-f]{32})", content)  # tensorflow_hub's "host.pid.uid"
    if not m or _running_here(m[1], int(m[2])):
        return []
    removed = []
    tmp = Path(f"{module}.{m[3]}.tmp")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(str(tmp))
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
        removed.append(str(lock))
    return removed


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """tensorflow_hub opens its URLs with no timeout; the process's default socket timeout is the
    one setting it follows (for the connection and each read)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def fetch(spec: BackboneSpec, *, option: str = "--backbone", timeout: float = FETCH_TIMEOUT_SECONDS) -> str:
    """Local path of the backbone, downloading into the TF Hub cache (TFHUB_CACHE_DIR) if needed;
    an error names ``option``, the argument that gave the backbone.
    The download ends (``BackboneError``) when the server sends nothing for ``timeout`` seconds;
    tensorflow_hub then removes its lock and temporary folder, and ``clear_stale_download``
    removes those a killed download left."""
    if spec.is_local:
        return spec.handle
    clear_stale_download(spec.handle)
    try:
        with _socket_timeout(timeout):
            return hub().resolve(spec.handle)
    except Exception as exc:  # urllib, HTTP and tarfile errors all mean "could not fetch"
        cache = os.environ.get("TFHUB_CACHE_DIR") or "the default TF Hub cache"
        why = f"no answer within {timeout:g} s" if _timed_out(exc) else f"{type(exc).__name__}: {str(exc)[:120]}"
        raise BackboneError(
            f"{option} {spec.handle}: could not fetch it ({why}). "
            f"To work offline, {'pass' if option == '--backbone' else 'train with'} a local SavedModel directory "
            f"as --backbone PATH, or point TFHUB_CACHE_DIR at a cache that already holds this model (looked in "
            f"{cache})") from None


@dataclass
class LoadedBackbone:
    layer: object  # hub.KerasLayer
    image_size: int
    feature_dim: int
    path: str


def _concrete_calls(obj):
    """The traced signatures of a loaded SavedModel's ``__call__`` (none for a plain function)."""
    call = getattr(obj, "__call__", None)  # noqa: B004  (the restored function object, not callability)
    return getattr(call, "concrete_functions", None) or []


def _first_input_shape(cf):
    args = cf.structured_input_signature[0]
    return args[0].shape if args and hasattr(args[0], "shape") else None


def _declared_size(obj) -> int | None:
    for cf in _concrete_calls(obj):
        shape = _first_input_shape(cf)
        if shape is not None and shape.rank == 4 and shape[1] and shape[1] == shape[2]:
            return int(shape[1])
    return None


def _declared_input_rank(obj) -> int | None:
    for cf in _concrete_calls(obj):
        shape = _first_input_shape(cf)
        if shape is not None and shape.rank is not None:
            return shape.rank
    return None


def _declared_output_shape(obj):
    """The output shape the SavedModel declares for __call__ (a list, or a dict of them), or None."""
    for cf in _concrete_calls(obj):
        outs = cf.structured_outputs
        if isinstance(outs, dict):
            return {k: v.shape.as_list() if v.shape.rank is not None else None for k, v in outs.items()}
        if hasattr(outs, "shape") and outs.shape.rank is not None:
            return outs.shape.as_list()
    return None


def load(spec: BackboneSpec, *, trainable: bool = False, path: str | None = None,
         io_device: str | None = None) -> LoadedBackbone:
    """Load and validate an image feature vector: input [batch, H, W, 3] float in [0, 1],
    output [batch, features]. ``path`` is what ``fetch(spec)`` returned, when already known.
    ``io_device``: the device that reads the files (a TPU's: ``/job:localhost``, the host
    that holds them, since the TPU workers cannot read local paths). Raises ``BackboneError``
    otherwise."""
    path = path or fetch(spec)
    t = tf()
    try:
        options = t.saved_model.LoadOptions(experimental_io_device=io_device) if io_device else None
        obj = hub().load(path, options=options)
    except Exception as exc:
        if "KeyboardInterrupt" in str(exc):  # Ctrl-C inside the native loader comes back wrapped (pybind11)
            raise KeyboardInterrupt from None
        raise BackboneError(f"--backbone {spec.handle}: cannot load the SavedModel at {path} "
                            f"({type(exc).__name__}: {str(exc)[:160]})") from None
    if not callable(obj):
        raise BackboneError(f"--backbone {spec.handle}: the SavedModel has no __call__; an image feature "
                            "vector in TF2 hub format is needed")
    rank = _declared_input_rank(obj)
    if rank is not None and rank != 4:
        raise BackboneError(f"--backbone {spec.handle}: takes rank-{rank} input, not images "
                            "[batch, height, width, 3]; choose an image feature vector model")
    size = spec.image_size or _declared_size(obj)
    if size is None:
        raise BackboneError(f"--backbone {spec.handle}: declares no input size; set --image-size")
    layer = hub().KerasLayer(obj, trainable=trainable, name="backbone")
    shape = _declared_output_shape(obj)
    if shape is None or (not isinstance(shape, dict) and shape[-1] is None):
        # Nothing declared: run one image through it. (Only valid outside a distribution
        # strategy's scope: restored functions cannot be called eagerly in a cross-replica context.)
        try:
            out = layer(t.zeros([1, size, size, 3], t.float32), training=False)
        except Exception as exc:
            raise BackboneError(f"--backbone {spec.handle}: failed on a [1, {size}, {size}, 3] float image "
                                f"batch ({type(exc).__name__}); choose an image feature vector model") from None
        shape = {k: v.shape for k, v in out.items()} if isinstance(out, dict) else out.shape.as_list()
    if isinstance(shape, dict) or len(shape) != 2:
        raise BackboneError(f"--backbone {spec.handle}: returns {shape}, not a feature vector "
                            "[batch, features]; choose an image feature vector model")
    out_dim = shape[-1]
    return LoadedBackbone(layer=layer, image_size=size, feature_dim=int(out_dim), path=path)
