"""The one image decoder, used by train, predict, export calibration and evaluate.

Files are decoded by content (Pillow), never by extension. Policies:

* EXIF orientation is applied (JPEG, PNG ``eXIf``, WebP, TIFF); unreadable EXIF is ignored.
* Multi-frame files (animated GIF, APNG and WebP, multi-page TIFF, MPO) use their first frame.
* Transparency (RGBA, LA, PA, palette or grey/RGB with a ``tRNS`` colour) is composited onto a
  white background (``BACKGROUND``), as a viewer on a white page shows it.
* CMYK, YCbCr, L, 1-bit and palette images are converted to RGB by Pillow (embedded colour
  profiles are not applied: pixel values are used as stored).
* 16-bit and 32-bit single-channel data (I;16, I, F) is scaled to 8 bits by the range it actually
  uses: the smallest of 8, 10, 12, 14 or 16 bits that holds the largest value, so nothing is
  clipped and an image whose values are all 0-255 keeps them exactly. Float data with values in
  [0, 1] is read as [0, 1]. (Pillow reads 16-bit RGB PNGs as 8-bit RGB, their high bytes.)
* JPEGs are decoded at a reduced scale (draft mode, 1/2 to 1/8) when the model needs fewer pixels.
* ``max_pixels`` caps the pixels actually decoded (after draft scaling), against decompression
  bombs; the size is read from the header and checked before any pixel is decoded.

Unusable files raise ``ImageError`` with one of these reasons (shown to users, stored in
``tlcli.json``): ``zero bytes``, ``not an image``, ``truncated``, ``corrupt``, ``over the pixel
limit``, ``unsupported`` (an image format or feature Pillow cannot decode, e.g. HEIC),
``unreadable`` (an OS error), ``broken symlink``, ``not a regular file`` (a folder, FIFO, socket or
device: never opened for reading, so it cannot block or stream without end) and ``too large``
(far more bytes than the image its header declares could need: see ``read_bytes``).

Memory: every decode reserves its estimated peak (pixels x bytes per pixel of its conversion
path, ``_decode_cost``) from one process-wide budget, ``DECODE_MEMORY_BUDGET``, so huge images
decode one at a time while small ones stay parallel, in the scan's threads and tf.data's alike.

Model input: float32 RGB, shape [size, size, 3], values in [0, 1], resized with Pillow's
bilinear filter (antialiased) without keeping the aspect ratio.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.data.image_files import (
    OVER_PIXEL_LIMIT,
    ZERO_BYTES,
    classify_failure,
    digest,
    over_limit,
    read_bytes,
    refuse_over_limit,
    webp_size,
)
from tlcli.errors import ImageError

# Our own pixel limit replaces Pillow's global one (which raises or warns at fixed sizes).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

BACKGROUND = (255, 255, 255)


_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode(data: bytes, *, path: str = "<bytes>", min_size: int | None = None,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an upright 8-bit RGB ``PIL.Image`` (see module policies).

    ``min_size`` lets JPEGs decode at a reduced scale while keeping both sides >= min_size.
    Raises ``ImageError`` with one of the reason constants of this module.
    """
    return _decode(data, path=path, min_size=min_size, max_pixels=max_pixels, then=lambda img: img)


