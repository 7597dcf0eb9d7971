"""Robust image reading and small image-writing helpers (plain module, no Kedro).

Every reader returns ``uint8`` RGB arrays of shape ``(H, W, 3)`` in display orientation:

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so pixel rows are what a viewer shows;
* grayscale (``L``, ``1``, 16-bit ``I;16``/``I``, float ``F``) becomes 3 identical channels and is
  reported through ``LoadedImage.was_grayscale``;
* alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is composited on a white background;
* 16-bit data is scaled to 8 bits (``round(v / 257)``), never clipped;
* palette (``P``) images are expanded through their palette.

Failures raise :class:`ImageReadError` with a ``status`` (``empty``, ``not_an_image``, ``unreadable``,
``too_large``) and a human-readable reason naming the source.
"""
from __future__ import annotations

import errno
import io
import os
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

# Images above this many pixels are refused as probable decompression bombs (about 200 MP).
DEFAULT_MAX_PIXELS = 200_000_000

# PIL's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that) must not fire
# before ours for legitimate large photos (e.g. 8000x6000 = 48 MP), so it is raised to our limit.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

# Leading bytes of the formats we accept; used to tell "not an image" from "a corrupt image".
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"BM",  # BMP
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
    b"GIF87a",
    b"GIF89a",
    b"\x00\x00\x01\x00",  # ICO
    b"\x00\x00\x02\x00",  # CUR
    *(b"P%d" % k for k in range(1, 8)),  # PBM/PGM/PPM (P1-P6), PAM (P7)
)

_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "La"}


