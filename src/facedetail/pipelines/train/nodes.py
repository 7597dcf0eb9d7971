"""Nodes of the train pipeline (thin wiring around facedetail.training)."""
from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from facedetail.engine.checkpoint import make_detail_checkpoint
from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.models.facenet import load_face_embedder
from facedetail.training.bundles import assemble_face_tensors
from facedetail.training.loop import DetailTrainer, TrainingError, validation_split
from facedetail.utils import resolve_device, seed_everything

logger = logging.getLogger(__name__)


def _mlflow_logging_callbacks():
    """Metric and image callbacks that log into the active MLflow run (no-ops without one)."""

    def log_metrics(metrics, step):
        if mlflow.active_run() is not None:
            mlflow.log_metrics({f"train.{k}": float(v) for k, v in metrics.items() if np.isfinite(v)}, step=step)

    def log_images(name, image, step):
        if mlflow.active_run() is not None:
            mlflow.log_image(image, artifact_file=f"train/{name}_{step:06d}.png")

    return log_metrics, log_images


def train_detail_generator(
    aligned_faces: dict[str, np.ndarray],
    face_estimates: dict[str, np.ndarray],
    uv_maps: dict[str, np.ndarray],
    train_params: dict[str, Any],
    face_model_params: dict[str, Any],
    weights_params: dict[str, Any],
    device: str,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """Train the detail generator on the training split; evaluate on the validation split.

    Returns:
        ``(detail_model, training_history, split)``: the final checkpoint (generator weights, model
        config, UV size, face model kind, step), one row of losses per step, and the train/validation
        face ids.
    """
    seed_everything(int(seed))
    torch_device = resolve_device(device)
    data = assemble_face_tensors(aligned_faces, face_estimates, uv_maps)
    if len(data) == 0:
        raise TrainingError("no faces to train on: data_prep/estimation produced no usable face (see face_manifest)")
    keys = [str(k) for k in (face_estimates.get("face_sha256", face_estimates["face_ids"]))]
    key_of = dict(zip(face_estimates["face_ids"].tolist(), keys))
    is_val = validation_split([key_of[f] for f in data.face_ids], float(train_params["validation_fraction"]), int(train_params.get("split_seed", seed)))
    train_set = data.subset(np.flatnonzero(~is_val))
    val_set = data.subset(np.flatnonzero(is_val))
    face_model = load_face_model_from_params(face_model_params, torch_device)
    embedder = None
    if float(train_params["loss_weights"].get("perceptual", 0.0)) > 0:
        embedder, source = load_face_embedder(weights_params.get("facenet") or None, weights_params["facenet_cache"], torch_device)
        if mlflow.active_run() is not None:
            mlflow.set_tag("facenet_weights", source)
    log_metrics, log_images = _mlflow_logging_callbacks()
    trainer = DetailTrainer(
        face_model, embedder, {**train_params, "seed": seed}, int(uv_maps["uv_textures"].shape[-1]), torch_device,
        log_metrics=log_metrics, log_images=log_images, backend=train_params.get("backend", "auto"),
    )
    result = trainer.fit(train_set, val_set)
    if mlflow.active_run() is not None and train_params.get("log_checkpoint_artifact", True) and result.checkpoint is not None:
        # the full training state (G, D, optimisers, RNG) of the final step, to resume or fine-tune elsewhere
        mlflow.log_artifact(str(result.checkpoint), artifact_path="train/checkpoint")
    checkpoint = make_detail_checkpoint(result.generator, int(uv_maps["uv_textures"].shape[-1]), face_model.kind, result.final_step,
                                        float(train_params.get("albedo_blur_sigma", 2.0)))
    split = {"train": train_set.face_ids, "validation": val_set.face_ids}
    return checkpoint, pd.DataFrame(result.history), split


def register_model(detail_model: dict[str, Any], train_params: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Register the trained model (pyfunc) in the MLflow model registry under ``train.registered_model_name``."""
    from facedetail.serving import register_detail_model

    if mlflow.active_run() is None:
        logger.warning("no active MLflow run: the model is not registered")
        return {"registered_model_name": train_params["registered_model_name"], "version": None}
    record = register_detail_model(detail_model, parameters, train_params["registered_model_name"])
    logger.info("registered %s version %s (%s)", record["registered_model_name"], record["version"], record["model_uri"])
    return record
