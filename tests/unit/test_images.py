"""Image reading: HEIC orientation and multi-image files, bit depths, alpha, EXIF, errors."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, features

from genlab.data import images
from genlab.data.images import IMAGE_EXTENSIONS, ImageReadError, read_image, resize_to
from tests.conftest import shared_path

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def heif_dir(shared_testdata: Path) -> Path:
    return shared_path(shared_testdata, "pillow_heif")


@pytest.fixture(scope="module")
def arrow(heif_dir: Path) -> Image.Image:
    """The 12-megapixel arrow photo, decoded once for the module."""
    return read_image(heif_dir / "heif_other_arrow.heic")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


# ----------------------------------------------------------------------------------- HEIC/HEIF


def test_heic_orientation_applied_once(arrow: Image.Image) -> None:
    # EXIF says orientation 6 and the file has an irot box; libheif applies irot, so a
    # second (EXIF) rotation would make it landscape
    assert arrow.mode == "RGB"
    assert arrow.size == (3024, 4032)
    gray = pixels(arrow.convert("L").resize((378, 504), Image.Resampling.BOX))
    dark = gray < 80  # the marker lines; the paper and its ruling are lighter
    rows = np.flatnonzero(dark.any(axis=1))
    spans = [np.ptp(np.flatnonzero(r)) if r.any() else 0 for r in dark]
    # the arrow points up: the tip is the topmost mark, near the horizontal centre, and
    # the widest row (the base of the arrow head) lies in the upper half
    tip_columns = np.flatnonzero(dark[rows.min()])
    assert abs(tip_columns.mean() - 378 / 2) < 40
    assert int(np.argmax(spans)) < 504 / 2


@pytest.mark.parametrize(
    "name", ["heif_RGBA_10__29x100.heif", "heif_RGB_12__29x100.heif", "heif_L_10__29x100.heif"]
)
def test_high_bit_depth_heif_scaled_to_8_bit(heif_dir: Path, name: str) -> None:
    img = read_image(heif_dir / name)
    assert img.mode == "RGB"
    assert img.size == (29, 100)
    values = pixels(img)
    assert values.max() > 200  # scaled, not the raw 10/12-bit values
    assert 60 < values.mean() < 220
    assert (values == 255).mean() < 0.5  # not clipped either


def test_10_bit_grayscale_becomes_gray_rgb(heif_dir: Path) -> None:
    values = pixels(read_image(heif_dir / "heif_L_10__29x100.heif"))
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()
    assert len(np.unique(values)) > 20


def test_heif_alpha_composited_onto_background(heif_dir: Path) -> None:
    path = heif_dir / "heif_LA_8__29x100.heif"
    rgba = pixels(read_image(path, mode="RGBA"))
    alpha = rgba[..., 3:] / 255.0
    for background in [(0, 0, 0), (255, 255, 255), (10, 200, 30)]:
        out = pixels(read_image(path, background=background))
        expected = rgba[..., :3] * alpha + np.array(background) * (1 - alpha)
        assert np.abs(out - expected).max() <= 2
        transparent = rgba[..., 3] == 0
        if transparent.any():
            assert (out[transparent] == background).all()
    assert (alpha < 1).any()
    dropped = rgba[..., :3]
    assert np.abs(pixels(read_image(path, background=(0, 0, 0))) - dropped).max() > 10


def test_multi_image_heic_reads_the_primary_image(heif_dir: Path) -> None:
    img = read_image(heif_dir / "heif_zPug_3.heic")  # primary: index 1, 64x64 grayscale
    assert img.mode == "RGB"
    assert img.size == (64, 64)
    values = pixels(img)
    assert (values[..., 0] == values[..., 2]).all()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("heif_corrupted_corrupted.heic", "corrupt"),
        ("heif_corrupted_empty.heic", "empty file (0 bytes)"),
        ("heif_truncated_truncated.heic", "truncated"),
    ],
)
def test_broken_heic_raises_naming_the_file(heif_dir: Path, name: str, problem: str) -> None:
    with pytest.raises(ImageReadError, match=r"\.heic: ") as info:
        read_image(heif_dir / name)
    assert name in str(info.value)
    assert problem in info.value.problem
    assert info.value.path.endswith(name)


def test_truncated_heic_whose_primary_decodes_is_still_rejected(heif_dir: Path) -> None:
    # frame 0 (the primary) decodes; the file is still cut short: the mdat box is incomplete
    with pytest.raises(ImageReadError, match="'mdat' box .* 1 byte short"):
        read_image(heif_dir / "heif_truncated_truncated.heic")


def test_heic_content_with_wrong_extension(heif_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "actually_heic.jpg"
    target.write_bytes((heif_dir / "heif_RGB_8__29x100.heif").read_bytes())
    assert read_image(target).size == (29, 100)


def test_register_heif_is_idempotent_and_thread_safe() -> None:
    threads = [threading.Thread(target=images.register_heif) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    images.register_heif()
    assert images._heif_registered


# -------------------------------------------------------------------------------- JPEG/PNG/WebP


def test_backpack_jpeg(shared_testdata: Path) -> None:
    path = shared_testdata / "dreambooth_backpack" / "00.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    img = read_image(path)
    assert (img.mode, img.size) == ("RGB", (767, 767))
    small = resize_to(img, 64)
    assert (small.mode, small.size) == ("RGB", (64, 64))


def two_colour_image() -> Image.Image:
    """40x20: left half red, right half blue."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    return img


