"""Image reading (PNG/JPEG/WebP/HEIC/HEIF) into 8-bit RGB, and square resizing.

:func:`read_image` identifies the format by content, applies the orientation, brings
16/12/10-bit data to 8 bits by scaling, composites alpha onto a background and always fully
decodes the file, so a truncated or corrupt file raises :class:`ImageReadError` (whose
message names the file and the problem) instead of yielding a half-decoded image.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from genlab.data.errors import DataFileError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "read_image",
    "register_heif",
    "resize_to",
]

#: File extensions of the images genlab reads (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif")

ResizeMode = Literal["center_crop", "random_crop", "resize"]

# Pillow modes holding more than 8 bits per sample -> (numpy dtype of the raw bytes, bands).
# "RGB;16"/"RGBA;16" are pillow-heif's names for its HDR buffers; "I" is 32-bit signed and
# is read as 16-bit data (16-bit PNGs open as "I" in older Pillow versions).
_WIDE_MODES: dict[str, tuple[str, int]] = {
    "I;16": ("<u2", 1),
    "I;16L": ("<u2", 1),
    "I;16B": (">u2", 1),
    "I;16N": ("=u2", 1),
    "I": ("=i4", 1),
    "RGB;16": ("<u2", 3),
    "RGBA;16": ("<u2", 4),
}
_EIGHT_BIT_MODE = {1: "L", 3: "RGB", 4: "RGBA"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# formats whose decoder applies the orientation itself (libheif applies irot/imir); Pillow's
# own AVIF plugin does not: it reports irot/imir as EXIF orientation instead
_SELF_ORIENTING_FORMATS = ("HEIF",)

_heif_lock = threading.Lock()
_heif_registered = False


class ImageReadError(DataFileError):
    """An image file could not be read; the message names the file and the problem."""


def register_heif() -> None:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once; later calls do nothing)."""
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if not _heif_registered:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _heif_registered = True


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_image(
    path: str | os.PathLike[str],
    mode: str = "RGB",
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Read and fully decode an image file into a Pillow image of ``mode``.

    - The format is taken from the content (a PNG named ``.jpg`` still reads).
    - EXIF orientation is applied (``ImageOps.exif_transpose``) except for HEIF, where
      libheif already applies the ``irot``/``imir`` transforms and EXIF orientation must
      be ignored (the HEIF spec says so; applying it too would rotate twice).
    - 16/12/10-bit data (``I;16*``, ``I``, ``RGB;16``, ``RGBA;16``) is scaled to 8 bits
      (``round(v / 257)``), never clipped; ``I`` is taken as 16-bit data.
    - Alpha (RGBA, LA, PA, ``transparency``) is composited onto ``background`` when ``mode``
      has no alpha band (``"RGB"``, ``"L"``); grayscale becomes RGB for ``mode="RGB"``.
    - Multi-image HEIC files yield their primary image.
    - ICC profiles are not applied (pixel values are returned as stored).

    Raises :class:`ImageReadError` for missing, empty, unrecognised, truncated or corrupt
    files (truncated HEIF files are detected from their box structure even when the primary
    image itself decodes).
    """
    _check_file(path)
    register_heif()
    try:
        with open(path, "rb") as fh:
            if _is_isobmff(fh):
                problem = _isobmff_problem(fh, os.fstat(fh.fileno()).st_size)
                if problem is not None:
                    raise ImageReadError(path, f"truncated or corrupt image: {problem}")
        with Image.open(path) as opened:
            opened.load()
        img: Image.Image = opened
    except (ImageReadError, MemoryError):
        raise
    except UnidentifiedImageError as err:
        raise ImageReadError(path, _unidentified_problem(path)) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"image too large: {err}") from err
    except Exception as err:  # Pillow and its plugins raise many types for damaged data
        raise ImageReadError(
            path, f"truncated or corrupt image: {type(err).__name__}: {err}"
        ) from err
    img = _orient(img)
    img = _to_8bit(img)
    return _to_mode(img, mode, background)


def _check_file(path: str | os.PathLike[str]) -> None:
    """Raise for missing paths, directories and empty files."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as err:
        raise ImageReadError(path, f"cannot read file: {err.strerror or err}") from err
    if not p.is_file():
        raise ImageReadError(path, "not a file")
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _is_isobmff(fh: BinaryIO) -> bool:
    """Whether the file starts with an ISO-BMFF ``ftyp`` box (HEIF, AVIF)."""
    head = fh.read(12)
    return len(head) >= 8 and head[4:8] == b"ftyp"


def _isobmff_problem(fh: BinaryIO, file_size: int) -> str | None:
    """Describe a top-level box that runs past the end of the file (a truncated file).

    Only the box headers are read. The walk stops at a box of size 0 ("to the end of the
    file") and at bytes that do not look like a box header (trailing data, left to the
    decoder).
    """
    pos = 0
    while pos + 8 <= file_size:
        fh.seek(pos)
        header = fh.read(16)
        size, kind = struct.unpack(">I4s", header[:8])
        if not all(32 <= byte < 127 for byte in kind):
            return None
        name = kind.decode("ascii")
        if size == 1:
            if len(header) < 16:
                return f"the {name!r} box at byte {pos} has a cut-off header"
            size = struct.unpack(">Q", header[8:16])[0]
        elif size == 0:
            return None
        if size < 8:
            return f"the {name!r} box at byte {pos} has an invalid size {size}"
        if pos + size > file_size:
            missing = pos + size - file_size
            return (
                f"the {name!r} box at byte {pos} needs {size} bytes but the file ends "
                f"{missing} byte{'s' if missing != 1 else ''} short ({file_size} bytes)"
            )
        pos += size
    return None


def _unidentified_problem(path: str | os.PathLike[str]) -> str:
    """Why Pillow could not identify the file (libheif's reason for HEIF files)."""
    with open(path, "rb") as fh:
        is_heif = _is_isobmff(fh)
    if not is_heif:
        return "not a recognised image format (or a corrupt image header)"
    try:
        from pillow_heif import open_heif

        open_heif(path).to_pillow()
    except Exception as err:
        return f"truncated or corrupt HEIF image: {err}"
    return "corrupt HEIF image (libheif opens it, Pillow does not)"  # pragma: no cover


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (not for HEIF, which libheif has already oriented)."""
    if img.format in _SELF_ORIENTING_FORMATS:
        return img
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF: keep the image as stored
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    return ImageOps.exif_transpose(img)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale more-than-8-bit images to 8 bits per sample (``L``, ``RGB`` or ``RGBA``)."""
    if img.mode not in _WIDE_MODES:
        return img
    dtype, bands = _WIDE_MODES[img.mode]
    width, height = img.size
    data = np.frombuffer(img.tobytes(), dtype=dtype)
    data = np.clip(data, 0, 65535).astype(np.uint32)
    data = ((data * 255 + 32767) // 65535).astype(np.uint8)
    shape = (height, width) if bands == 1 else (height, width, bands)
    return Image.fromarray(data.reshape(shape), mode=_EIGHT_BIT_MODE[bands])


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _to_mode(img: Image.Image, mode: str, background: tuple[int, int, int]) -> Image.Image:
    """Convert to ``mode``, compositing alpha onto ``background`` when ``mode`` drops it."""
    if _has_alpha(img) and "A" not in mode and "a" not in mode:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", img.size, (*(int(c) for c in background), 255))
        img = Image.alpha_composite(base, rgba)
    return img if img.mode == mode else img.convert(mode)


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def resize_to(
    img: Image.Image,
    size: int,
    mode: ResizeMode = "center_crop",
    rng: random.Random | None = None,
) -> Image.Image:
    """Return a ``size`` x ``size`` copy of ``img``.

    ``"center_crop"``/``"random_crop"`` scale the shorter side to ``size`` (LANCZOS) and
    crop the longer one (centred, or at an offset drawn from ``rng``, default the ``random``
    module); ``"resize"`` squashes the whole image. The crop is done as the resize's source
    box, so pixels outside it are never resampled.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = img.size
    if mode == "resize":
        box = (0, 0, width, height)
    elif mode in ("center_crop", "random_crop"):
        side = min(width, height)
        if mode == "center_crop":
            left, top = (width - side) // 2, (height - side) // 2
        else:
            randint = rng.randint if rng is not None else random.randint
            left, top = randint(0, width - side), randint(0, height - side)
        box = (left, top, left + side, top + side)
    else:
        raise ValueError(f"unknown resize mode {mode!r} (use center_crop, random_crop or resize)")
    return img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
