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


def augmented(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random variant of a photo: maybe mirrored, cropped 80-100 %, rotated +-10 degrees and scaled
    0.9-1.1, colour-jittered (brightness, contrast, saturation, per-channel gain)."""
    if rng.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
    height, width = image.shape[:2]
    keep = rng.uniform(0.8, 1.0)
    crop_h, crop_w = max(16, int(height * keep)), max(16, int(width * keep))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    image = _rotated(image[top : top + crop_h, left : left + crop_w], float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1)))
    values = image.astype(np.float32) / 255.0
    gray = values.mean(axis=2, keepdims=True)
    values = gray + rng.uniform(0.7, 1.3) * (values - gray)                      # saturation
    values = (values - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)  # contrast, brightness
    values = values * rng.uniform(0.92, 1.08, size=3).astype(np.float32)         # white balance
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_augmented_folder(sources: list[str | Path], folder: str | Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` augmented JPEGs made from the photos found (recursively) under ``sources``.

    Used by ``benchmarks/scale.py`` to build face folders of growing size from a few real photos.
    Photo ``i`` is a variant of source ``i mod n`` with its own seeded randomness, so a folder of
    ``count`` photos is the first ``count`` photos of any larger one.
    """
    files = sorted(p for s in sources for p in Path(s).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FileNotFoundError(f"no .jpg/.png photos under {', '.join(str(s) for s in sources)}")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        path = folder / f"aug_{i:06d}_{files[i % len(files)].stem}.jpg"
        if not path.exists():
            Image.fromarray(augmented(images[i % len(images)], rng)).save(path, format="JPEG", quality=90)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m facedetail.sample_data [--folder data/01_raw/faces]``, or
    ``python -m facedetail.sample_data --folder OUT --augment-from DIR [DIR ...] --count N`` for a
    folder of N augmented photos."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER), help="where to write the images")
    parser.add_argument("--augment-from", nargs="+", default=None, help="make --count augmented photos from these folders")
    parser.add_argument("--count", type=int, default=640, help="number of augmented photos")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    if arguments.augment_from:
        written = write_augmented_folder(arguments.augment_from, arguments.folder, arguments.count, arguments.seed)
        print(f"{len(written)} augmented photos in {arguments.folder}")
        return
    for path in write_sample(arguments.folder):
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
