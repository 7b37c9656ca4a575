"""The serving SavedModel: the ``serving_bytes`` signature decodes posted files in the graph exactly
as the Pillow decoder does for training and predict, and classifies like ``serving_default``."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import COLOURS, solid_image


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def gradient(width=60, height=40, seed=0) -> Image.Image:
    """A photo-like image whose every orientation looks different."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, (x + y) % 32 * 8], -1)
    arr = arr + np.random.default_rng(seed).normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def with_orientation(n: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = n
    return exif


def translucent(img: Image.Image, lowest: int = 0) -> Image.Image:
    """``img`` with alpha rising from ``lowest`` at the left edge to opaque at the right."""
    rgba = np.array(img.convert("RGBA"))
    rgba[..., 3] = np.linspace(lowest, 255, rgba.shape[1]).astype(np.uint8)[None, :]
    return Image.fromarray(rgba)


@pytest.fixture(scope="module")
def served(trained_bundle):
    import tensorflow as tf

    return tf.saved_model.load(str(trained_bundle))


def test_bytes_signature_classifies_jpeg_and_png_like_the_tensor_signature(served, trained_bundle, colour_data,
                                                                          tmp_path):
    import tensorflow as tf

    from tlcli import bundle as bundles
    from tlcli.data import images

    b = bundles.load(trained_bundle)
    files = sorted(colour_data.glob("*/*"))
    encoded = [p.read_bytes() for p in files]
    # Files of other sizes and modes too: resizing and compositing happen inside the model.
    for i, colour in enumerate(COLOURS.values()):
        big = solid_image(colour, size=(300, 180), seed=i)
        encoded += [encode(big, "JPEG", quality=90), encode(translucent(big, 160), "PNG"),
                    encode(big.convert("P"), "PNG")]
    assert {data[:3] for data in encoded} == {b"\xff\xd8\xff", b"\x89PN"}

    bytes_fn = served.signatures["serving_bytes"]
    assert bytes_fn.structured_input_signature[1]["image_bytes"].dtype == tf.string
    out = bytes_fn(image_bytes=tf.constant(encoded))
    for i, data in enumerate(encoded):
        (tmp_path / f"{i}").write_bytes(data)
    x = np.stack([images.load_for_model(tmp_path / f"{i}", b.image_size) for i in range(len(encoded))])
    ref = served.signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()
    probs = out["probabilities"].numpy()

    assert probs.shape == (len(encoded), 3)
    assert (probs.argmax(1) == ref.argmax(1)).all()
    assert np.abs(probs - ref).max() < 1e-3
    truth = [p.parent.name for p in files] + [name for name in COLOURS for _ in range(3)]
    assert [b.labels[i] for i in probs.argmax(1)] == truth
    assert out["labels"].numpy().astype(str).tolist() == [b.labels] * len(encoded)


def _cases():
    photo, big = gradient(), gradient(900, 640, seed=1)
    cases = {f"jpeg-exif-orientation-{n}": encode(photo, "JPEG", quality=95, exif=with_orientation(n))
             for n in range(1, 9)}
    cases |= {
        "png-exif-orientation-6": encode(photo, "PNG", exif=with_orientation(6)),
        "jpeg-xmp-orientation-8": encode(photo, "JPEG", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/>'
                                                              b"</x:xmpmeta>"),
        "jpeg-large-draft-scaled": encode(big, "JPEG", quality=90, exif=with_orientation(6)),
        "jpeg-greyscale": encode(photo.convert("L"), "JPEG"),
        "png-rgba": encode(translucent(photo), "PNG"),
        "png-greyscale-alpha": encode(translucent(photo).convert("LA"), "PNG"),
        "png-palette-transparent": encode(photo.convert("P"), "PNG", transparency=3),
        "png-rgb-colour-key": encode(photo, "PNG", transparency=tuple(np.array(photo)[0, 0].tolist())),
        "png-16-bit-12-bit-range": encode(Image.fromarray(np.array(photo.convert("L")).astype(np.uint16) * 16), "PNG"),
        "webp-rgba": encode(translucent(photo), "WEBP", lossless=True),
        "bmp": encode(photo, "BMP"),
    }
    return cases


CASES = _cases()


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", list(CASES))
def test_in_graph_decoder_matches_the_pillow_decoder(name, size, tmp_path):
    import tensorflow as tf

    from tlcli.bundle.savedmodel import decode_image_bytes
    from tlcli.data import images

    data = CASES[name]
    (tmp_path / "image").write_bytes(data)
    ref = images.load_for_model(tmp_path / "image", size)  # what training and predict feed the model
    got = decode_image_bytes(tf.constant(data), size).numpy()
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    # Equal up to the 8-bit rounding of the two resize implementations.
    assert np.abs(got - ref).max() <= 1 / 255 + 1e-6
    assert np.abs(got - ref).mean() < 0.25 / 255


def test_orientation_cases_are_really_different_images():
    """Guards the test above: the orientations must change what Pillow decodes."""
    from tlcli.data import images

    decoded = {n: images.to_model_input(images.decode(CASES[f"jpeg-exif-orientation-{n}"]), 32) for n in range(1, 9)}
    for a in range(1, 9):
        for b in range(a + 1, 9):
            assert np.abs(decoded[a] - decoded[b]).mean() > 10 / 255, (a, b)


def test_bytes_signature_rejects_bytes_that_are_not_an_image(served):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError):
        served.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image at all"]))
