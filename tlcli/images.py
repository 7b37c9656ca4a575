"""The one image decoder, used by train, predict, export calibration and evaluate.

Files are decoded by content (Pillow), never by extension. Policies:

* EXIF orientation is applied (JPEG, PNG, WebP, TIFF).
* Multi-frame files (GIF, APNG, WebP, TIFF, MPO) use their first frame.
* Transparency is composited onto a white background.
* 16-bit and 32-bit single-channel data is scaled to 8 bits by the range it actually uses:
  the smallest of 8, 10, 12, 14 or 16 bits that holds the largest value (never clipped).
* JPEGs are decoded at a reduced scale (draft mode) when the model needs fewer pixels.
* ``max_pixels`` caps the pixels actually decoded, against decompression bombs.

Model input: float32 RGB, shape [size, size, 3], values in [0, 1], resized with Pillow's
bilinear filter (antialiased) without keeping the aspect ratio.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.errors import ImageError

# Our own pixel limit replaces Pillow's global one (which raises or warns at fixed sizes).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

BACKGROUND = (255, 255, 255)

# Rejection reasons, as shown to users and stored in tlcli.json.
ZERO_BYTES = "zero bytes"
NOT_AN_IMAGE = "not an image"
TRUNCATED = "truncated"
OVER_PIXEL_LIMIT = "over the pixel limit"
UNSUPPORTED = "unsupported"
UNREADABLE = "unreadable"


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file, mapping OS errors and empty files to ``ImageError``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, UNREADABLE, exc.strerror or str(exc)) from None
    if not data:
        raise ImageError(path, ZERO_BYTES)
    return data


def decode(data: bytes, *, path: str = "<bytes>", min_size: int | None = None,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an upright 8-bit RGB ``PIL.Image``.

    ``min_size`` lets JPEGs decode at a reduced scale while keeping both sides >= min_size.
    Raises ``ImageError`` with one of the reason constants of this module.
    """
    if not data:
        raise ImageError(path, ZERO_BYTES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(path, NOT_AN_IMAGE) from None
        except Exception as exc:  # Pillow plugins raise many types on garbage headers
            raise ImageError(path, NOT_AN_IMAGE, str(exc)) from None
        try:
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            if img.width * img.height > max_pixels:
                raise ImageError(path, OVER_PIXEL_LIMIT,
                                 f"{img.width}x{img.height} > {max_pixels} pixels; raise --max-pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except ImageError:
            raise
        except (OSError, SyntaxError, EOFError) as exc:
            msg = str(exc)
            if "truncated" in msg or "broken data stream" in msg or isinstance(exc, EOFError) \
                    or "unrecognized data stream" in msg or "not enough" in msg:
                raise ImageError(path, TRUNCATED, msg) from None
            raise ImageError(path, UNSUPPORTED, msg) from None
        except (ValueError, NotImplementedError, KeyError, IndexError, MemoryError) as exc:
            raise ImageError(path, UNSUPPORTED, str(exc)) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_8bit(np.asarray(img)), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode == "P" and "transparency" in img.info) or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _scale_to_8bit(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    top = float(finite.max()) if finite.size else 0.0
    if arr.dtype.kind == "f" and 0.0 < top <= 1.0 and not np.issubdtype(arr.dtype, np.integer):
        full = 1.0
    else:
        full = next((2.0 ** bits - 1 for bits in (8, 10, 12, 14, 16) if top <= 2 ** bits - 1), top)
    out = np.nan_to_num(arr, nan=0.0) * (255.0 / full)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_rgb(path: str | os.PathLike, *, min_size: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode one file to an upright RGB image (see module policies)."""
    return decode(read_bytes(path), path=str(path), min_size=min_size, max_pixels=max_pixels)


def to_model_input(img: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to float32 [size, size, 3] in [0, 1]."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_for_model(path: str | os.PathLike, size: int, *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The model input for one file: float32 [size, size, 3] in [0, 1]. Raises ImageError."""
    return to_model_input(load_rgb(path, min_size=size, max_pixels=max_pixels), size)


def check(path: str | os.PathLike, *, size: int,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes | None, ImageError | None]:
    """Fast pre-pass check of one file: returns (bytes, None) or (None, the error)."""
    try:
        data = read_bytes(path)
        decode(data, path=str(path), min_size=size, max_pixels=max_pixels)
    except ImageError as exc:
        return None, exc
    return data, None
