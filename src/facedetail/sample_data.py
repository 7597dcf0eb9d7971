"""Write the built-in sample photos (``python -m facedetail.sample_data [folder]``).

All images derive from ``skimage.data.astronaut()`` (Eileen Collins, NASA photo, public domain), which
ships inside scikit-image, so a fresh clone needs no download. The variants are deterministic:
mirrored, rotated + scaled, recoloured, and a two-face "pair" (original and mirror side by side).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEFAULT_FOLDER = Path("data/01_raw/faces")
JPEG_QUALITY = 85

LICENSE_TEXT = """# Licences of the built-in sample images

Written by `python -m facedetail.sample_data` from `skimage.data.astronaut()`, the portrait of NASA
astronaut Eileen Collins shipped with scikit-image. It is a NASA photograph from the NASA Great Images
database (https://flic.kr/p/r9qvLn): "No known copyright restrictions, released into the public domain"
(docstring of `skimage.data.astronaut`). The variants below are derived by this project and are public
domain as well.

| file | what | licence |
|---|---|---|
| astronaut.jpg | the original 512x512 | public domain (NASA) |
| astronaut_mirrored.jpg | horizontally mirrored | public domain (NASA) |
| astronaut_rotated.jpg | rotated 12 degrees, scaled 0.8 | public domain (NASA) |
| astronaut_recoloured.jpg | warm tint, lower saturation, gamma 1.2 | public domain (NASA) |
| astronaut_pair.jpg | original and mirror side by side, 768x384 (two faces) | public domain (NASA) |
"""


def _astronaut() -> np.ndarray:
    """The scikit-image astronaut, uint8 RGB (512, 512, 3)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., :3])


def _rotated(image: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    """Rotate/scale about the centre, reflecting the border so no black corners appear."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), degrees, scale)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)


def _recoloured(image: np.ndarray) -> np.ndarray:
    """Warm tint, 40 % less saturation and a 1.2 gamma."""
    values = image.astype(np.float32) / 255.0
    gray = values.mean(axis=2, keepdims=True)
    values = gray + 0.6 * (values - gray)
    values = values * np.array([1.08, 1.0, 0.86], dtype=np.float32)
    values = np.clip(values, 0.0, 1.0) ** 1.2
    return np.round(values * 255.0).astype(np.uint8)


def sample_images() -> dict[str, np.ndarray]:
    """The sample images by file name (uint8 RGB)."""
    original = _astronaut()
    mirrored = np.ascontiguousarray(original[:, ::-1])
    pair = cv2.resize(np.concatenate([original, mirrored], axis=1), (768, 384), interpolation=cv2.INTER_AREA)
    return {
        "astronaut.jpg": original,
        "astronaut_mirrored.jpg": mirrored,
        "astronaut_rotated.jpg": _rotated(original, 12.0, 0.8),
        "astronaut_recoloured.jpg": _recoloured(original),
        "astronaut_pair.jpg": pair,
    }


def write_sample(folder: str | Path = DEFAULT_FOLDER) -> list[Path]:
    """Write the sample JPEGs and ``LICENSES.md`` into ``folder``; returns the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in sample_images().items():
        path = folder / name
        Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        written.append(path)
    (folder / "LICENSES.md").write_text(LICENSE_TEXT, encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m facedetail.sample_data [--folder data/01_raw/faces]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER), help="where to write the images")
    arguments = parser.parse_args(argv)
    for path in write_sample(arguments.folder):
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
