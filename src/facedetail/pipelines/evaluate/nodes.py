"""Nodes of the evaluate pipeline (thin wiring around facedetail.evaluation)."""
from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from facedetail.data.shards import FaceShards
from facedetail.data.streaming import FaceShardStream, ShardBatches, trainable_faces
from facedetail.engine.checkpoint import generator_from_checkpoint
from facedetail.evaluation import comparison_figure, evaluate_faces, summarise
from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.models.facenet import load_face_embedder
from facedetail.utils import resolve_device

logger = logging.getLogger(__name__)


def tag_registered_version(model_registration: dict[str, Any], summary: dict[str, float]) -> None:
    """Write the evaluation summary onto the registered model version and move ``champion`` to it if it is better.

    The tags (``evaluate.<metric>``) let versions be compared in the registry; ``champion`` moves only
    when this version beats the current champion (:func:`facedetail.serving.promote_if_better`).
    """
    from facedetail.serving import promote_if_better

    name, version = model_registration.get("registered_model_name"), model_registration.get("version")
    if not name or version in (None, "None") or mlflow.active_run() is None:
        return
    client = mlflow.MlflowClient()
    for key, value in summary.items():
        client.set_model_version_tag(name, str(version), f"evaluate.{key}", f"{value:.6g}")
    if promote_if_better(name, str(version), client):
        logger.info("%s version %s is the new champion", name, version)
    else:
        logger.info("%s version %s does not beat the champion; the alias stays", name, version)


def evaluate_detail_model(
    detail_model: dict[str, Any],
    aligned_faces: FaceShards,
    face_masks: FaceShards,
    face_coefficients: FaceShards,
    uv_maps: FaceShards,
    train_split: dict[str, list[str]],
    model_registration: dict[str, Any],
    evaluate_params: dict[str, Any],
    face_model_params: dict[str, Any],
    weights_params: dict[str, Any],
    device: str,
) -> tuple[pd.DataFrame, Figure, dict[str, dict[str, float]]]:
    """Evaluate on the validation faces (all trainable faces when ``evaluate.faces`` is ``all``), streamed from the shards.

    Returns ``(evaluation_table, evaluation_plot, evaluation_metrics)``.
    """
    torch_device = resolve_device(device)
    stages = (aligned_faces, face_masks, face_coefficients, uv_maps)
    trainable = trainable_faces(*stages)
    every = trainable.loc[trainable["trainable"], "face_id"].tolist()
    wanted = list(train_split.get("validation", [])) if evaluate_params.get("faces", "validation") == "validation" else every
    if not wanted:
        logger.warning("no validation faces: evaluating on the training faces instead (numbers are optimistic)")
        wanted = every
    batches = ShardBatches(FaceShardStream.from_stages(*stages, face_ids=wanted, batch_size=int(evaluate_params.get("batch_size", 8)),
                                                       infinite=False, shuffle_buffer=0)).batches(0)
    index = face_coefficients.index
    nme_of = dict(zip(index["face_id"], index["landmark_nme"].astype(float))) if "landmark_nme" in index else None
    embedder = None
    if evaluate_params.get("facenet", True):
        embedder, _ = load_face_embedder(weights_params.get("facenet") or None, weights_params["facenet_cache"], torch_device)
    table = evaluate_faces(
        generator_from_checkpoint(detail_model, torch_device),
        batches,
        load_face_model_from_params(face_model_params, torch_device),
        embedder,
        torch_device,
        albedo_blur_sigma=float(detail_model.get("albedo_blur_sigma", 2.0)),
        landmark_nme=nme_of,
    )
    summary = summarise(table)
    logger.info("evaluation on %d faces: %s", len(table), {k: round(v, 4) for k, v in summary.items()})
    tag_registered_version(model_registration, summary)
    return table, comparison_figure(table), {k: {"value": v, "step": 0} for k, v in summary.items()}
