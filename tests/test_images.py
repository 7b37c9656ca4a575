"""The one image decoder on every kind of awkward file, each generated with Pillow on the fly:
the exact decoded size and colour, or the exact rejection reason."""

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from tlcli.data import image_files, images
from tlcli.errors import ImageError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
# 3 x 2 cells of distinct colours, so every flip and rotation gives a different picture.
CELLS = np.array([[RED, GREEN, BLUE], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]], np.uint8)

# EXIF orientation -> how the stored pixels must be turned to be upright (EXIF 2.3, tag 0x0112).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def rgb(path, **kw) -> np.ndarray:
    return np.asarray(images.load_rgb(path, **kw))


def rejection(path, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        images.load_rgb(path, **kw)
    return info.value


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def random_rgb(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- colour modes ------------------------------------------------------------------------------

def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=100)
    out = rgb(tmp_path / "print.jpg")
    assert out.shape == (30, 40, 3)
    assert np.abs(out.astype(int) - RED).max() <= 2


def test_cmyk_tiff_converts_exactly(tmp_path):
    img = Image.new("CMYK", (4, 2), (0, 0, 0, 255))
    img.putpixel((0, 0), (0, 255, 255, 0))
    img.putpixel((1, 0), (51, 0, 0, 0))
    img.save(tmp_path / "print.tif")
    out = rgb(tmp_path / "print.tif")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [204, 255, 255]
    assert out[1, 3].tolist() == [0, 0, 0]


def test_rgba_is_composited_onto_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img.save(tmp_path / "alpha.png")
    out = rgb(tmp_path / "alpha.png")
    assert out[0, 0].tolist() == list(WHITE)  # fully transparent: the background
    assert out[0, 1].tolist() == list(BLUE)   # opaque: unchanged
    assert np.abs(out[0, 2].astype(int) - 127).max() <= 1  # half black over white: mid grey


def test_la_is_composited_onto_white(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (0, 255)])
    img.save(tmp_path / "la.png")
    out = rgb(tmp_path / "la.png")
    assert out.tolist() == [[list(WHITE), list(BLACK)]]


def test_palette_with_trns_is_composited_onto_white(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "pal.png", transparency=0)
    assert Image.open(tmp_path / "pal.png").mode == "P"
    out = rgb(tmp_path / "pal.png")
    assert out[0, 0].tolist() == list(WHITE)  # index 0 is transparent black
    assert out[1, 1].tolist() == list(GREEN)


def test_rgb_png_with_trns_colour_is_composited_onto_white(tmp_path):
    img = Image.new("RGB", (2, 1), RED)
    img.putpixel((1, 0), BLUE)
    img.save(tmp_path / "key.png", transparency=RED)
    assert rgb(tmp_path / "key.png").tolist() == [[list(WHITE), list(BLUE)]]


def test_one_bit_image_becomes_black_and_white(tmp_path):
    img = Image.new("1", (4, 1), 0)
    img.putpixel((1, 0), 1)
    img.putpixel((3, 0), 1)
    img.save(tmp_path / "bits.png")
    out = rgb(tmp_path / "bits.png")
    assert out[..., 0].tolist() == [[0, 255, 0, 255]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def save_16bit(path, values: np.ndarray):
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def test_16bit_grey_using_only_0_to_255_keeps_its_values_exactly(tmp_path):
    values = np.arange(256).reshape(16, 16)
    save_16bit(tmp_path / "scan.png", values)
    out = rgb(tmp_path / "scan.png")
    assert out.shape == (16, 16, 3)
    for c in range(3):
        assert (out[..., c] == values).all()


@pytest.mark.parametrize("top, bits", [(1, 8), (1000, 10), (4000, 12), (16000, 14), (65535, 16)])
def test_16bit_grey_is_scaled_by_the_smallest_bit_depth_holding_its_maximum(tmp_path, top, bits):
    values = np.linspace(0, top, 64).round().reshape(8, 8)
    save_16bit(tmp_path / "scan.png", values)
    expected = np.rint(values * 255.0 / (2 ** bits - 1))
    assert (rgb(tmp_path / "scan.png")[..., 0] == expected).all()


# ---- orientation -------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_in_png(tmp_path, orientation):
    stored = CELLS.repeat(4, 0).repeat(4, 1)  # 8 x 12 pixels
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif(orientation))
    assert Image.open(tmp_path / "o.png").getexif()[0x0112] == orientation  # an eXIf chunk
    out = rgb(tmp_path / "o.png")
    assert np.array_equal(out, UPRIGHT[orientation](stored))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_in_jpeg(tmp_path, orientation):
    cell = 16
    stored = CELLS.repeat(cell, 0).repeat(cell, 1)  # 32 x 48 pixels
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif(orientation), quality=95)
    out = rgb(tmp_path / "o.jpg")
    expected_cells = UPRIGHT[orientation](CELLS)
    assert out.shape[:2] == (expected_cells.shape[0] * cell, expected_cells.shape[1] * cell)
    centres = out[cell // 2::cell, cell // 2::cell].astype(int)
    assert np.abs(centres - expected_cells).max() <= 12


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_2x1_image_with_orientation_8_comes_out_1x2(tmp_path, fmt):
    img = Image.new("RGB", (2, 1), RED)
    img.putpixel((1, 0), BLUE)
    img.save(tmp_path / f"wide.{fmt}", exif=exif(8))
    decoded = images.load_rgb(tmp_path / f"wide.{fmt}")
    assert decoded.size == (1, 2)
    if fmt == "png":  # lossless: the right-hand pixel is now on top
        assert np.asarray(decoded).tolist() == [[list(BLUE)], [list(RED)]]


def test_damaged_exif_is_ignored_not_rejected(tmp_path):
    broken = b"MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03"  # IFD cut off mid-entry
    Image.new("RGB", (6, 4), GREEN).save(tmp_path / "odd.jpg", exif=b"Exif\x00\x00" + broken, quality=100)
    out = rgb(tmp_path / "odd.jpg")
    assert out.shape == (4, 6, 3)
    assert np.abs(out.astype(int) - GREEN).max() <= 2


# ---- multi-frame and other formats -------------------------------------------------------------

def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 6), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    out = rgb(tmp_path / "anim.gif")
    assert out.shape == (6, 10, 3)
    assert (out == RED).all()