def _decode(data: bytes, *, path: str, min_size: int | None, max_pixels: int, then):
    """``then(the upright RGB image)``, run while the decode's memory is reserved from the budget
    (so that what ``then`` makes of the full-size image is covered too)."""
    if not data:
        raise ImageError(path, ZERO_BYTES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF and chunks; we decide here
        webp = webp_size(data)
        if webp and webp[0] * webp[1] > max_pixels:  # Pillow's WebP allocates the canvas on open
            raise ImageError(path, OVER_PIXEL_LIMIT, over_limit(*webp, max_pixels))
        try:
            img = Image.open(io.BytesIO(data))
        except Exception as exc:  # Pillow plugins raise many types on garbage headers
            raise ImageError(path, *classify_failure(exc, data, opened=False)) from None
        try:
            if min_size:
                img.draft("RGB", (min_size, min_size))  # a no-op for formats other than JPEG
            refuse_over_limit(img, path, max_pixels)
            with DECODE_BUDGET.reserve(_decode_cost(img)):
                img.load()
                img = _upright(img)
                return then(_to_rgb(img))
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(path, *classify_failure(exc, data, opened=True)) from None


# ---- memory ----------------------------------------------------------------------------------

# Bytes a decode may hold at once, over all threads: the scan and tf.data decode in parallel, and
# each under-limit image can cost well over a gigabyte on its own.
DECODE_MEMORY_BUDGET = 1536 << 20


class MemoryBudget:
    """A process-wide allowance of bytes, reserved first come, first served. A reservation larger
    than the whole budget waits until nothing else is reserved and then runs alone."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        nbytes = max(0, min(int(nbytes), self.total))
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._queue[0] is not me or self.used + nbytes > self.total:
                    self._cond.wait()
            finally:
                self._queue.remove(me)  # also when interrupted, so the next one is not stuck
                self._cond.notify_all()
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


DECODE_BUDGET = MemoryBudget(DECODE_MEMORY_BUDGET)

# Bytes per pixel Pillow stores each mode in (RGB and friends take 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def _decode_cost(img: Image.Image) -> int:
    """Estimated peak bytes of decoding ``img`` (at its draft size) to the upright RGB image:
    the decoded pixels, an upright copy when EXIF turns it, and the conversion path's images."""
    src = _MODE_BYTES.get(img.mode, 4)
    if img.mode in _WIDE_MODES:
        convert = 4 + 1 + 4  # a numpy copy, the 8-bit result, and RGB
    elif img.mode == "RGB" and "transparency" not in img.info:
        convert = 0
    elif img.mode == "P" or img.mode == "RGBA":
        convert = 4  # the RGB result (palettes and RGBA are composited without another canvas)
    else:
        convert = 4 + 4  # an RGBA copy and the RGB result
    return img.width * img.height * (2 * src + convert)


def _upright(img: Image.Image) -> Image.Image:
    try:
        # In place: otherwise an upright image is returned as a full copy (512 MB at 128 MP).
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # damaged EXIF: keep the pixels as stored rather than reject the photo
        pass
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _WIDE_MODES:
        return Image.fromarray(_scale_to_8bit(np.asarray(img)), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info and img.palette and img.palette.mode == "RGB":
        return _flatten_palette(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        # Pasting with the alpha as mask gives exactly alpha_composite's result over an opaque
        # background (checked for every colour and alpha), without a second RGBA canvas.
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba)
        return out
    return img.convert("RGB")


def _flatten_palette(img: Image.Image) -> Image.Image:
    """A palette image with transparency -> RGB, compositing each palette entry onto the
    background once instead of every pixel (the same result as converting the pixels to RGBA
    and compositing them, at a quarter of the memory). Changes ``img``'s palette."""
    lut = Image.frombytes("P", (256, 1), bytes(range(256)))
    lut.putpalette(img.getpalette())
    lut.info["transparency"] = img.info["transparency"]
    entries = lut.convert("RGBA")
    flat = Image.new("RGB", entries.size, BACKGROUND)
    flat.paste(entries, mask=entries)
    img.putpalette(flat.tobytes())
    del img.info["transparency"]
    return img.convert("RGB")


_ROWS_PER_CHUNK = 256  # float64 work on a few rows at a time, not on a copy of the whole image


def _scale_to_8bit(arr: np.ndarray) -> np.ndarray:
    is_float = arr.dtype.kind == "f"

    def as_float(rows):
        return np.nan_to_num(rows.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)

    chunks = [slice(r, r + _ROWS_PER_CHUNK) for r in range(0, arr.shape[0], _ROWS_PER_CHUNK)]
    top = max((float(as_float(arr[c]).max()) for c in chunks if arr[c].size), default=0.0)
    if is_float and top <= 1.0:
        full = 1.0
    else:
        full = next((2.0 ** bits - 1 for bits in (8, 10, 12, 14, 16) if top <= 2 ** bits - 1), top)
    out = np.empty(arr.shape, np.uint8)
    for c in chunks:
        out[c] = np.clip(np.rint(as_float(arr[c]) * (255.0 / full)), 0, 255)
    return out



# ---- entry points -----------------------------------------------------------------------------

def load_rgb(path: str | os.PathLike, *, min_size: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode one file to an upright RGB image (see module policies)."""
    data = read_bytes(path, min_size=min_size, max_pixels=max_pixels)
    return decode(data, path=str(path), min_size=min_size, max_pixels=max_pixels)


# The backbones' own ImageNet evaluation protocol: keep the central 87.5% of each side.
CENTRAL_FRACTION = 0.875


def central_box(width: int, height: int, fraction: float = CENTRAL_FRACTION) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central crop, with tf.image.central_crop's integer math."""
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return left, top, width - left, height - top


def to_model_input(img: Image.Image, size: int) -> np.ndarray:
    """Central crop (CENTRAL_FRACTION of each side), then bilinear resize (antialiased) to
    float32 [size, size, 3] in [0, 1]. The aspect ratio is not kept."""
    return as_model_input(model_pixels(img, size))


def model_pixels(img: Image.Image, size: int) -> np.ndarray:
    """``to_model_input`` before the scaling: uint8 [size, size, 3] (a quarter of the memory)."""
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=central_box(*img.size))
    return np.asarray(img, dtype=np.uint8)


def as_model_input(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels [..., 3] (``model_pixels``) -> the float32 model input in [0, 1], written
    into ``out`` (float32, of the same shape) when given: the same values, bit for bit, with
    no new array (a batch's worth of fresh pages costs more than the division)."""
    if out is None:
        return pixels.astype(np.float32) / 255.0
    return np.divide(pixels, np.float32(255.0), out=out, dtype=np.float32)


def decode_size(size: int) -> int:
    """Smallest decode size (JPEG draft) that still leaves >= ``size`` pixels after the crop."""
    return int(np.ceil(size / CENTRAL_FRACTION))


def load_for_model(path: str | os.PathLike, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   with_digest: bool = False) -> np.ndarray | tuple[np.ndarray, str]:
    """The model input for one file: float32 [size, size, 3] in [0, 1]. Raises ImageError.
    With ``with_digest``: (that array, ``digest`` of the bytes it was decoded from), which names
    what was decoded, not what the file holds by the time anyone reads it again.

    Training (``data.image_dataset``), prediction and export calibration all call this, so every
    path preprocesses identically."""
    data = read_bytes(path, min_size=decode_size(size), max_pixels=max_pixels)
    arr = model_input_from_bytes(data, size, path=str(path), max_pixels=max_pixels)
    return (arr, digest(data)) if with_digest else arr


def model_input_from_bytes(data: bytes, size: int, *, path: str = "<bytes>",
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``load_for_model`` for bytes already in memory (an upload): the same decode, limits and
    preprocessing, float32 [size, size, 3] in [0, 1]. ``path`` names the bytes in the
    ``ImageError`` it raises."""
    min_size = decode_size(size)
    return _decode(data, path=path, min_size=min_size, max_pixels=max_pixels,
                   then=lambda img: to_model_input(img, size))


def decode_batch(items, decode) -> tuple[np.ndarray | None, list[ImageError | None]]:
    """Each of ``items`` through ``decode`` (item -> float32 model input [S, S, 3], raising
    ``ImageError`` for an unusable file), in order. Returns (the inputs that decoded, stacked
    [n, S, S, 3], or None when none did; per item its ImageError, or None where it decoded): run
    the model on the first, then ``paired`` gives each item its row."""
    arrays, errors = [], []
    for item in items:
        try:
            arrays.append(decode(item))
            errors.append(None)
        except ImageError as exc:
            errors.append(exc)
    return (np.stack(arrays) if arrays else None), errors


def paired(errors: list, rows) -> list:
    """Each item's row of ``rows`` (one per decoded item of ``decode_batch``, in order), or None
    for an item that did not decode."""
    it = iter(() if rows is None else rows)
    return [None if err is not None else next(it) for err in errors]


def check(path: str | os.PathLike, *, size: int,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes | None, ImageError | None]:
    """Fast pre-pass check of one file, decoding it as training will: returns (bytes, None) or
    (None, the error)."""
    min_size = decode_size(size)
    try:
        data = read_bytes(path, min_size=min_size, max_pixels=max_pixels)
        _decode(data, path=str(path), min_size=min_size, max_pixels=max_pixels, then=lambda img: None)
    except ImageError as exc:
        return None, exc
    return data, None


def check_pixels(path: str | os.PathLike, *, size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes | None, np.ndarray | None, ImageError | None]:
    """``check``, keeping what the decode gave: (bytes, ``model_pixels`` uint8 [size, size, 3],
    None) or (None, None, the error). ``as_model_input`` of those pixels is exactly
    ``load_for_model``'s array, so the file need not be decoded a second time for the model."""
    min_size = decode_size(size)
    try:
        data = read_bytes(path, min_size=min_size, max_pixels=max_pixels)
        pixels = _decode(data, path=str(path), min_size=min_size, max_pixels=max_pixels,
                         then=lambda img: model_pixels(img, size))
    except ImageError as exc:
        return None, None, exc
    return data, pixels, None


# Decoded model inputs the file check may keep for the feature extraction (uint8: 150 KB an
# image at 224), so that a cold run decodes each image once; past this the rest decode again.
KEPT_PIXELS_BUDGET = 512 << 20


class KeptPixels:
    """Model inputs of one size decoded by the file check, by content digest (``digest``), up to
    ``budget`` bytes (default ``KEPT_PIXELS_BUDGET``): ``offer`` keeps one while there is room,
    ``peek`` reads one, ``clear`` drops them all. Thread-safe (the check runs in threads).

    With ``feed``, each digest kept is also queued, once, for a consumer that runs while the
    check goes on (``prelude``'s extraction ahead): ``next_digests`` hands them over, ``drop`` frees the
    room of one it is done with, and ``close`` (the check has ended) lets it finish."""

    def __init__(self, size: int, budget: int | None = None, *, feed: bool = False):
        self.size, self.budget, self.used = size, KEPT_PIXELS_BUDGET if budget is None else budget, 0
        self._pixels: dict[str, np.ndarray] = {}
        self._lock = threading.Condition()
        self._feed: list[str] | None = [] if feed else None
        self._fed: set[str] = set()
        self._closed = False

    def room(self) -> bool:
        return self.used + self.size * self.size * 3 <= self.budget

    def offer(self, digest: str, pixels: np.ndarray) -> None:
        with self._lock:
            if digest not in self._pixels and digest not in self._fed and self.used + pixels.nbytes <= self.budget:
                self._pixels[digest] = pixels
                self.used += pixels.nbytes
                if self._feed is not None:
                    self._fed.add(digest)
                    self._feed.append(digest)
                    self._lock.notify_all()

    def peek(self, digest: str) -> np.ndarray | None:
        with self._lock:
            return self._pixels.get(digest)

    def drop(self, digest: str) -> None:
        with self._lock:
            pixels = self._pixels.pop(digest, None)
            self.used -= 0 if pixels is None else pixels.nbytes

    def next_digests(self, most: int, *, timeout: float = 0.5) -> list[str] | None:
        """Up to ``most`` queued digests, waiting up to ``timeout`` s for the first; [] when none
        came, None once ``close`` was called and the queue is empty."""
        with self._lock:
            if not self._feed and not self._closed:
                self._lock.wait(timeout)
            if not self._feed:
                return None if self._closed else []
            taken, self._feed[:most] = self._feed[:most], []
            return taken

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._pixels.clear()
            self.used = 0
