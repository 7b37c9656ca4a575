"""Serving: the bundle's SavedModel and its signatures, and the in-graph decoder of posted files.

``serving_module`` wraps a classifier in the two signatures; ``SavedModelExport`` writes the graph
(which does not depend on the weights, so it can be written while training runs) and then the
final variables under the same object graph.
"""

from __future__ import annotations

from pathlib import Path

from tlcli._tf import tf
from tlcli.data.images import CENTRAL_FRACTION, decode_size

# ---- the bytes signature's decoder --------------------------------------------------------------
# TF Serving clients post encoded files, so the SavedModel decodes them itself. This mirrors
# tlcli/data/images.py (the Pillow decoder that training and the CLI use) step by step, so a file
# posted to ``serving_bytes`` is classified as ``tlcli predict`` classifies it:
#   * JPEG: decoded at 1/2, 1/4 or 1/8 scale exactly when Pillow's draft mode would be;
#   * EXIF orientation (JPEG, PNG, WebP), or XMP tiff:Orientation when EXIF has none;
#   * transparency (alpha channel, palette or colour-key tRNS) composited onto white;
#   * 16-bit greyscale PNG scaled by the bit range it uses (8/10/12/14/16), like I;16 in Pillow;
#   * the central crop and antialiased bilinear resize to S x S as one box resize, like Pillow's
#     resize(box=central_box(...)), rounded to 8 bits, / 255.
# On real photos the result is within 1/255 of Pillow's (resize rounding). Known differences:
# GIF transparency is black, not white (TF's GIF decoder drops it), and TIFF is not accepted.

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_WEBP = b"WEBP"
_HEAD_BYTES = 1 << 17  # EXIF (<= 64 KiB) follows at most a JFIF APP0 segment (<= 64 KiB)

# Where an orientation value sits: (bytes that precede it, its offset from their start).
_ORIENTATION_PATTERNS = {
    "exif_le": (b"\x12\x01\x03\x00\x01\x00\x00\x00", 8),   # tag 0x0112, SHORT, count 1, value
    "exif_be": (b"\x01\x12\x00\x03\x00\x00\x00\x01\x00", 9),
    "xmp_attr": (b'tiff:Orientation="', 18),
    "xmp_elem": (b"tiff:Orientation>", 17),
}


def _find_byte(t, raw, pattern: bytes, offset: int, *, ascii_digit: bool):
    """The byte at ``offset`` after the first occurrence of ``pattern`` in uint8 ``raw``, as an
    int32 orientation (an ASCII digit when ``ascii_digit``), or 0 when absent."""
    n = t.shape(raw)[0]
    m = t.maximum(n - offset, 0)  # candidate start positions with the value byte in range
    hit = t.ones([m], t.bool)
    for k, byte in enumerate(pattern):
        hit = t.logical_and(hit, t.equal(raw[k:k + m], byte))
    where = t.where(hit)[:, 0]
    value = t.cond(t.size(where) > 0, lambda: t.cast(raw[t.cast(where[0], t.int32) + offset], t.int32),
                   lambda: t.constant(-1, t.int32))
    if ascii_digit:
        value = t.where(value >= 0, value - ord("0"), value)
    return t.where(t.logical_and(value >= 0, value <= 9), value, 0)


def _orientation(t, data):
    """EXIF orientation 1..8 of encoded JPEG/PNG bytes (1 when absent or invalid), read as
    Pillow's ``getexif`` does: the EXIF tag, else an XMP ``tiff:Orientation``."""
    raw = t.io.decode_raw(t.strings.substr(data, 0, _HEAD_BYTES), t.uint8)
    le, be, attr, elem = (_find_byte(t, raw, p, off, ascii_digit=name.startswith("xmp"))
                          for name, (p, off) in _ORIENTATION_PATTERNS.items())
    exif = t.where(le > 0, le, be)
    xmp = t.where(attr > 0, attr, elem)
    o = t.where(exif > 0, exif, xmp)
    return t.where(t.logical_and(o >= 1, o <= 8), o, 1)


