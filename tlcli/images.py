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
``unreadable`` (an OS error) and ``broken symlink``.

Model input: float32 RGB, shape [size, size, 3], values in [0, 1], resized with Pillow's
bilinear filter (antialiased) without keeping the aspect ratio.
"""

from __future__ import annotations

import codecs
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
CORRUPT = "corrupt"
OVER_PIXEL_LIMIT = "over the pixel limit"
UNSUPPORTED = "unsupported"
UNREADABLE = "unreadable"
BROKEN_SYMLINK = "broken symlink"

_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


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
    """Decode encoded image bytes to an upright 8-bit RGB ``PIL.Image`` (see module policies).

    ``min_size`` lets JPEGs decode at a reduced scale while keeping both sides >= min_size.
    Raises ``ImageError`` with one of the reason constants of this module.
    """
    if not data:
        raise ImageError(path, ZERO_BYTES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF and chunks; we decide here
        try:
            img = Image.open(io.BytesIO(data))
        except Exception as exc:  # Pillow plugins raise many types on garbage headers
            raise ImageError(path, *_classify(exc, data, opened=False)) from None
        try:
            if min_size:
                img.draft("RGB", (min_size, min_size))  # a no-op for formats other than JPEG
            if img.width * img.height > max_pixels:
                raise ImageError(path, OVER_PIXEL_LIMIT,
                                 f"{img.width}x{img.height} > {max_pixels} pixels; raise --max-pixels")
            img.load()
            img = _upright(img)
            return _to_rgb(img)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(path, *_classify(exc, data, opened=True)) from None


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # damaged EXIF: keep the pixels as stored rather than reject the photo
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _WIDE_MODES:
        return Image.fromarray(_scale_to_8bit(np.asarray(img)), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _scale_to_8bit(arr: np.ndarray) -> np.ndarray:
    is_float = arr.dtype.kind == "f"
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(arr.max()) if arr.size else 0.0
    if is_float and top <= 1.0:
        full = 1.0
    else:
        full = next((2.0 ** bits - 1 for bits in (8, 10, 12, 14, 16) if top <= 2 ** bits - 1), top)
    return np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)


# ---- why a file failed ------------------------------------------------------------------------

def _sniff(data: bytes) -> str | None:
    """The container format named by the file's first bytes, or None."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":
        return "BMP"
    if head[4:8] == b"ftyp":
        major = head[8:12]
        if major in (b"avif", b"avis"):
            return "AVIF"
        if major in _HEIF_BRANDS:
            return "AVIF" if b"avif" in data[16:64] else "HEIF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    text = head.lstrip()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:2048]):
        return "SVG"
    return None


# Formats recognised by their signature that this decoder cannot read, with the fix.
_UNSUPPORTED_FORMATS = {
    "HEIF": "HEIC/HEIF; convert it to JPEG or PNG",
    "JPEG XL": "JPEG XL; convert it to JPEG or PNG",
    "SVG": "SVG is a vector format; render it to PNG",
}


def _what_instead(data: bytes) -> str:
    """What a non-image file seems to be, for the skipped list."""
    head = data[:512].lstrip()
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (Word and other Office documents are ZIPs)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    try:  # incremental, so a character cut at the 4 kB boundary does not count against it
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:4096], final=False)
    except UnicodeDecodeError:
        return ""
    return "text" if text and all(c.isprintable() or c.isspace() for c in text) else ""


def _cut_short(data: bytes, fmt: str | None) -> bool | None:
    """Whether the file ends before its format says it should (a partial download); None when
    the format gives no way to tell."""
    tail = data.rstrip(b"\x00\r\n ")
    if fmt == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in data[-64:]
    if fmt == "GIF":
        return not tail.endswith(b";")
    if fmt in ("WEBP", "BMP"):
        at = 4 if fmt == "WEBP" else 2
        declared = int.from_bytes(data[at:at + 4], "little") + (8 if fmt == "WEBP" else 0)
        return len(data) < max(declared, at + 4)
    if fmt == "TIFF":
        order = "little" if data[:2] == b"II" else "big"
        ifd = int.from_bytes(data[4:8], order)
        if len(data) < ifd + 2:
            return True
        entries = int.from_bytes(data[ifd:ifd + 2], order)
        return True if len(data) < ifd + 2 + 12 * entries + 4 else None
    if fmt in ("AVIF", "HEIF"):
        pos = 0
        while pos + 8 <= len(data):  # ISO-BMFF: top-level boxes must tile the file exactly
            size = int.from_bytes(data[pos:pos + 4], "big")
            if size == 1:
                if pos + 16 > len(data):
                    return True
                size = int.from_bytes(data[pos + 8:pos + 16], "big")
            elif size == 0:
                return False  # the last box runs to the end of the file
            if size < 8:
                return None
            pos += size
        return pos != len(data)
    return None


def _classify(exc: BaseException, data: bytes, *, opened: bool) -> tuple[str, str]:
    """(reason, detail) for a Pillow failure on ``data``.

    Pillow says "truncated" whenever a decoder runs out of input, which corrupt data can also
    cause, so the file's own end marker or declared length decides where the format has one."""
    msg = "" if isinstance(exc, UnidentifiedImageError) else str(exc)
    fmt = _sniff(data)
    if isinstance(exc, MemoryError):
        return UNSUPPORTED, "out of memory while decoding"
    if not opened:
        if fmt is None:
            return NOT_AN_IMAGE, _what_instead(data)
        if fmt in _UNSUPPORTED_FORMATS:
            return UNSUPPORTED, _UNSUPPORTED_FORMATS[fmt]
    elif isinstance(exc, NotImplementedError) or any(
            word in msg.lower() for word in ("not supported", "unsupported", "not available",
                                             "cannot handle", "not implemented", "conversion from")):
        return UNSUPPORTED, msg
    short = _cut_short(data, fmt)
    says_truncated = isinstance(exc, EOFError) or "truncat" in msg.lower()
    if short or (short is None and says_truncated):
        return TRUNCATED, msg or f"the {fmt} data ends early"
    return CORRUPT, msg or f"damaged {fmt} data"


# ---- entry points -----------------------------------------------------------------------------

def load_rgb(path: str | os.PathLike, *, min_size: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode one file to an upright RGB image (see module policies)."""
    return decode(read_bytes(path), path=str(path), min_size=min_size, max_pixels=max_pixels)


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
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=central_box(*img.size))
    return np.asarray(img, dtype=np.float32) / 255.0


def decode_size(size: int) -> int:
    """Smallest decode size (JPEG draft) that still leaves >= ``size`` pixels after the crop."""
    return int(np.ceil(size / CENTRAL_FRACTION))


def load_for_model(path: str | os.PathLike, size: int, *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The model input for one file: float32 [size, size, 3] in [0, 1]. Raises ImageError.

    Training (``data.image_dataset``), prediction and export calibration all call this, so every
    path preprocesses identically."""
    return to_model_input(load_rgb(path, min_size=decode_size(size), max_pixels=max_pixels), size)


def check(path: str | os.PathLike, *, size: int,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes | None, ImageError | None]:
    """Fast pre-pass check of one file, decoding it as training will: returns (bytes, None) or
    (None, the error)."""
    try:
        data = read_bytes(path)
        decode(data, path=str(path), min_size=decode_size(size), max_pixels=max_pixels)
    except ImageError as exc:
        return None, exc
    return data, None
