"""facedetail.io.images: robust decoding of every awkward input the data_prep pipeline may meet."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from facedetail.io.images import (
    ImageReadError,
    contact_sheet,
    draw_points,
    load_image_rgb,
    read_image,
    save_png,
)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4 % 256, ys * 5 % 256, (xs + ys) * 2 % 256], axis=2).astype(np.uint8)


def test_png_roundtrip_from_path_and_bytes(tmp_path):
    rgb = _gradient_rgb()
    path = save_png(rgb, tmp_path / "sub" / "gradient.png")
    np.testing.assert_array_equal(load_image_rgb(path), rgb)
    loaded = read_image(path.read_bytes())
    np.testing.assert_array_equal(loaded.rgb, rgb)
    assert (loaded.was_grayscale, loaded.had_alpha, loaded.bit_depth, loaded.exif_transposed) == (False, False, 8, False)
    assert (loaded.width, loaded.height) == (64, 48)


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.status == "empty"
    assert "empty.jpg" in caught.value.reason and "empty" in caught.value.reason


def test_text_file_is_not_an_image():
    with pytest.raises(ImageReadError) as caught:
        read_image(b"name,age\nada,36\n")
    assert caught.value.status == "not_an_image"
    assert "not an image" in caught.value.reason


def test_truncated_jpeg_is_unreadable():
    data = _encode(Image.fromarray(_gradient_rgb(200, 200)), "JPEG", quality=95)
    with pytest.raises(ImageReadError) as caught:
        read_image(data[: len(data) // 2])
    assert caught.value.status == "unreadable"
    assert "truncated" in caught.value.reason


def test_png_with_garbage_after_signature_is_unreadable_not_non_image():
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    with pytest.raises(ImageReadError) as caught:
        read_image(data)
    assert caught.value.status == "unreadable"


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(ImageReadError, match="does_not_exist.png"):
        read_image(tmp_path / "does_not_exist.png")


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 after /257
    data = _encode(Image.fromarray(values), "PNG")
    loaded = read_image(data)
    assert loaded.bit_depth == 16 and loaded.was_grayscale
    np.testing.assert_array_equal(loaded.rgb[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(loaded.rgb[..., 0], loaded.rgb[..., 2])


def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    rgb16 = np.zeros((2, 3, 3), dtype=np.uint16)
    rgb16[0, 0] = [65535, 32768, 256]
    rgb16[1, 2] = [1000, 50000, 65280]
    ok, buffer = cv2.imencode(".png", rgb16[..., ::-1])  # OpenCV writes BGR
    assert ok
    loaded = load_image_rgb(buffer.tobytes())
    np.testing.assert_allclose(loaded.astype(int), (rgb16 / 257.0).round().astype(int), atol=1)


def test_grayscale_becomes_three_identical_channels():
    gray = _gradient_rgb()[..., 0]
    loaded = read_image(_encode(Image.fromarray(gray), "PNG"))
    assert loaded.rgb.shape == (48, 64, 3) and loaded.was_grayscale
    for channel in range(3):
        np.testing.assert_array_equal(loaded.rgb[..., channel], gray)


def test_rgb_file_with_equal_channels_is_flagged_grayscale():
    gray = np.repeat(_gradient_rgb()[..., :1], 3, axis=2)
    assert read_image(_encode(Image.fromarray(gray), "PNG")).was_grayscale


def test_rgba_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = [200, 10, 10, 255]  # opaque: unchanged
    rgba[0, 1] = [0, 0, 0, 0]  # transparent: white
    rgba[0, 2] = [0, 100, 200, 128]  # half: 255 + (c - 255) * 128/255
    loaded = read_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert loaded.had_alpha and not loaded.was_grayscale
    expected_half = np.round(np.array([0, 100, 200]) * 128 / 255 + 255 * (1 - 128 / 255))
    np.testing.assert_array_equal(loaded.rgb[0, 0], [200, 10, 10])
    np.testing.assert_array_equal(loaded.rgb[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(loaded.rgb[0, 2], expected_half)


def test_gray_alpha_and_palette_images():
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    loaded = read_image(_encode(la, "PNG"))
    assert loaded.was_grayscale and loaded.had_alpha
    np.testing.assert_array_equal(loaded.rgb[0, :, 0], [50, 255])
    palette_image = Image.fromarray(_gradient_rgb()).convert("P", palette=Image.ADAPTIVE, colors=16)
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(load_image_rgb(_encode(palette_image, "PNG")), expected)


def test_exif_orientation_is_applied():
    # stored 40 wide x 20 high: left half red, right half blue; orientation 6 = display rotated 90 deg clockwise
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = [255, 0, 0]
    stored[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = read_image(_encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif))
    assert loaded.exif_transposed
    assert loaded.rgb.shape == (40, 20, 3)  # now 20 wide x 40 high
    top, bottom = loaded.rgb[5:15].reshape(-1, 3).mean(0), loaded.rgb[25:35].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is displayed on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_huge_image_loads(tmp_path):
    huge = np.zeros((6000, 8000, 3), dtype=np.uint8)
    huge[::50] = 255
    path = tmp_path / "huge.png"
    Image.fromarray(huge).save(path, compress_level=1)
    loaded = load_image_rgb(path)
    assert loaded.shape == (6000, 8000, 3)
    assert loaded[0, 0, 0] == 255 and loaded[1, 0, 0] == 0


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the decompression-bomb shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(15000, 15000), (30000, 30000)])
def test_decompression_bomb_is_refused(width, height):
    with pytest.raises(ImageReadError) as caught:
        read_image(_png_header_only(width, height))
    assert caught.value.status == "too_large"
    assert "decompression bomb" in caught.value.reason


def test_draw_points_and_contact_sheet():
    base = np.zeros((30, 30, 3), dtype=np.uint8)
    dotted = draw_points(base, np.array([[10.0, 20.0]]), radius=2, colors=[(255, 0, 0)])
    assert tuple(dotted[20, 10]) == (255, 0, 0) and tuple(dotted[5, 5]) == (0, 0, 0)
    assert base.max() == 0  # input untouched
    sheet = contact_sheet([base, dotted, base], ["a", "b", "c"], tile_size=32, label_height=10)
    assert sheet.dtype == np.uint8 and sheet.shape == (2 * 42, 2 * 32, 3)
    assert contact_sheet([], None, tile_size=16).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="labels"):
        contact_sheet([base], ["a", "b"])


# ---------------------------------------------------------------------------------------------- OS errors are reasons


def _unreadable(monkeypatch, victim: Path, error: OSError) -> None:
    real = Path.read_bytes

    def read_bytes(self):
        if self == victim:
            raise error
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize(("kind", "expected"), [
    ("dangling", "broken symbolic link (its target"),
    ("loop", "symbolic link loop"),
    ("permission", "permission denied"),
    ("io", "cannot read (OSError: Input/output error)"),
    ("missing", "file does not exist"),
])
def test_os_errors_become_an_unreadable_reason(tmp_path, monkeypatch, kind, expected):
    import errno

    path = tmp_path / "u.jpg"
    if kind == "dangling":
        path.symlink_to(tmp_path / "gone.jpg")
    elif kind == "loop":
        path.symlink_to(path)
    elif kind in ("permission", "io"):
        path.write_bytes(b"\xff\xd8\xff")
        path.chmod(0)  # as root the mode alone does not stop reads: the read itself is made to fail too
        _unreadable(monkeypatch, path, PermissionError(errno.EACCES, "Permission denied") if kind == "permission"
                    else OSError(errno.EIO, "Input/output error"))
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.status == "unreadable"
    assert caught.value.reason.startswith(f"{path}: {expected}"), caught.value.reason
