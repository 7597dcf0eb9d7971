"""Nodes of the estimation pipeline (thin wiring around facedetail.estimation.estimator)."""
from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
import numpy as np
from PIL import Image
import pandas as pd

from facedetail.detect.align import aligned_to_original
from facedetail.estimation.estimator import FaceEstimator
from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.io.images import contact_sheet
from facedetail.models.facenet import load_face_embedder
from facedetail.utils import resolve_device, settings_hash

logger = logging.getLogger(__name__)


def estimate_faces(
    aligned_faces: dict[str, np.ndarray],
    estimation_params: dict[str, Any],
    face_model_params: dict[str, Any],
    weights_params: dict[str, Any],
    device: str,
) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict[str, dict[str, float]]]:
    """Landmarks, mask, coefficients (and FaceNet embedding) of every aligned face, cached per face.

    Returns:
        ``(face_estimates, estimation_report, estimation_metrics)``: the bundle of the faces that
        succeeded, one report row per face (status, reason, mask source, landmark error), and
        counts/timings for MLflow.
    """
    tic = time.perf_counter()
    torch_device = resolve_device(device)
    face_model = load_face_model_from_params(face_model_params, torch_device)
    embedder = None
    if estimation_params.get("facenet_embeddings", True):
        embedder, _ = load_face_embedder(weights_params.get("facenet") or None, weights_params["facenet_cache"], torch_device)
    model_path = face_model_params["ict_path"] if face_model.kind == "ict" else face_model_params["bfm_path"]
    with FaceEstimator(
        face_model, torch_device, estimation_params, weights_params,
        cache_root=estimation_params.get("cache_dir") if estimation_params.get("cache", True) else None,
        embedder=embedder, face_model_id=f"{face_model.kind}:{settings_hash(str(model_path))}",
    ) as estimator:
        result = estimator.estimate(
            aligned_faces["images"], [str(f) for f in aligned_faces["face_ids"]], [str(s) for s in aligned_faces["face_sha256"]]
        )
        sources = estimator.sources
    result.arrays["fitted_landmarks68_original"] = landmarks_in_original_images(aligned_faces, result.arrays)
    if mlflow.active_run() is not None:
        mlflow.set_tags({f"estimation.source.{k}": v for k, v in sources.items()})
    report = pd.DataFrame(result.report, columns=["face_id", "status", "reason", "mask_source", "landmark_nme", "fit_loss"])
    seconds = time.perf_counter() - tic
    n_ok = int((report["status"] == "ok").sum()) if len(report) else 0
    metrics = {
        "faces": {"value": float(len(report)), "step": 0},
        "faces_ok": {"value": float(n_ok), "step": 0},
        "cache_hits": {"value": float(result.cache_hits), "step": 0},
        "seconds": {"value": float(seconds), "step": 0},
    }
    if n_ok:
        metrics["landmark_nme_median"] = {"value": float(np.nanmedian(result.arrays["landmark_nme"])), "step": 0}
    logger.info("estimation: %d/%d faces ok, %d cached, %.1f s", n_ok, len(report), result.cache_hits, seconds)
    return result.arrays, report, metrics


def landmarks_in_original_images(aligned_faces: dict[str, np.ndarray], estimates: dict[str, np.ndarray]) -> np.ndarray:
    """The fitted mesh's 68 landmarks mapped from the aligned crop back to each original photo (N, 68, 2)."""
    row_of = {f: i for i, f in enumerate(aligned_faces["face_ids"].tolist())}
    mapped = [
        aligned_to_original(points, aligned_faces["trans_params"][row_of[face_id]], aligned_faces["images"].shape[1])
        for face_id, points in zip(estimates["face_ids"].tolist(), estimates["fitted_landmarks68"])
    ]
    return np.asarray(mapped, np.float32).reshape(-1, 68, 2)


def estimation_contact_sheet(face_estimates: dict[str, np.ndarray], max_faces: int = 24) -> Image.Image:
    """Fit overlays (shaded mesh, fitted landmarks green, detected red) for MLflow."""
    overlays = face_estimates["overlays"][:max_faces]
    if len(overlays) == 0:
        return Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    labels = [f"{f} [{s}]" for f, s in zip(face_estimates["face_ids"][:max_faces], face_estimates["mask_source"][:max_faces])]
    return Image.fromarray(contact_sheet(list(overlays), labels))
