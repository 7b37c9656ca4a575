"""Reading an image file with bounds, and saying why a file is unusable.

``read_bytes`` reads a regular file (never a FIFO, socket or device), refusing from its header
alone a large file over the pixel limit or with data appended; ``classify_failure`` turns a
Pillow failure into one of the reasons below (shown to users and stored in ``tlcli.json``),
using the file's own end marker or declared length to tell truncated from corrupt data.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import io
import os
import stat
import warnings

from PIL import Image, UnidentifiedImageError

from tlcli import files
from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.errors import ImageError

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
    fmt = sniff(f.read(64))
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
                    raise ImageError(path, OVER_PIXEL_LIMIT, over_limit(dw, dh, max_pixels))
                return w, h, 1
            img = Image.open(f if fmt == "TIFF" else io.BytesIO(f.read(HEADER_BYTES)))
            (w, h), frames = img.size, max(1, int(getattr(img, "n_frames", 1)))
            refuse_over_limit(img, path, max_pixels)
            return w, h, frames
        except ImageError:
            raise
        except Exception:
            if fmt is None:
                f.seek(0)
                raise ImageError(path, NOT_AN_IMAGE, what_instead(f.read(4096))) from None
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



def over_limit(w: int, h: int, max_pixels: int) -> str:
    return f"{w}x{h} > {max_pixels} pixels; raise --max-pixels"



def refuse_over_limit(img: Image.Image, path, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageError(path, OVER_PIXEL_LIMIT, over_limit(img.width, img.height, max_pixels))



def webp_size(data: bytes) -> tuple[int, int] | None:
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



def sniff(data: bytes) -> str | None:
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


def what_instead(data: bytes) -> str:
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



def classify_failure(exc: BaseException, data: bytes, *, opened: bool) -> tuple[str, str]:
    """(reason, detail) for a Pillow failure on ``data``.

    Pillow says "truncated" whenever a decoder runs out of input, which corrupt data can also
    cause, so the file's own end marker or declared length decides where the format has one."""
    msg = "" if isinstance(exc, UnidentifiedImageError) else str(exc)
    fmt = sniff(data)
    if isinstance(exc, MemoryError):
        return UNSUPPORTED, "out of memory while decoding"
    if not opened:
        if fmt is None:
            return NOT_AN_IMAGE, what_instead(data)
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