def _orient(t, img, orientation):
    """Apply EXIF orientation like PIL.ImageOps.exif_transpose (img [h, w, c])."""
    transpose = lambda x: t.transpose(x, [1, 0, 2])  # noqa: E731
    return t.switch_case(orientation - 1, [
        lambda: img,                                    # 1 upright
        lambda: t.reverse(img, [1]),                    # 2 FLIP_LEFT_RIGHT
        lambda: t.image.rot90(img, 2),                  # 3 ROTATE_180
        lambda: t.reverse(img, [0]),                    # 4 FLIP_TOP_BOTTOM
        lambda: transpose(img),                         # 5 TRANSPOSE
        lambda: t.image.rot90(img, 3),                  # 6 ROTATE_270 (90 clockwise)
        lambda: t.image.rot90(transpose(img), 2),       # 7 TRANSVERSE
        lambda: t.image.rot90(img, 1),                  # 8 ROTATE_90 (counter-clockwise)
    ])


def _decode_jpeg(t, data, image_size: int):
    # Pillow's draft: the largest of 8, 4, 2, 1 not above min(w // S, h // S).
    shape = t.image.extract_jpeg_shape(data)
    scale = t.minimum(shape[0] // image_size, shape[1] // image_size)
    branch = t.cast(scale >= 2, t.int32) + t.cast(scale >= 4, t.int32) + t.cast(scale >= 8, t.int32)
    # INTEGER_ACCURATE is libjpeg's JDCT_ISLOW, Pillow's choice; TF's default differs by a few levels.
    img = t.switch_case(branch, [lambda r=r: t.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
                                 for r in (1, 2, 4, 8)])
    return t.cast(img, t.float32)


def _composite(t, img):
    """[h, w, c] uint8 with c in 1..4 -> float32 RGB [h, w, 3] with any alpha over white."""
    img = t.cast(img, t.float32)
    c = t.shape(img)[-1]
    colour = t.cond(c >= 3, lambda: img[..., :3], lambda: t.tile(img[..., :1], [1, 1, 3]))
    alpha = t.cond(t.equal(c % 2, 0), lambda: img[..., -1:] / 255.0, lambda: t.ones_like(img[..., :1]))
    return t.round(colour * alpha + 255.0 * (1.0 - alpha))


def _decode_png(t, data):
    bit_depth = t.strings.substr(data, 24, 1)
    colour_type = t.strings.substr(data, 25, 1)
    head = t.strings.split(data, "IDAT", maxsplit=1)[0]  # tRNS must precede the pixel data
    colour_key = t.logical_and(t.size(t.strings.split(head, "tRNS")) > 1,
                               t.reduce_any(t.equal(colour_type, [b"\x00", b"\x02"])))

    def wide_grey():
        v = t.cast(t.io.decode_png(data, channels=1, dtype=t.uint16), t.float32)
        top = t.reduce_max(v)
        full = t.constant(65535.0)
        for bits in (14, 12, 10, 8):
            full = t.where(top <= 2.0 ** bits - 1, 2.0 ** bits - 1, full)
        return t.tile(t.clip_by_value(t.round(v * (255.0 / full)), 0, 255), [1, 1, 3])

    return t.case([
        (t.logical_and(t.equal(bit_depth, b"\x10"), t.equal(colour_type, b"\x00")), wide_grey),
        (colour_key, lambda: _composite(t, t.io.decode_png(data, channels=4))),
    ], default=lambda: _composite(t, t.io.decode_png(data, channels=0)))


def decode_image_bytes(data, image_size: int):
    """In-graph twin of the project's Pillow decoder (tlcli/data/images.py), for the bytes signature:
    one encoded JPEG/PNG/GIF/BMP/WebP string -> float32 [size, size, 3] in [0, 1].
    Raises ``InvalidArgumentError`` at run time for bytes that are not such an image."""
    t = tf()
    magic = t.strings.substr(data, 0, 8)
    is_jpeg = t.equal(t.strings.substr(magic, 0, 3), _JPEG)
    is_png = t.equal(magic, _PNG)
    has_exif = t.logical_or(t.logical_or(is_jpeg, is_png), t.equal(t.strings.substr(data, 8, 4), _WEBP))
    img = t.case([
        (is_jpeg, lambda: _decode_jpeg(t, data, decode_size(image_size))),
        (is_png, lambda: _decode_png(t, data)),
    ], default=lambda: _composite(t, t.io.decode_image(data, channels=0, expand_animations=False)))
    img = t.cond(has_exif, lambda: _orient(t, img, _orientation(t, data)), lambda: img)
    img.set_shape([None, None, 3])
    img = _crop_and_resize(t, img, image_size)
    return t.clip_by_value(t.round(img), 0.0, 255.0) / 255.0


def _crop_and_resize(t, img, image_size: int):
    """Pillow's ``resize((S, S), BILINEAR, box=central_box(w, h))``: the central box is scaled to
    S x S with an antialiased triangle filter whose taps may reach past the box into the rest of
    the image (cropping first would clamp them at the box edge)."""
    hw = t.cast(t.shape(img)[:2], t.float64)
    # central_box's integer math, in float64 like Python's.
    start = t.floor((hw - hw * CENTRAL_FRACTION) / 2)
    scale = image_size / (hw - 2 * start)
    out = t.raw_ops.ScaleAndTranslate(images=img[None], size=[image_size, image_size],
                                      scale=t.cast(scale, t.float32), translation=t.cast(-start * scale, t.float32),
                                      kernel_type="triangle", antialias=True)
    return out[0]


def serving_module(classifier, image_size: int, labels: list[str]):
    """A tf.Module with two signatures:

    * ``serving_default``: ``images`` float32 [batch, size, size, 3] in [0, 1] -> ``probabilities``
    * ``serving_bytes``: ``image_bytes`` string [batch] (encoded JPEG, PNG, GIF, BMP or WebP files,
      any size) -> ``probabilities`` and ``labels``: string [batch, num_labels], the label names in
      output-unit order (the same row for every image), so clients need no labels.txt. Decoding
      and resizing happen in the graph (``decode_image_bytes``).
    """
    t = tf()
    module = t.Module()
    # Track the variables, not the Keras model: saving a tracked Keras model re-traces every
    # layer's call functions (about 5 s for MobileNetV2); the two signatures are all we serve.
    module.weights = list(classifier.variables)
    module.labels = t.constant(labels)

    # autograph=False: the graphs use explicit tf.cond / tf.case, nothing to convert.
    @t.function(input_signature=[t.TensorSpec([None, image_size, image_size, 3], t.float32, name="images")],
                autograph=False)
    def serve_images(images):
        return {"probabilities": classifier(images, training=False)}

    @t.function(input_signature=[t.TensorSpec([None], t.string, name="image_bytes")], autograph=False)
    def serve_bytes(image_bytes):
        batch = t.map_fn(lambda b: decode_image_bytes(b, image_size), image_bytes,
                         fn_output_signature=t.TensorSpec([image_size, image_size, 3], t.float32))
        probs = classifier(batch, training=False)
        return {"probabilities": probs,
                "labels": t.tile(module.labels[None, :], [t.shape(probs)[0], 1])}

    module.serve_images = serve_images
    module.serve_bytes = serve_bytes
    return module, {"serving_default": serve_images, "serving_bytes": serve_bytes}


class SavedModelExport:
    """The classifier's SavedModel at ``path``: ``write_graph`` writes the graph and signatures
    (safe on another thread while features are extracted, not while the weights train), then
    ``write_variables`` stores the final weights under the same object graph and the fingerprint."""

    def __init__(self, classifier, image_size: int, labels: list[str], path: Path):
        self.path = Path(path)
        self.module, self.signatures = serving_module(classifier, image_size, labels)

    def write_graph(self) -> None:
        tf().saved_model.save(self.module, str(self.path), signatures=self.signatures)
        try:  # on the same worker: warm the import for the training curves, off the main path
            import matplotlib.figure  # noqa: F401
        except ImportError:
            pass  # plotting reports its own error later

    def write_variables(self) -> None:
        from tensorflow.python.saved_model import fingerprinting_utils

        tf().train.Checkpoint(root=self.module).write(str(self.path / "variables" / "variables"))
        fingerprinting_utils.write_fingerprint(str(self.path))  # it hashes the variables too


def engine_signature(path) -> str:
    """The SavedModel signature tlcli's engines run and every export format converts: "tlcli"
    when the SavedModel at ``path`` has one (a bundle with more outputs than "probabilities"),
    else "serving_default". Reads saved_model.pb's proto (``graphcheck.parse``; raises
    ``BundleError``)."""
    from tlcli.bundle import graphcheck

    proto = graphcheck.parse(path)
    return "tlcli" if any("tlcli" in mg.signature_def for mg in proto.meta_graphs) else "serving_default"
