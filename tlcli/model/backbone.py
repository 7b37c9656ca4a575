"""Backbones: resolve a preset / TF Hub or Kaggle handle / local SavedModel, load, validate."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from tlcli import files
from tlcli._tf import hub, keras, tf
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
    # A SavedModel without ``__call__`` (a Keras 3 export) runs one of its signatures and takes
    # one of its outputs: None finds them (``load``), a name is ``--backbone-signature`` /
    # ``--backbone-output``.
    signature: str | None = None
    output_key: str | None = None
    # Backbones whose features are concatenated (``concatenation``); empty for one backbone.
    parts: tuple["BackboneSpec", ...] = ()

    @property
    def is_local(self) -> bool:
        return not self.handle.startswith(REMOTE_PREFIXES)

    def cache_key(self) -> str:
        """Identifies the weights: the handle, or for a local model its path and file times;
        a concatenation's, its parts' keys in order."""
        if self.parts:
            return hashlib.blake2b("|".join(["concat", *(p.cache_key() for p in self.parts)]).encode(),
                                   digest_size=10).hexdigest()
        parts = [self.handle]
        # Only when given: the keys of every callable backbone stay what they were.
        parts += [f"{k}={v}" for k, v in (("signature", self.signature), ("output", self.output_key)) if v]
        if self.is_local:
            root = Path(self.handle)
            for f in sorted([root / "saved_model.pb", *root.glob("variables/*")]):
                if f.exists():
                    st = f.stat()
                    parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=10).hexdigest()


def resolve_spec(backbone: str, image_size: int | None = None, *, signature: str | None = None,
                 output_key: str | None = None) -> BackboneSpec:
    """Turn ``--backbone`` into a spec (``signature``, ``output_key``: ``--backbone-signature``,
    ``--backbone-output``). Raises ``BackboneError`` for a value that is none of a preset name,
    an http(s) handle or an existing SavedModel directory."""
    spec = _resolved(backbone, image_size)
    return dataclasses.replace(spec, signature=signature or None, output_key=output_key or None)


def _resolved(backbone: str, image_size: int | None) -> BackboneSpec:
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


def concatenation(parts: list[BackboneSpec], image_size: int) -> BackboneSpec:
    """The spec of a backbone that runs every one of ``parts`` on the same ``image_size`` input
    and concatenates their features, in that order (frozen only)."""
    return BackboneSpec(" + ".join(p.preset or p.handle for p in parts), image_size,
                        parts=tuple(dataclasses.replace(p, image_size=image_size) for p in parts))


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
    if spec.parts:  # every part is fetched; the first one's path stands for them
        return [fetch(p, option=option, timeout=timeout) for p in spec.parts][0]
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
    # The signature and output it runs (a SavedModel without __call__, or one given them), else None.
    signature: str | None = None
    output_key: str | None = None
    # Whether it takes images of any height and width (every declared input [batch, None, None, 3]),
    # so fine-tuning may train it below ``image_size`` (``training.plan.training_sizes``).
    any_size: bool = False


def _concrete_calls(obj):
    """The traced signatures of a loaded SavedModel's ``__call__`` (none for a plain function)."""
    call = getattr(obj, "__call__", None)  # noqa: B004  (the restored function object, not callability)
    return getattr(call, "concrete_functions", None) or []


def _first_input_shape(cf):
    args = cf.structured_input_signature[0]
    return args[0].shape if args and hasattr(args[0], "shape") else None


def _declared_size(shapes) -> int | None:
    for shape in shapes:
        if shape is not None and shape.rank == 4 and shape[1] and shape[1] == shape[2]:
            return int(shape[1])
    return None


def _any_size(shapes) -> bool:
    """Whether every declared input shape leaves height and width open (none declared: not known)."""
    known = [s for s in shapes if s is not None and s.rank is not None]
    return bool(known) and all(s.rank == 4 and s[1] is None and s[2] is None for s in known)


