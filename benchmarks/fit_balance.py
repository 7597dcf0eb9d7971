"""Landmark vs prior balance of the 3DMM fit: does fitting the 68 points harder keep shapes plausible?

Faces: every photo under ``../shared/assets/faces`` (all sub-folders), detected, aligned, landmarked (the
default backend: dlib + MediaPipe) and masked once by :class:`facedetail.engine.fitter.FaceFitter`; then each
setting (``estimation.fitting`` overrides) re-fits the same crops, targets and masks. Per setting:

* ``nme``: median fitted-vs-target 68-point error / outer-eye-corner distance (the fit's own residual);
* ``photometric``: median final masked photometric loss (colours in [0, 1]);
* ``id_energy``: median ``sum(id^2)`` of the ICT identity weights, whose prior is N(0, 1) per mode: a face drawn
  from the model has ``n_id`` (100) on average (chi-square, std ~14); far below = shrunk towards the mean face,
  far above = identity bent to explain pose, expression or landmark noise;
* ``exp_energy``: median ``sum(exp^2)``;
* ``shape_mm``: median RMS distance (mm, over the vertices) of the neutral identity shape from the mean face.

Usage (repository root, ~2 min per setting on 2 busy cores)::

    PYTHONPATH=src python benchmarks/fit_balance.py --define 'heavy={"w_landmark": 0.3}' --settings default,heavy
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from facedetail.estimation.estimator import estimate_coefficients  # noqa: E402
from facedetail.estimation.fitting import FitSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "assets" / "faces"
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SETTINGS: dict[str, dict] = {"default": {}, "deng": {"landmark_weights": "deng", "w_landmark": 0.02}}


def identity_shapes(face_model, coefficients: np.ndarray) -> np.ndarray:
    """(N, V, 3) neutral identity shapes (mm) of fitted coefficients."""
    coeffs = torch.as_tensor(coefficients, dtype=torch.float32)
    slices = face_model.layout.slices
    ids = coeffs[:, slices["id"]]
    shape = face_model.shape(ids, torch.zeros(len(coeffs), face_model.layout.n_exp))
    return shape.numpy() * 10.0  # ICT centimetres -> mm


def main(argv: list[str] | None = None) -> None:
    from facedetail.cli import load_project_config
    from facedetail.engine.fitter import FaceFitter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="default")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=JSON")
    args = parser.parse_args(argv)
    for definition in args.define:
        name, _, overrides = definition.partition("=")
        SETTINGS[name] = json.loads(overrides)
    params, _, _ = load_project_config(str(ROOT / "conf"))
    params["device"] = "cpu"
    photos = sorted(p for p in FACES.rglob("*") if p.suffix.lower() in SUFFIXES)
    fitter = FaceFitter.from_params(params, "cpu", cache_dir=None)
    faces = fitter.fit_images([str(p) for p in photos], names=[str(p.relative_to(FACES)) for p in photos], progress=False)
    crops = np.stack([f.aligned for f in faces])
    targets = np.stack([f.landmarks68_detected for f in faces])
    masks = np.stack([f.mask for f in faces])
    print(f"faces={len(faces)}", file=sys.stderr)
    base = dict(params["estimation"]["fitting"])
    rows = []
    for name in args.settings.split(","):
        settings = FitSettings(**{**base, **SETTINGS[name]})
        out = {"coefficients": [], "nme": [], "photometric": []}
        start = time.process_time()
        for first in range(0, len(faces), 32):
            part = slice(first, first + 32)
            fit = estimate_coefficients(fitter.face_model, crops[part], targets[part], masks[part], settings)
            out["coefficients"].append(fit["coefficients"])
            out["nme"].append(fit["losses"]["landmark_nme"])
            out["photometric"].append(fit["losses"]["photometric"])
        seconds = time.process_time() - start
        coefficients = np.concatenate(out["coefficients"])
        slices = fitter.face_model.layout.slices
        ids, exps = coefficients[:, slices["id"]], coefficients[:, slices["exp"]]
        shapes = identity_shapes(fitter.face_model, coefficients)
        mean_face = identity_shapes(fitter.face_model, np.zeros_like(coefficients[:1]))
        shape_mm = np.sqrt(((shapes - mean_face) ** 2).sum(-1).mean(-1))
        rows.append((name, np.median(np.concatenate(out["nme"])), np.median(np.concatenate(out["photometric"])),
                     np.median((ids ** 2).sum(1)), np.median((exps ** 2).sum(1)), np.median(shape_mm), seconds / len(faces)))
    print("| setting | fit NME to its targets (median) | photometric loss (median) | id energy (median; prior mean 100) | exp energy (median) | identity shape from mean face (mm, median) | fit CPU s/face |")
    print("|---|---|---|---|---|---|---|")
    for name, nme, photo, id_energy, exp_energy, shape_mm, seconds in rows:
        print(f"| {name} | {100 * nme:.2f}% | {photo:.4f} | {id_energy:.1f} | {exp_energy:.2f} | {shape_mm:.2f} | {seconds:.3f} |")
    fitter.close()


if __name__ == "__main__":
    main()