def test_animated_webp_and_apng_use_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (BLUE, RED)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    for name in ("anim.webp", "anim.png"):
        assert Image.open(tmp_path / name).n_frames == 2
        assert (rgb(tmp_path / name) == BLUE).all(), name


def test_multipage_tiff_uses_its_first_page(tmp_path):
    first, second = Image.new("RGB", (20, 10), RED), Image.new("RGB", (30, 30), BLUE)
    first.save(tmp_path / "pages.tif", save_all=True, append_images=[second])
    assert Image.open(tmp_path / "pages.tif").n_frames == 2
    out = rgb(tmp_path / "pages.tif")
    assert out.shape == (10, 20, 3) and (out == RED).all()


def test_mpo_uses_its_first_image_and_draft_mode(tmp_path):
    left, right = Image.new("RGB", (640, 480), RED), Image.new("RGB", (640, 480), BLUE)
    left.save(tmp_path / "stereo.mpo", save_all=True, append_images=[right])
    assert Image.open(tmp_path / "stereo.mpo").format == "MPO"
    out = rgb(tmp_path / "stereo.mpo", min_size=64)
    assert out.shape == (120, 160, 3)  # decoded at 1/4 scale
    assert np.abs(out.astype(int) - RED).max() <= 2


def test_lossless_webp_decodes_exactly(tmp_path):
    src = random_rgb(12, 7)
    src.save(tmp_path / "photo.webp", lossless=True)
    assert np.array_equal(rgb(tmp_path / "photo.webp"), np.asarray(src))


def test_files_are_decoded_by_content_not_extension(tmp_path):
    src = random_rgb(9, 5)
    src.save(tmp_path / "really-a-png.jpg", format="PNG")
    assert np.array_equal(rgb(tmp_path / "really-a-png.jpg"), np.asarray(src))


# ---- rejections --------------------------------------------------------------------------------

