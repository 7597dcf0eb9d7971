"""Nodes of the evaluate pipeline (thin wiring around facedetail.evaluation)."""
from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from facedetail.engine.checkpoint import generator_from_checkpoint
from facedetail.evaluation import comparison_figure, evaluate_faces, summarise
from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.models.facenet import load_face_embedder
from facedetail.training.bundles import assemble_face_tensors
from facedetail.utils import resolve_device

logger = logging.getLogger(__name__)


def tag_registered_version(model_registration: dict[str, Any], summary: dict[str, float]) -> None:
    """Write the evaluation summary onto the registered model version (compare versions in the registry)."""
    name, version = model_registration.get("registered_model_name"), model_registration.get("version")
    if not name or version in (None, "None") or mlflow.active_run() is None:
        return
    client = mlflow.MlflowClient()
    for key, value in summary.items():
        client.set_model_version_tag(name, str(version), f"evaluate.{key}", f"{value:.6g}")


def evaluate_detail_model(
    detail_model: dict[str, Any],
    aligned_faces: dict[str, np.ndarray],
    face_estimates: dict[str, np.ndarray],
    uv_maps: dict[str, np.ndarray],
    train_split: dict[str, list[str]],
    model_registration: dict[str, Any],
    evaluate_params: dict[str, Any],
    face_model_params: dict[str, Any],
    weights_params: dict[str, Any],
    device: str,
) -> tuple[pd.DataFrame, Figure, dict[str, dict[str, float]]]:
    """Evaluate on the validation faces (all faces when ``evaluate.faces`` is ``all``).

    Returns ``(evaluation_table, evaluation_plot, evaluation_metrics)``.
    """
    torch_device = resolve_device(device)
    data = assemble_face_tensors(aligned_faces, face_estimates, uv_maps)
    wanted = set(train_split.get("validation", [])) if evaluate_params.get("faces", "validation") == "validation" else set(data.face_ids)
    if not wanted:
        logger.warning("no validation faces: evaluating on the training faces instead (numbers are optimistic)")
        wanted = set(data.face_ids)
    index = [i for i, f in enumerate(data.face_ids) if f in wanted]
    subset = data.subset(index)
    nme_of = dict(zip(face_estimates["face_ids"].tolist(), face_estimates["landmark_nme"].tolist()))
    embedder = None
    if evaluate_params.get("facenet", True):
        embedder, _ = load_face_embedder(weights_params.get("facenet") or None, weights_params["facenet_cache"], torch_device)
    table = evaluate_faces(
        generator_from_checkpoint(detail_model, torch_device),
        subset,
        load_face_model_from_params(face_model_params, torch_device),
        embedder,
        torch_device,
        albedo_blur_sigma=float(detail_model.get("albedo_blur_sigma", 2.0)),
        landmark_nme=np.array([nme_of[f] for f in subset.face_ids], dtype=np.float32),
    )
    summary = summarise(table)
    logger.info("evaluation on %d faces: %s", len(table), {k: round(v, 4) for k, v in summary.items()})
    tag_registered_version(model_registration, summary)
    return table, comparison_figure(table), {k: {"value": v, "step": 0} for k, v in summary.items()}