@pytest.mark.parametrize(("suffix", "options"), [(".png", {}), (".webp", {"lossless": True})])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str, options: dict) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # display = stored image rotated 90 degrees clockwise
    path = tmp_path / f"rotated{suffix}"
    two_colour_image().save(path, exif=exif.tobytes(), **options)
    with Image.open(path) as stored:
        assert stored.getexif().get(ORIENTATION) == 6
    img = read_image(path)
    assert img.size == (20, 40)
    values = pixels(img)
    assert tuple(values[2, 10]) == (255, 0, 0)  # the left (red) half is now on top
    assert tuple(values[37, 10]) == (0, 0, 255)


def test_written_heic_with_exif_orientation_is_rotated_once(tmp_path: Path) -> None:
    # pillow-heif stores EXIF orientation 6 as an irot box; libheif applies it on decode
    images.register_heif()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    two_colour_image().save(tmp_path / "rotated.heic", exif=exif.tobytes(), quality=95)
    img = read_image(tmp_path / "rotated.heic")
    assert img.size == (20, 40)
    top, bottom = pixels(img)[2, 10], pixels(img)[37, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_avif_orientation_is_applied(tmp_path: Path) -> None:
    # Pillow's AVIF plugin reports irot/imir as EXIF orientation and leaves pixels as stored
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF support")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    two_colour_image().save(tmp_path / "rotated.avif", exif=exif.tobytes(), quality=100)
    img = read_image(tmp_path / "rotated.avif")
    assert img.size == (20, 40)
    top, bottom = pixels(img)[2, 10], pixels(img)[37, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_16_bit_png_ramp_is_scaled(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 1000).round().astype(np.uint16)
    img16 = Image.fromarray(np.tile(ramp, (4, 1)))
    assert img16.mode == "I;16"
    img16.save(tmp_path / "ramp16.png")
    img = read_image(tmp_path / "ramp16.png")
    assert img.mode == "RGB"
    got = pixels(img)[0, :, 0]
    expected = np.round(ramp / 257.0)
    assert np.abs(got - expected).max() <= 1
    assert got[0] == 0 and got[-1] == 255 and got[500] in (127, 128)


def test_32_bit_integer_image_read_as_16_bit(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 257 * 100, 65535, 70000]], dtype=np.int32), mode="I")
    assert pixels(images._to_8bit(img)).tolist() == [[0, 100, 255, 255]]


@pytest.mark.parametrize(("mode", "bands"), [("RGB;16", 3), ("RGBA;16", 4)])
def test_raw_16_bit_rgb_buffers_are_scaled(mode: str, bands: int) -> None:
    # pillow-heif's HDR buffers; Pillow itself has no such modes, so a stand-in is used
    data = np.repeat(np.array([0, 257, 32896, 65535], dtype="<u2"), bands).reshape(4, 1, bands)
    fake = SimpleNamespace(mode=mode, size=(1, 4), tobytes=data.tobytes)
    out = images._to_8bit(fake)  # type: ignore[arg-type]
    assert out.mode == ("RGB" if bands == 3 else "RGBA")
    assert pixels(out)[:, 0, 0].tolist() == [0, 1, 128, 255]


def test_palette_transparency_composited(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 2, 4))
    img.save(tmp_path / "palette.png", transparency=0)
    values = pixels(read_image(tmp_path / "palette.png", background=(1, 2, 3)))
    assert tuple(values[0, 0]) == (0, 255, 0)
    assert tuple(values[0, 3]) == (1, 2, 3)  # the transparent (red) index


def test_rgba_png_transparent_pixel_becomes_background(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    img.putpixel((1, 0), (200, 100, 50, 0))
    img.save(tmp_path / "alpha.png")
    values = pixels(read_image(tmp_path / "alpha.png", background=(9, 8, 7)))
    assert tuple(values[0, 0]) == (200, 100, 50) and tuple(values[0, 1]) == (9, 8, 7)
    assert read_image(tmp_path / "alpha.png", mode="RGBA").getpixel((1, 0))[3] == 0


def test_grayscale_becomes_rgb_and_png_named_jpg_reads(tmp_path: Path) -> None:
    Image.new("L", (3, 2), 77).save(tmp_path / "gray.jpg", format="PNG")
    img = read_image(tmp_path / "gray.jpg")
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (3, 2), (77, 77, 77))
    assert read_image(tmp_path / "gray.jpg", mode="L").mode == "L"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_raises(tmp_path: Path, fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.img"
    Image.fromarray(noise).save(full, format=fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageReadError, match=f"cut.{fmt.lower()}: truncated or corrupt image"):
        read_image(cut)


def test_missing_not_an_image_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png: not a recognised image format"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match="not a file"):
        read_image(tmp_path)


def test_image_extensions() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif"} <= set(IMAGE_EXTENSIONS)


# -------------------------------------------------------------------------------------- resize


def three_band_image() -> Image.Image:
    """300x100: red, green and blue thirds."""
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    return img


def test_center_crop_keeps_the_middle() -> None:
    out = resize_to(three_band_image(), 32)
    assert out.size == (32, 32)
    assert tuple(pixels(out)[16, 16]) == (0, 255, 0)
    assert pixels(out)[:, 4:28, 1].min() > 240


def test_random_crop_is_reproducible_and_varies() -> None:
    img = three_band_image()
    first = [
        resize_to(img, 16, "random_crop", random.Random(s)).getpixel((8, 8)) for s in range(12)
    ]
    again = [
        resize_to(img, 16, "random_crop", random.Random(s)).getpixel((8, 8)) for s in range(12)
    ]
    assert first == again
    assert len(set(first)) > 1
    assert resize_to(img, 16, "random_crop").size == (16, 16)


def test_resize_squashes_everything_in() -> None:
    out = pixels(resize_to(three_band_image(), 30, "resize"))
    assert out.shape == (30, 30, 3)
    assert tuple(out[15, 2]) == (255, 0, 0) and tuple(out[15, 27]) == (0, 0, 255)


def test_resize_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_to(three_band_image(), 8, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        resize_to(three_band_image(), 0)
