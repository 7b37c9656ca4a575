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

import codecs
import collections
import contextlib
import errno
import hashlib
import io
import os
import stat
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tlcli import files
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
NOT_REGULAR = "not a regular file"
TOO_LARGE = "too large"

_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


# No encoding of a pixel needs more than 16-bit RGBA stored uncompressed; on top of the pixels a
# file may carry metadata (EXIF, ICC, XMP, previews, comments), for which this is generous.
MAX_BYTES_PER_PIXEL = 8
METADATA_ALLOWANCE = 64 << 20
# Formats whose frame count is not known from the header (each frame may be as large as the
# first): they are bounded by the pixel limit instead of by the first frame's size.
_UNCOUNTED_FRAMES = ("GIF", "WEBP")


def special_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` (symlinks followed) is when it exists and is not a regular file ("a FIFO
    (named pipe)", "a device", ...), else None. Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else files.file_kind(mode)


def _open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file at ``path`` (``files.open_regular``), or the
    ImageError that says why not."""
    try:
        fd, _ = files.open_regular(path)
    except files.NotRegularFile as exc:
        raise ImageError(path, NOT_REGULAR, exc.kind) from None
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise ImageError(path, BROKEN_SYMLINK, f"points to {os.readlink(path)}") from None
        if exc.errno == errno.ELOOP:
            raise ImageError(path, BROKEN_SYMLINK, "a symlink loop") from None
        if exc.errno == errno.ENXIO:  # opening a socket
            raise ImageError(path, NOT_REGULAR, "a socket") from None
        raise ImageError(path, UNREADABLE, exc.strerror or str(exc)) from None
    return fd


def read_bytes(path: str | os.PathLike, *, min_size: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The bytes of the regular file at ``path``, read with a bound. Raises ImageError:
    ``not a regular file``, ``broken symlink``, ``unreadable``, ``zero bytes``, and for a file
    above ``METADATA_ALLOWANCE`` bytes, whose header is read first: ``over the pixel limit``,
    ``too large`` (more than ``MAX_BYTES_PER_PIXEL`` per declared pixel, times frames, plus the
    allowance: something else is appended to the image), or ``corrupt`` / ``not an image`` when
    no image header can be read; the rest of such a file is never read."""
    fd = _open_regular(path)
    with open(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if size > METADATA_ALLOWANCE:
            _check_header(f, path, size, min_size=min_size, max_pixels=max_pixels)
            f.seek(0)
        try:
            chunks, left = [], size + 1  # one byte more shows a file that grew since the fstat
            while left > 0 and (chunk := f.read(min(left, 1 << 24))):
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as exc:
            raise ImageError(path, UNREADABLE, exc.strerror or str(exc)) from None
    data = b"".join(chunks)
    if len(data) > size:
        raise ImageError(path, UNREADABLE, "it grew while being read (still being written?)")
    if not data:
        raise ImageError(path, ZERO_BYTES)
    return data


HEADER_BYTES = 16 << 20  # where a large file's image header must be found


def _check_header(f, path, size: int, *, min_size: int | None, max_pixels: int) -> None:
    """Refuse a large file from its header alone (see ``read_bytes``)."""
    fmt = _sniff(f.read(64))
    overall = max_pixels * MAX_BYTES_PER_PIXEL + METADATA_ALLOWANCE
    if fmt in _UNCOUNTED_FRAMES:
        bound, what = overall, f"{max_pixels} pixels per frame, for any number of frames that fit"
    else:
        f.seek(0)
        w, h, frames = _header_size(f, fmt, path, min_size=min_size, max_pixels=max_pixels)
        bound = frames * w * h * MAX_BYTES_PER_PIXEL + METADATA_ALLOWANCE
        what = f"{frames} frame(s) of {w}x{h}" if frames > 1 else f"a {w}x{h} image"
    if size > bound:
        raise ImageError(path, TOO_LARGE, f"{size} bytes, far more than {what} can need ({bound}); "
                                          "is other data appended to it?")


def _header_size(f, fmt: str | None, path, *, min_size: int | None, max_pixels: int) -> tuple[int, int, int]:
    """(width, height, frames) declared by the header of the file ``f``, after refusing one over
    the pixel limit. Reads at most ``HEADER_BYTES``, except that TIFF's directories are followed
    where they lie. Raises ImageError when no header can be read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if fmt == "JPEG":  # Pillow walks junk a byte at a time: minutes for a large file
                head = f.read(HEADER_BYTES)
                w, h = _jpeg_size(head)
                scale = next((s for s in (8, 4, 2) if min_size and min(w // min_size, h // min_size) >= s), 1)
                dw, dh = -(-w // scale), -(-h // scale)  # the draft size Pillow would decode
                if dw * dh > max_pixels:
                    raise ImageError(path, OVER_PIXEL_LIMIT, _over_limit(dw, dh, max_pixels))
                return w, h, 1
            img = Image.open(f if fmt == "TIFF" else io.BytesIO(f.read(HEADER_BYTES)))
            (w, h), frames = img.size, max(1, int(getattr(img, "n_frames", 1)))
            _check_pixels(img, path, max_pixels)
            return w, h, frames
        except ImageError:
            raise
        except Exception:
            if fmt is None:
                f.seek(0)
                raise ImageError(path, NOT_AN_IMAGE, _what_instead(f.read(4096))) from None
            if fmt in _UNSUPPORTED_FORMATS:
                raise ImageError(path, UNSUPPORTED, _UNSUPPORTED_FORMATS[fmt]) from None
            raise ImageError(path, CORRUPT, f"no readable {fmt} header in its first "
                                            f"{HEADER_BYTES >> 20} MB") from None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head: bytes) -> tuple[int, int]:
    """(width, height) from the first SOF segment in ``head``; ValueError when there is none.
    Segments are skipped by their length, junk between them at C speed."""
    pos = 2
    while pos + 9 <= len(head):
        if head[pos] != 0xFF:
            pos = head.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = head[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill bytes, standalone markers
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in _SOF:
            h, w = int.from_bytes(head[pos + 5:pos + 7], "big"), int.from_bytes(head[pos + 7:pos + 9], "big")
            if w and h:
                return w, h
            break
        if marker in (0xDA, 0xD9):  # image data or the end before any frame header
            break
        pos += 2 + int.from_bytes(head[pos + 2:pos + 4], "big")
    raise ValueError("no JPEG frame header")


def digest(data: bytes) -> str:
    """The content hash that names a file's bytes in the feature cache."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


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
        webp = _webp_size(data)
        if webp and webp[0] * webp[1] > max_pixels:  # Pillow's WebP allocates the canvas on open
            raise ImageError(path, OVER_PIXEL_LIMIT, _over_limit(*webp, max_pixels))
        try:
            img = Image.open(io.BytesIO(data))
        except Exception as exc:  # Pillow plugins raise many types on garbage headers
            raise ImageError(path, *_classify(exc, data, opened=False)) from None
        try:
            if min_size:
                img.draft("RGB", (min_size, min_size))  # a no-op for formats other than JPEG
            _check_pixels(img, path, max_pixels)
            with DECODE_BUDGET.reserve(_decode_cost(img)):
                img.load()
                img = _upright(img)
                return then(_to_rgb(img))
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(path, *_classify(exc, data, opened=True)) from None


def _over_limit(w: int, h: int, max_pixels: int) -> str:
    return f"{w}x{h} > {max_pixels} pixels; raise --max-pixels"


def _check_pixels(img: Image.Image, path, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageError(path, OVER_PIXEL_LIMIT, _over_limit(img.width, img.height, max_pixels))


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's canvas size from its header (as Pillow reads it), or None for other data."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


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
