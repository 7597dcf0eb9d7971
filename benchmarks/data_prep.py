"""Benchmark data_prep's per-image work: decode + MTCNN detection + Deng 5-point alignment (224 crops).

Images: ``../shared/assets/faces/celeba_examples`` (falls back to the built-in sample in
``data/01_raw/faces``). One warm-up image, then ``--repeats`` passes over all images; reports the
median pass. The LAST line is ``images_per_second=<x>``.

Usage (from the repository root)::

    python benchmarks/data_prep.py [--device cpu|cuda|auto] [--threads 1] [--repeats 2] [--folder DIR]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from facedetail.detect.align import align_face
from facedetail.detect.mtcnn import MtcnnFaceDetector
from facedetail.io.images import read_image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = REPO_ROOT.parent / "shared" / "assets" / "faces" / "celeba_examples"
SAMPLE_FOLDER = REPO_ROOT / "data" / "01_raw" / "faces"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted)."""
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def process(paths: list[Path], detector: MtcnnFaceDetector) -> int:
    """Decode, detect and align every image; returns the number of aligned faces."""
    faces = 0
    for path in paths:
        loaded = read_image(path)
        for face in detector.detect(loaded.rgb).faces:
            align_face(loaded.rgb, face.landmarks5)
            faces += 1
    return faces


def main() -> None:
    """Parse arguments, run the benchmark, print timings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    folder = arguments.folder or (DEFAULT_FOLDER if DEFAULT_FOLDER.is_dir() else SAMPLE_FOLDER)
    paths = image_files(folder)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    detector = MtcnnFaceDetector(arguments.device)
    process(paths[:1], detector)  # warm-up
    durations = []
    faces = 0
    for _ in range(arguments.repeats):
        start = time.perf_counter()
        faces = process(paths, detector)
        durations.append(time.perf_counter() - start)
    median = statistics.median(durations)
    print(f"folder={folder} images={len(paths)} faces={faces} device={detector.device} threads={arguments.threads}")
    print(f"pass_seconds={[round(d, 3) for d in durations]} ms_per_image={1000 * median / len(paths):.1f}")
    print(f"images_per_second={len(paths) / median:.2f}")


if __name__ == "__main__":
    main()
