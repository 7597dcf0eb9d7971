"""Issue 11 item 2: every format Pillow reads, recognised by content; multi-frame files use (and report) frame 1."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from facedetail.engine.inputs import InputError, list_images, load_input_frames
from facedetail.io.images import ImageReadError, is_image_file, read_image

ASTRONAUT = skimage.data.astronaut()  # ships with scikit-image (NASA, public domain)


def _frames(count: int = 3) -> list[Image.Image]:
    """``count`` different frames; frame 0 is the astronaut."""
    first = Image.fromarray(ASTRONAUT)
    return [first] + [Image.fromarray(np.full_like(ASTRONAUT, 40 * k)) for k in range(1, count)]


def _encode(fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    if fmt == "GIF":
        frames = _frames()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif fmt == "TIFF":
        frames = _frames()
        frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    elif fmt == "PGM":
        Image.fromarray(ASTRONAUT).convert("L").save(buffer, format="PPM")
    elif fmt == "PBM":
        Image.fromarray(ASTRONAUT).convert("1").save(buffer, format="PPM")
    elif fmt == "ICO":
        face = Image.fromarray(ASTRONAUT[0:300, 80:380]).resize((256, 256))  # ICO: 256 px at most
        face.save(buffer, format="ICO", sizes=[(256, 256), (32, 32)])
    else:
        Image.fromarray(ASTRONAUT).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, frames, grayscale, side",
    [("PPM", 1, False, 512), ("PGM", 1, True, 512), ("PBM", 1, True, 512), ("GIF", 3, False, 512),
     ("TIFF", 3, False, 512), ("ICO", None, False, 256), ("WEBP", 1, False, 512), ("BMP", 1, False, 512)],
)
def test_formats_decode_by_content_with_frame_counts(tmp_path, fmt, frames, grayscale, side):
    data = _encode(fmt)
    path = tmp_path / "no_extension"  # the name says nothing: the content decides
    path.write_bytes(data)
    assert is_image_file(path)
    loaded = read_image(path)
    assert loaded.rgb.shape == (side, side, 3) and loaded.rgb.dtype == np.uint8
    assert loaded.was_grayscale == grayscale
    if frames is not None:
        assert loaded.frames == frames
        assert (loaded.frames_note != "") == (frames > 1)
    if fmt in ("PPM", "TIFF", "BMP"):  # lossless: the FIRST frame, exactly
        np.testing.assert_array_equal(loaded.rgb, ASTRONAUT)
    if fmt == "GIF":  # palette-quantised first frame: close to the astronaut, not to the grey frames
        assert np.abs(loaded.rgb.astype(int) - ASTRONAUT).mean() < 12


def test_not_an_image_is_recognised_by_content(tmp_path):
    text = tmp_path / "photo.jpg"
    text.write_text("hello")
    assert not is_image_file(text) and not is_image_file(tmp_path)
    with pytest.raises(ImageReadError) as error:
        read_image(text)
    assert error.value.status == "not_an_image" and "Pillow" in error.value.reason


def test_list_images_keeps_every_file_and_needs_one_image(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.ppm").write_bytes(_encode("PPM"))
    (tmp_path / "sub" / "anim.gif").write_bytes(_encode("GIF"))
    (tmp_path / "scan").write_bytes(_encode("TIFF"))  # no extension at all
    (tmp_path / "notes.txt").write_text("not an image: still listed, so it gets a report row")
    files, names = list_images(tmp_path)
    assert names == ["a.ppm", "notes.txt", "scan", "sub/anim.gif"]
    _, frames = load_input_frames(files[2], names[2])
    assert frames == 3
    only_text = tmp_path / "text_only"
    only_text.mkdir()
    (only_text / "LICENSES.md").write_text("no pictures")
    (only_text / "data.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="no images"):
        list_images(only_text)


@pytest.fixture(scope="module")
def detector():
    from facedetail.detect.faces import detector_from_params

    return detector_from_params({"detection": {"retry_window_factors": [0.84, 1.19], "low_confidence_floor": 0.8}}, "cpu")


def test_data_prep_rows_for_every_format(tmp_path, detector):
    """``process_image`` (the data_prep align stage's per-file step): one ok row per format, multi-frame files say
    the first frame was used, a text file gets its not_an_image row."""
    from facedetail.data.face_stages import MANIFEST_COLUMNS, process_image

    params = {"max_image_pixels": 200_000_000, "alignment": {"crop_size": 224, "rescale_factor": 102.0},
              "detection": {"min_probability": 0.95}}
    cases = {"a.ppm": _encode("PPM"), "b.pgm": _encode("PGM"), "anim.gif": _encode("GIF"), "pages.tif": _encode("TIFF"),
             "icon.ico": _encode("ICO"), "unnamed": _encode("PPM"), "readme.txt": b"not an image\n"}
    rows = {}
    for name, data in cases.items():
        manifest_rows, records = process_image(name, str(tmp_path / name), data, name.replace(".", "_"), detector, params)
        assert len(manifest_rows) >= 1 and set(manifest_rows[0]) == set(MANIFEST_COLUMNS)
        rows[name] = manifest_rows[0]
        assert len(records) == sum(row["status"] == "ok" for row in manifest_rows)
    for name in ("a.ppm", "b.pgm", "anim.gif", "pages.tif", "icon.ico", "unnamed"):
        assert rows[name]["status"] == "ok", (name, rows[name]["reason"])
        assert rows[name]["detection_status"] == "ok" and rows[name]["detection_source"].startswith("mtcnn")
    assert rows["anim.gif"]["frames"] == 3 and "first of 3 frames used" in rows["anim.gif"]["reason"]
    assert rows["pages.tif"]["frames"] == 3 and "first of 3 frames used" in rows["pages.tif"]["reason"]
    assert rows["a.ppm"]["frames"] == 1 and "frames" not in rows["a.ppm"]["reason"]
    assert rows["b.pgm"]["grayscale"] is True
    assert rows["readme.txt"]["status"] == "not_an_image" and rows["readme.txt"]["face_id"] == ""