class ImageReadError(ValueError):
    """An input could not be turned into an RGB image.

    Attributes:
        reason: human-readable explanation (names the source and what was expected).
        status: short machine-readable category: ``empty``, ``not_an_image``, ``unreadable``, ``too_large``.
    """

    def __init__(self, reason: str, status: str = "unreadable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and what had to be done to it.

    Attributes:
        rgb: ``uint8`` array ``(H, W, 3)`` in display orientation.
        was_grayscale: the source had a single intensity channel (or three identical channels).
        had_alpha: an alpha channel was composited on white.
        bit_depth: bits per channel of the source (8 or 16; 32 for float/int sources).
        exif_transposed: an EXIF orientation other than "normal" was applied.
        source_mode: the PIL mode of the source (e.g. ``RGB``, ``L``, ``I;16``, ``RGBA``, ``P``).
        source_format: the PIL format name (e.g. ``JPEG``, ``PNG``).
        frames: frames (animation) or pages (multi-page TIFF) of the file; only the FIRST one is decoded.
    """

    rgb: np.ndarray
    was_grayscale: bool
    had_alpha: bool
    bit_depth: int
    exif_transposed: bool
    source_mode: str
    source_format: str
    frames: int = 1

    @property
    def frames_note(self) -> str:
        """``""`` for a single-frame file, else a sentence for report rows (the first frame was used)."""
        return "" if self.frames <= 1 else f"first of {self.frames} frames used"

    @property
    def width(self) -> int:
        """Width in pixels (after EXIF orientation)."""
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        """Height in pixels (after EXIF orientation)."""
        return int(self.rgb.shape[0])


def _read_source(source: str | Path | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    """Return the raw bytes of ``source`` and a name to use in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    path = Path(source)
    try:
        if path.is_dir():
            try:
                os.listdir(path)
            except OSError as error:  # a folder the recursive search could not enter (engine.inputs.list_images)
                raise ImageReadError(f"{path}: folder cannot be read ({error.strerror or error}); the photos in it were "
                                     "skipped (check its permissions)", status="unreadable") from error
            raise ImageReadError(f"{path}: is a directory, expected an image file", status="not_an_image")
        return path.read_bytes(), str(path)
    except ImageReadError:
        raise
    except OSError as error:  # every OS failure of one file is that file's row, never a crash
        raise ImageReadError(_os_error_reason(path, error), status="unreadable") from error


def _os_error_reason(path: Path, error: OSError) -> str:
    """Why ``path`` could not be read, in words (broken link, link loop, permission, I/O error, ...)."""
    if error.errno == errno.ELOOP:
        return f"{path}: symbolic link loop (the link points back to itself)"
    if isinstance(error, FileNotFoundError):
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"{path}: broken symbolic link (its target {target} does not exist)"
        return f"{path}: file does not exist"
    if isinstance(error, PermissionError):
        return f"{path}: permission denied (cannot read the file; check its permissions)"
    return f"{path}: cannot read ({type(error).__name__}: {error.strerror or error})"


def _looks_like_image(data: bytes) -> bool:
    """True when ``data`` starts like one of the image formats we know (JPEG, PNG, BMP, TIFF, GIF, WebP, ICO,
    PBM/PGM/PPM)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(signature) for signature in _IMAGE_SIGNATURES)


def _to_uint8_intensity(image: Image.Image) -> np.ndarray:
    """Convert a single-channel image of any depth (1, L, I;16*, I, F) to ``uint8`` (H, W)."""
    mode = image.mode
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    values = np.asarray(image)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF data arrive as I;16 (or I holding 0..65535): map 0..65535 -> 0..255.
        scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
        return np.round(scaled).astype(np.uint8)
    if mode == "F":
        values = values.astype(np.float64)
        finite_max = float(np.nanmax(values)) if values.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0  # float images are either 0..1 or 0..255
        return np.round(np.clip(np.nan_to_num(values) * scale, 0, 255)).astype(np.uint8)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend ``rgb`` (H, W, 3) uint8 over white using ``alpha`` (H, W) uint8."""
    weight = alpha.astype(np.float32)[..., None] / 255.0
    blended = rgb.astype(np.float32) * weight + 255.0 * (1.0 - weight)
    return np.round(blended).astype(np.uint8)


def _decode(image: Image.Image) -> tuple[np.ndarray, bool, bool, int]:
    """Turn an opened, oriented PIL image into (rgb uint8, was_grayscale, had_alpha, bit_depth)."""
    mode = image.mode
    bit_depth = 16 if mode.startswith("I;16") or mode == "I" else (32 if mode == "F" else 8)
    if mode == "P":
        has_transparency = "transparency" in image.info
        image = image.convert("RGBA" if has_transparency else "RGB")
        mode = image.mode
    if mode in ("LA", "La", "PA"):
        gray_alpha = image.convert("LA")
        intensity = np.asarray(gray_alpha.getchannel("L"), dtype=np.uint8)
        rgb = np.repeat(intensity[..., None], 3, axis=2)
        return _composite_on_white(rgb, np.asarray(gray_alpha.getchannel("A"))), True, True, bit_depth
    if mode in _GRAYSCALE_MODES:
        intensity = _to_uint8_intensity(image)
        return np.repeat(intensity[..., None], 3, axis=2), True, False, bit_depth
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_on_white(rgba[..., :3], rgba[..., 3]), False, True, bit_depth
    rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    return rgb, False, False, bit_depth


def _channels_identical(rgb: np.ndarray) -> bool:
    """True when R, G and B are equal everywhere (a grayscale picture stored as RGB)."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))  # look at <= ~250k pixels
    sample = rgb[::step, ::step].astype(np.int16)
    return bool(np.abs(sample[..., 0] - sample[..., 1]).max(initial=0) <= 1
                and np.abs(sample[..., 1] - sample[..., 2]).max(initial=0) <= 1)


def read_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode an image file (path or raw bytes) into an oriented RGB ``uint8`` array plus facts about it.

    Args:
        source: a file path or the file's bytes.
        max_pixels: images with more pixels are refused (decompression-bomb guard), default ~200 MP.

    Raises:
        ImageReadError: empty input (``status='empty'``), bytes that are not an image (``not_an_image``),
            a corrupt/truncated image (``unreadable``), or one above ``max_pixels`` (``too_large``).
    """
    data, name = _read_source(source)
    if len(data) == 0:
        raise ImageReadError(f"{name}: file is empty (0 bytes), expected an image", status="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"{name}: refused as a possible decompression bomb ({error})", status="too_large") from error
    except UnidentifiedImageError as error:
        if _looks_like_image(data):
            raise ImageReadError(f"{name}: image header is corrupt and cannot be decoded ({error})") from error
        raise ImageReadError(
            f"{name}: not an image (first bytes {data[:8]!r}); expected a format Pillow reads (JPEG, PNG, BMP, "
            "WebP, TIFF, GIF, PPM/PGM/PBM, ICO, ...)",
            status="not_an_image",
        ) from error
    except Exception as error:  # noqa: BLE001 - PIL raises many types for broken headers
        raise ImageReadError(f"{name}: cannot open image ({type(error).__name__}: {error})") from error

    width, height = image.size
    if width * height > max_pixels:
        raise ImageReadError(
            f"{name}: {width}x{height} = {width * height / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit "
            "(possible decompression bomb); downscale it or raise max_pixels",
            status="too_large",
        )
    if width == 0 or height == 0:
        raise ImageReadError(f"{name}: image has zero size {width}x{height}")
    source_mode, source_format = image.mode, image.format or "unknown"
    try:
        frames = max(1, int(getattr(image, "n_frames", 1) or 1))
    except Exception:  # noqa: BLE001 - counting frames of a broken animation must not lose its first frame
        frames = 1
    try:
        if frames > 1:
            image.seek(0)
        image.load()
        orientation = image.getexif().get(0x0112, 1)
        # exif_transpose copies the image; skip it for the (common) upright case to spare memory on huge photos
        oriented = image if orientation in (None, 1) else ImageOps.exif_transpose(image)
        rgb, was_grayscale, had_alpha, bit_depth = _decode(oriented)
    except Exception as error:  # noqa: BLE001 - truncated data raises OSError, others ValueError/SyntaxError
        raise ImageReadError(f"{name}: image data is corrupt or truncated ({type(error).__name__}: {error})") from error
    if not was_grayscale and _channels_identical(rgb):
        was_grayscale = True
    return LoadedImage(
        rgb=np.ascontiguousarray(rgb),
        was_grayscale=was_grayscale,
        had_alpha=had_alpha,
        bit_depth=bit_depth,
        exif_transposed=orientation not in (None, 1),
        source_mode=source_mode,
        source_format=source_format,
        frames=frames,
    )


def is_image_file(path: str | Path) -> bool:
    """True when Pillow recognises the file's content as an image (reads the header only; False on any error)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - not an image, unreadable, a directory, ...
        return False


def load_image_rgb(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image (path or bytes) into a ``uint8`` ``(H, W, 3)`` RGB array; see :func:`read_image`."""
    return read_image(source, max_pixels=max_pixels).rgb


def _as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Validate an image array and return it as ``uint8`` (H, W, 3)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and float(np.nanmax(array, initial=0.0)) <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return array


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write ``image`` ((H, W), (H, W, 3) or (H, W, 4); uint8, or float in [0, 1]) as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_as_uint8_rgb(image)).save(path, format="PNG")
    return path


def draw_points(
    image: np.ndarray,
    points: np.ndarray,
    *,
    radius: float = 2.0,
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` (H, W, 3) with filled dots at ``points`` (N, 2) (x right, y down, pixels)."""
    canvas = Image.fromarray(_as_uint8_rgb(image)[..., :3].copy())
    drawer = ImageDraw.Draw(canvas)
    palette = colors or [(255, 0, 0), (0, 255, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255)]
    for index, (x, y) in enumerate(np.asarray(points, dtype=float).reshape(-1, 2)):
        color = tuple(palette[index % len(palette)])
        drawer.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    return np.asarray(canvas)


def contact_sheet(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    tile_size: int = 160,
    label_height: int = 14,
    background: int = 32,
) -> np.ndarray:
    """Tile images into one ``uint8`` RGB sheet, each resized to ``tile_size`` with an optional label below.

    Args:
        images: sequence of (H, W[, 3]) images (any size; resized to ``tile_size`` x ``tile_size``).
        labels: one text per image (truncated to fit), or None.
        columns: tiles per row (default: about square).
        tile_size: side of each tile in pixels.
        label_height: pixels reserved under each tile for its label (0 when ``labels`` is None).
        background: gray level of the gaps.

    Returns:
        ``uint8`` array (rows * (tile + label), columns * tile, 3). An empty input gives a small blank sheet.
    """
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"contact_sheet got {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        return np.full((tile_size, tile_size, 3), background, dtype=np.uint8)
    columns = columns or int(math.ceil(math.sqrt(len(images))))
    rows = int(math.ceil(len(images) / columns))
    text_height = label_height if labels is not None else 0
    cell_height = tile_size + text_height
    sheet = Image.new("RGB", (columns * tile_size, rows * cell_height), (background,) * 3)
    drawer = ImageDraw.Draw(sheet)
    max_chars = max(1, tile_size // 6)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        tile = Image.fromarray(_as_uint8_rgb(image)[..., :3]).resize((tile_size, tile_size), Image.BILINEAR)
        left, top = column * tile_size, row * cell_height
        sheet.paste(tile, (left, top))
        if labels is not None:
            text = str(labels[index])
            if len(text) > max_chars:
                text = text[: max_chars - 1] + "~"
            drawer.text((left + 2, top + tile_size + 1), text, fill=(230, 230, 230))
    return np.asarray(sheet)