def _declared_input_rank(shapes) -> int | None:
    for shape in shapes:
        if shape is not None and shape.rank is not None:
            return shape.rank
    return None


def _output_shape(outs, output_key: str | None):
    """A declared output (a tensor spec, or a dict of them) as a list, a dict of lists, or None;
    ``output_key`` picks one of a dict's."""
    if isinstance(outs, dict) and output_key in outs:
        outs = outs[output_key]
    if isinstance(outs, dict):
        return {k: v.shape.as_list() if v.shape.rank is not None else None for k, v in outs.items()}
    if hasattr(outs, "shape") and outs.shape.rank is not None:
        return outs.shape.as_list()
    return None


def _declared_output_shape(obj, output_key: str | None = None):
    """The output shape the SavedModel declares for __call__ (a list, or a dict of them), or None."""
    for cf in _concrete_calls(obj):
        shape = _output_shape(cf.structured_outputs, output_key)
        if shape is not None:
            return shape
    return None


def _listed(names) -> str:
    return ", ".join(sorted(names)) or "none"


def pick_signature(obj, spec: BackboneSpec) -> tuple[str, str, object]:
    """(signature name, output key, its concrete function) of a SavedModel run through a
    signature: ``spec``'s when given, else its only signature or ``serving_default``, and the
    signature's only output. Raises ``BackboneError``, one line naming ``--backbone-signature``
    or ``--backbone-output``, when it cannot tell or what was given is not there."""
    signatures = dict(getattr(obj, "signatures", None) or {})
    h = spec.handle
    if not signatures:
        raise BackboneError(f"--backbone {h}: the SavedModel has neither __call__ nor a signature; an image "
                            "feature vector model is needed")
    if spec.signature:
        if spec.signature not in signatures:
            raise BackboneError(f"--backbone-signature {spec.signature}: {h} has no such signature (it has "
                                f"{_listed(signatures)})")
        name = spec.signature
    elif len(signatures) == 1 or "serving_default" in signatures:
        name = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    else:
        raise BackboneError(f"--backbone {h}: has signatures {_listed(signatures)} and none is serving_default; "
                            "choose one with --backbone-signature")
    fn = signatures[name]
    args, kwargs = fn.structured_input_signature
    if len(args) + len(kwargs) != 1:
        raise BackboneError(f"--backbone-signature {name}: takes {len(args) + len(kwargs)} inputs "
                            f"({_listed(kwargs)}), not one image batch; choose another signature")
    outputs = fn.structured_outputs if isinstance(fn.structured_outputs, dict) else {}
    if spec.output_key:
        if spec.output_key not in outputs:
            raise BackboneError(f"--backbone-output {spec.output_key}: signature {name} of {h} has no such output "
                                f"(it has {_listed(outputs)})")
        return name, spec.output_key, fn
    if len(outputs) != 1:
        raise BackboneError(f"--backbone {h}: signature {name} has outputs {_listed(outputs)}; choose the feature "
                            "vector with --backbone-output")
    return name, next(iter(outputs)), fn


def _load_object(spec: BackboneSpec, path: str, options):
    try:
        return hub().load(path, options=options)
    except Exception as exc:
        if "KeyboardInterrupt" in str(exc):  # Ctrl-C inside the native loader comes back wrapped (pybind11)
            raise KeyboardInterrupt from None
        raise BackboneError(f"--backbone {spec.handle}: cannot load the SavedModel at {path} "
                            f"({type(exc).__name__}: {str(exc)[:160]})") from None


def _signature_layer(obj, spec: BackboneSpec, path: str, options, *, trainable: bool, layer_name: str):
    """(layer, input shapes, declared output shape, signature, output key) of a backbone run
    through a signature. Raises ``BackboneError`` with ``trainable``: a signature's weights
    cannot be trained (tensorflow_hub refuses it)."""
    name, key, fn = pick_signature(obj, spec)
    if trainable:
        raise BackboneError(f"--fine-tune: --backbone {spec.handle} runs through its signature {name} (a "
                            "SavedModel without __call__, e.g. a Keras 3 export), whose weights cannot be "
                            "trained; train without --fine-tune")
    args, kwargs = fn.structured_input_signature
    shapes = [s.shape for s in [*args, *kwargs.values()] if hasattr(s, "shape")]
    layer = hub().KerasLayer(path, signature=name, output_key=key, load_options=options, name=layer_name)
    return layer, shapes, _output_shape(fn.structured_outputs, key), name, key


