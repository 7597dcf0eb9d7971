"""Nodes of the estimation pipeline: one node per step of the design card's chain, each a shard stage.

aligned_faces -> face_landmarks -> face_masks -> face_coefficients, and aligned_faces ->
facenet_embeddings. Every node builds its stage (facedetail.data.face_stages) and runs it shard by
shard on the run's executor (a Dask cluster by default); a finished shard is never recomputed.
"""
from __future__ import annotations

import logging
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from facedetail.data.execution import run_face_stage
from facedetail.data.face_stages import CoefficientStage, FaceNetStage, LandmarkStage, MaskStage
from facedetail.data.shards import FaceShards
from facedetail.data.stages import shard_inputs
from facedetail.io.images import contact_sheet

logger = logging.getLogger(__name__)


def _counts(stage: str, data: FaceShards) -> dict[str, dict[str, float]]:
    """``{<stage>.faces, <stage>.faces_ok, <stage>.shards_reused}`` in the MlflowMetricsHistoryDataset format."""
    return {
        f"{stage}.faces": {"value": float(len(data)), "step": 0},
        f"{stage}.faces_ok": {"value": float(data.count("ok")), "step": 0},
        f"{stage}.shards_reused": {"value": float(data.meta.get("shards_reused", 0)), "step": 0},
    }


def detect_landmarks(
    aligned_faces: FaceShards, estimation: dict[str, Any], weights: dict[str, Any], device: str, execution: dict[str, Any]
) -> FaceShards:
    """68 iBUG landmarks of every aligned face (``estimation.landmarks.backend``: dlib, MediaPipe or FAN)."""
    stage = LandmarkStage.from_estimation(estimation, device, weights)
    landmarks, _ = run_face_stage(stage, shard_inputs([aligned_faces]), execution)
    return landmarks


def make_face_masks(
    aligned_faces: FaceShards, face_landmarks: FaceShards, estimation: dict[str, Any], weights: dict[str, Any],
    device: str, execution: dict[str, Any],
) -> FaceShards:
    """Photometric mask of every face: BiSeNet when ``weights.bisenet`` exists, else landmarks + skin colour."""
    stage = MaskStage.from_estimation(estimation, weights, device)
    masks, _ = run_face_stage(stage, shard_inputs([aligned_faces, face_landmarks]), execution)
    if mlflow.active_run() is not None:
        mlflow.set_tag("estimation.source.mask", "bisenet" if stage.bisenet_path else "landmarks+skin_gmm")
    return masks


def embed_faces(aligned_faces: FaceShards, estimation: dict[str, Any], weights: dict[str, Any], device: str, execution: dict[str, Any]) -> FaceShards:
    """FaceNet identity embedding of every aligned face."""
    stage = FaceNetStage.from_estimation(estimation, weights, device)
    embeddings, _ = run_face_stage(stage, shard_inputs([aligned_faces]), execution)
    return embeddings


def fit_face_coefficients(
    aligned_faces: FaceShards, face_landmarks: FaceShards, face_masks: FaceShards, estimation: dict[str, Any],
    face_model: dict[str, Any], weights: dict[str, Any], device: str, execution: dict[str, Any],
) -> tuple[FaceShards, pd.DataFrame, dict[str, dict[str, float]]]:
    """3DMM coefficients of every face (ICT/BFM fit or the Deng regressor), cached per face content.

    Returns ``(face_coefficients, estimation_report, estimation_metrics)``: the report has one row
    per face (status, reason, mask source, landmark error, fit loss).
    """
    stage = CoefficientStage.from_estimation(estimation, face_model, weights, device)
    coefficients, _ = run_face_stage(stage, shard_inputs([aligned_faces, face_landmarks, face_masks]), execution,
                                     meta={"face_model_kind": face_model.get("kind", "ict")})
    report = coefficients.index.merge(face_masks.index[["face_id", "mask_source"]], on="face_id", how="left")
    report = report[["face_id", "status", "reason", "mask_source", "landmark_nme", "fit_loss"]]
    metrics = {**_counts("landmarks", face_landmarks), **_counts("masks", face_masks), **_counts("coefficients", coefficients)}
    ok = coefficients.ok()
    if len(ok) and ok["landmark_nme"].notna().any():
        metrics["landmark_nme_median"] = {"value": float(np.nanmedian(ok["landmark_nme"].astype(float))), "step": 0}
    if mlflow.active_run() is not None:
        mlflow.set_tags({"estimation.source.landmarks": str(estimation.get("landmarks", {}).get("backend", "mediapipe")),
                         "estimation.source.coefficients": "deng_regressor" if stage.settings()["regressor"] else f"fitting:{face_model.get('kind', 'ict')}"})
    logger.info("estimation: %d/%d faces with coefficients", len(ok), len(coefficients))
    return coefficients, report, metrics


def estimation_contact_sheet(face_coefficients: FaceShards, face_masks: FaceShards, max_faces: int = 24) -> Image.Image:
    """Fit overlays (shaded mesh, fitted landmarks green, detected red) of the first faces, for MLflow."""
    tiles, labels = [], []
    for number in range(face_coefficients.num_shards):  # shard k of both stages holds the same faces: read shard by shard
        if len(tiles) >= max_faces:
            break
        source = {m["face_id"]: str(m.get("mask_source", "")) for m in face_masks.read(number)} if number < face_masks.num_shards else {}
        for face in face_coefficients.read(number):
            if len(tiles) >= max_faces:
                break
            if face.get("status") == "ok" and face["overlay_jpeg"].size:
                tiles.append(cv2.imdecode(face["overlay_jpeg"], cv2.IMREAD_COLOR)[..., ::-1])
                labels.append(f"{face['face_id']} [{source.get(face['face_id'], '')}]")
    if not tiles:
        return Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    return Image.fromarray(contact_sheet(tiles, labels))
