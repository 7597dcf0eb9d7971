"""Detection rate of the detect-and-align step on the shared photos and on degraded variants of them.

Photos: every image under ``../shared/assets/faces`` (all sub-folders; ``--folder`` to change), each a photo with
at least one clear face. Variants, made in memory (never written into the repository): ``original``,
``grayscale``, Gaussian ``blur2``/``blur4`` (sigma in pixels), ``down0.5``/``down0.25`` (area downscale) and
``rot+20``/``rot-20`` (degrees, same canvas, border replicated). Negatives: skimage's face-free sample images
(coffee, cat, rocket, textures, ...) and the same variants of them, to count false detections.

Two settings are compared: ``before`` (MTCNN only, ``min_probability`` 0.95, no retry, no fallback: the
defaults before issue 11) and ``after`` (``conf/base/parameters_data_prep.yml``'s ``data_prep.detection``).
With ``--sweep``, ``after`` keeps candidates down to 0.5 (no extra detector, no confirmer) and the best candidate
score of every image gives the detection rate for several ``low_confidence_floor`` values (the floor is chosen
where negatives stay at zero).

Usage (from the repository root)::

    python benchmarks/detection.py [--folder DIR] [--limit N] [--variants original,grayscale,...] [--sweep]

Prints a markdown table "detection rate before -> after" per variant (then the floor sweep with ``--sweep``).
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

from facedetail.detect.faces import detector_from_params  # noqa: E402
from facedetail.detect.mtcnn import no_face_status  # noqa: E402
from facedetail.io.images import read_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("original", "grayscale", "blur2", "blur4", "down0.5", "down0.25", "rot+20", "rot-20")
NEGATIVES = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "page", "text", "horse", "moon",
             "clock", "hubble_deep_field", "immunohistochemistry", "colorwheel", "retina", "cell")
FLOORS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def variant(rgb: np.ndarray, name: str) -> np.ndarray:
    """One degraded copy of a uint8 RGB photo."""
    if name == "original":
        return rgb
    if name == "grayscale":
        return np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if name.startswith("blur"):
        sigma = float(name[4:])
        return cv2.GaussianBlur(rgb, (0, 0), sigma)
    if name.startswith("down"):
        factor = float(name[4:])
        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    if name.startswith("rot"):
        angle = float(name[3:])
        height, width = rgb.shape[:2]
        matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
        return cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    raise ValueError(name)


def photos(folder: Path, limit: int | None) -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [(p.relative_to(folder).as_posix(), read_image(p).rgb) for p in files[:limit]]


def negatives() -> list[tuple[str, np.ndarray]]:
    import skimage.data as data

    out = []
    for name in NEGATIVES:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append((name, np.ascontiguousarray(image[..., :3]).astype(np.uint8)))
    return out


def run(detector, images, variants) -> dict[str, list[tuple[int, float, str]]]:
    """Per variant: (faces kept, best kept score or 0, sources, or the no-face status) per image."""
    out: dict[str, list[tuple[int, float, str]]] = {}
    for name in variants:
        rows = []
        for _, rgb in images:
            image = variant(rgb, name)
            result = detector.detect(image)
            faces = result.faces
            if faces:
                sources = ",".join(sorted({f.source + ("(low)" if f.low_confidence else "") for f in faces}))
            else:
                sources = no_face_status(result, image.shape[1], image.shape[0], detector.min_face_size)[0]
            rows.append((len(faces), max((f.score for f in faces), default=0.0), sources))
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(ROOT.parent / "shared" / "assets" / "faces"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sweep", action="store_true",
                        help="'after' keeps candidates down to 0.5 without the extra detector and the confirmer, and the "
                             "low_confidence_floor sweep is printed (how the floor was chosen); default: exactly the conf")
    parser.add_argument("--base", action="store_true",
                        help="also time the conf's detector without the extra detector and the confirmer (their cost)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = args.variants.split(",")
    params = load_project_config(str(ROOT / "conf"))[0]["data_prep"]  # resolved (${env:...} model paths)
    before = detector_from_params({"detection": {k: params["detection"][k] for k in
                                   ("min_face_size", "max_detection_side", "stage_thresholds")} | {"min_probability": 0.95}}, "cpu")
    after_params = dict(params["detection"])
    if args.sweep:  # sweep floors from the scores (a confirmed face is kept whatever its score: no confirmer here)
        after_params.update(low_confidence_floor=min(FLOORS), extra_detector="none", confirmer="none")
    after = detector_from_params({"detection": after_params}, "cpu")
    chosen = float(params["detection"].get("low_confidence_floor", 1.0)) if args.sweep else 0.0
    images, negs = photos(Path(args.folder), args.limit), negatives()
    print(f"{len(images)} photos, {len(negs)} face-free images; chosen low_confidence_floor {chosen}", flush=True)
    def rate(rows, floor=0.0):
        return sum(1 for n, s, _ in rows if n and s >= floor)

    t0 = time.perf_counter()
    b_pos, b_neg = run(before, images, variants), run(before, negs, variants)
    t1 = time.perf_counter()
    a_pos, a_neg = run(after, images, variants), run(after, negs, variants)
    t2 = time.perf_counter()
    if args.base:
        base = detector_from_params({"detection": dict(after_params, extra_detector="none", confirmer="none")}, "cpu")
        base_pos, base_neg = run(base, images, variants), run(base, negs, variants)
        t3 = time.perf_counter()
        print(f"without extra detector and confirmer: {sum(rate(base_pos[v]) for v in variants)} photos with a face, "
              f"{sum(n for v in variants for n, _, _ in base_pos[v])} faces, {sum(rate(base_neg[v]) for v in variants)} "
              f"face-free images with a face; {t3 - t2:.1f} s")

    print("\n| variant | photos with a face, before -> after | faces before -> after | after: photos reported too_small | "
          "false detections (face-free) before -> after | after: sources |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        sources: dict[str, int] = {}
        too_small = sum(1 for n, _, src in a_pos[name] if not n and src == "too_small")
        for n, s, src in a_pos[name]:
            if n and s >= chosen:
                for key in src.split(","):
                    sources[key] = sources.get(key, 0) + 1
        n_after = sum(n for n, s, _ in a_pos[name] if s >= chosen)
        print(f"| {name} | {rate(b_pos[name])}/{len(images)} -> {rate(a_pos[name], chosen)}/{len(images)} | "
              f"{sum(n for n, _, _ in b_pos[name])} -> {n_after} | {too_small} | {rate(b_neg[name])} -> {rate(a_neg[name], chosen)} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(sources.items()))} |")
    if args.sweep:
        print("\nfloor sweep (after, all variants pooled): floor, photos with a face, face-free images with a detection")
        total = len(images) * len(variants)
        for floor in FLOORS:
            print(f"  {floor:.2f}: {sum(rate(a_pos[v], floor) for v in variants)}/{total}, "
                  f"{sum(rate(a_neg[v], floor) for v in variants)}/{len(negs) * len(variants)}")
        print("face-free: highest candidate kept at floor 0.5:", round(max(s for v in variants for _, s, _ in a_neg[v]), 3))
    misses = [(v, images[i][0], a_pos[v][i][2]) for v in variants for i in range(len(images)) if a_pos[v][i][1] < chosen]
    print("after: misses", misses)
    print(f"seconds: before {t1 - t0:.1f}, after {t2 - t1:.1f} ({len(variants) * (len(images) + len(negs))} images each)")


if __name__ == "__main__":
    main()