@pytest.mark.parametrize("min_size", [None, 32])  # draft mode must not hide the truncation
def test_truncated_jpeg_is_rejected_as_truncated(tmp_path, min_size):
    random_rgb(400, 300).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    for keep in (len(data) // 2, len(data) - 2, 200):  # mid-scan, only EOI lost, mid-header
        (tmp_path / "cut.jpg").write_bytes(data[:keep])
        err = rejection(tmp_path / "cut.jpg", min_size=min_size)
        assert err.reason == image_files.TRUNCATED, (keep, err)
        assert err.path == str(tmp_path / "cut.jpg")


def test_truncated_png_is_rejected_as_truncated(tmp_path):
    random_rgb(200, 100).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    for keep in (len(data) // 2, 60, 30):  # inside the pixel data, the IHDR, the signature chunk
        (tmp_path / "cut.png").write_bytes(data[:keep])
        assert rejection(tmp_path / "cut.png").reason == image_files.TRUNCATED, keep


def test_damaged_png_data_is_corrupt_not_truncated(tmp_path):
    random_rgb(200, 100).save(tmp_path / "full.png")
    data = bytearray((tmp_path / "full.png").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert rejection(tmp_path / "bad.png").reason == image_files.CORRUPT


def test_truncated_webp_is_rejected_as_truncated(tmp_path):
    random_rgb(64, 64).save(tmp_path / "full.webp")
    data = (tmp_path / "full.webp").read_bytes()
    (tmp_path / "cut.webp").write_bytes(data[:len(data) // 2])
    assert rejection(tmp_path / "cut.webp").reason == image_files.TRUNCATED


def test_zero_byte_file_is_rejected(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    err = rejection(tmp_path / "empty.jpg")
    assert err.reason == image_files.ZERO_BYTES
    assert str(err) == f"{tmp_path / 'empty.jpg'}: zero bytes"


def test_non_images_named_jpg_are_rejected(tmp_path):
    (tmp_path / "notes.jpg").write_text("shopping list: eggs, milk\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # what a Word document is
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document/>")
    (tmp_path / "report.jpg").write_bytes(buf.getvalue())
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(2048))
    (tmp_path / "photo.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    details = {"notes.jpg": "text", "report.jpg": "a ZIP archive (Word and other Office documents are ZIPs)",
               "photo.jpg": "an HTML page (a failed download?)", ".DS_Store": ""}
    for name, detail in details.items():
        err = rejection(tmp_path / name)
        assert (err.reason, err.detail) == (image_files.NOT_AN_IMAGE, detail), name


def test_heic_is_unsupported_with_the_fix(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    err = rejection(tmp_path / "IMG_0001.HEIC")
    assert err.reason == image_files.UNSUPPORTED
    assert "HEIC" in err.detail and "convert" in err.detail


def test_missing_file_is_unreadable(tmp_path):
    err = rejection(tmp_path / "gone.jpg")
    assert err.reason == image_files.UNREADABLE
    assert "No such file" in err.detail


def pixel_bomb(path, width=100_000, height=100_000):
    """A 70-byte PNG that claims 10 gigapixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    return path


def test_pixel_bomb_is_rejected_before_decoding(tmp_path):
    bomb = pixel_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100
    err = rejection(bomb)
    assert err.reason == image_files.OVER_PIXEL_LIMIT
    assert "100000x100000" in err.detail and "--max-pixels" in err.detail


def test_max_pixels_is_the_limit(tmp_path):
    Image.new("RGB", (100, 100), RED).save(tmp_path / "square.png")
    assert rejection(tmp_path / "square.png", max_pixels=9_999).reason == image_files.OVER_PIXEL_LIMIT
    assert rgb(tmp_path / "square.png", max_pixels=10_000).shape == (100, 100, 3)


def test_jpeg_draft_decodes_at_reduced_scale_and_the_limit_counts_decoded_pixels(tmp_path):
    random_rgb(800, 600).save(tmp_path / "big.jpg", quality=90)
    small = images.load_rgb(tmp_path / "big.jpg", min_size=64, max_pixels=20_000)
    assert small.size == (100, 75)  # 1/8 scale keeps both sides >= 64
    assert images.load_rgb(tmp_path / "big.jpg", min_size=100).size == (200, 150)  # 1/4 scale
    assert rejection(tmp_path / "big.jpg", max_pixels=20_000).reason == image_files.OVER_PIXEL_LIMIT


# ---- entry points ------------------------------------------------------------------------------

def test_load_for_model_is_float32_in_unit_range_at_the_model_size(tmp_path):
    Image.new("RGB", (50, 20), (0, 128, 255)).save(tmp_path / "x.png")
    x = images.load_for_model(tmp_path / "x.png", 16)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert np.allclose(x[0, 0], [0.0, 128 / 255, 1.0])


def test_check_returns_the_bytes_or_the_error(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_text("nope")
    data, err = images.check(tmp_path / "ok.png", size=8)
    assert err is None and data == (tmp_path / "ok.png").read_bytes()
    data, err = images.check(tmp_path / "bad.jpg", size=8)
    assert data is None and err.reason == image_files.NOT_AN_IMAGE


def test_training_pipeline_and_prediction_preprocess_identically(tmp_path):
    """data.image_dataset (training, feature extraction) yields exactly images.load_for_model
    (prediction, export calibration) for every kind of file."""
    from tlcli import data

    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    random_rgb(640, 480, seed=3).save(tmp_path / "big.jpg", exif=exif(6), quality=85)
    rgba = Image.new("RGBA", (30, 30), (0, 0, 255, 100))
    rgba.save(tmp_path / "alpha.png")
    save_16bit(tmp_path / "deep.png", np.linspace(0, 3000, 900).reshape(30, 30))
    random_rgb(33, 17, seed=4).save(tmp_path / "odd.webp")
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    batches = list(data.image_dataset(paths, 24, batch_size=2).as_numpy_iterator())
    pipeline = np.concatenate(batches)
    direct = np.stack([images.load_for_model(p, 24) for p in paths])
    assert pipeline.shape == (5, 24, 24, 3) and pipeline.dtype == np.float32
    assert np.array_equal(pipeline, direct)