def load(spec: BackboneSpec, *, trainable: bool = False, path: str | None = None,
         io_device: str | None = None, name: str = "backbone") -> LoadedBackbone:
    """Load and validate an image feature vector: input [batch, H, W, 3] float in [0, 1],
    output [batch, features]. ``path`` is what ``fetch(spec)`` returned, when already known.
    ``io_device``: the device that reads the files (a TPU's: ``/job:localhost``, the host
    that holds them, since the TPU workers cannot read local paths). A SavedModel without
    ``__call__`` (a Keras 3 export), or one given ``spec.signature``, runs through a signature
    (``pick_signature``), frozen only. Raises ``BackboneError`` otherwise."""
    if spec.parts:
        return _load_concatenation(spec, trainable=trainable, io_device=io_device)
    path = path or fetch(spec)
    t = tf()
    options = t.saved_model.LoadOptions(experimental_io_device=io_device) if io_device else None
    obj = _load_object(spec, path, options)
    signature = output_key = None
    if spec.signature or not callable(obj):
        layer, shapes, shape, signature, output_key = _signature_layer(obj, spec, path, options, trainable=trainable,
                                                                              layer_name=name)
    else:
        shapes = [_first_input_shape(cf) for cf in _concrete_calls(obj)]
        layer = hub().KerasLayer(obj, trainable=trainable, output_key=spec.output_key, name=name)
        shape, output_key = _declared_output_shape(obj, spec.output_key), spec.output_key
        if output_key and isinstance(_declared_output_shape(obj), dict) and isinstance(shape, dict):
            raise BackboneError(f"--backbone-output {output_key}: {spec.handle} has no such output (it has "
                                f"{_listed(shape)})")
    rank = _declared_input_rank(shapes)
    if rank is not None and rank != 4:
        raise BackboneError(f"--backbone {spec.handle}: takes rank-{rank} input, not images "
                            "[batch, height, width, 3]; choose an image feature vector model")
    size = spec.image_size or _declared_size(shapes)
    if size is None:
        raise BackboneError(f"--backbone {spec.handle}: declares no input size; set --image-size")
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
        raise BackboneError(f"--backbone {spec.handle}: returns {shape}, not a feature vector [batch, features]; "
                            "choose an image feature vector model" + ("" if output_key else
                                                                      ", or its output with --backbone-output"))
    return LoadedBackbone(layer=layer, image_size=size, feature_dim=int(shape[-1]), path=path,
                          signature=signature, output_key=output_key, any_size=_any_size(shapes))


def _load_concatenation(spec: BackboneSpec, *, trainable: bool, io_device: str | None) -> LoadedBackbone:
    """A concatenation's parts loaded and joined in one Keras model named "backbone": images ->
    [batch, sum of the parts' features]. Raises ``BackboneError`` with ``trainable``."""
    if trainable:
        raise BackboneError(f"--fine-tune: the backbone {spec.handle} concatenates several backbones, which "
                            "is frozen only; train without --fine-tune, or give one --backbone")
    k = keras()
    loaded = [load(p, io_device=io_device, name=f"backbone_{i}") for i, p in enumerate(spec.parts)]
    images = k.Input(shape=(spec.image_size, spec.image_size, 3), dtype="float32", name="images")
    joined = k.layers.Concatenate(name="features")([b.layer(images, training=False) for b in loaded])
    return LoadedBackbone(layer=k.Model(images, joined, name="backbone"), image_size=spec.image_size,
                          feature_dim=sum(b.feature_dim for b in loaded), path=loaded[0].path)
