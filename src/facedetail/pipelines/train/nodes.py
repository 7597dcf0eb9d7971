"""Nodes of the train pipeline (thin wiring around facedetail.training)."""
from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from facedetail.data.shards import FaceShards
from facedetail.training.distributed import single_process
from facedetail.engine.checkpoint import make_detail_checkpoint
from facedetail.training.run import run_training, uv_size_of
from facedetail.utils import resolve_device

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


def _mlflow_set_tags(tags: dict[str, str]) -> None:
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


def detail_model_of(result: Any, uv_maps: FaceShards, face_model_params: dict[str, Any], train_params: dict[str, Any]) -> dict[str, Any]:
    """The ``detail_model`` checkpoint (:func:`facedetail.engine.checkpoint.make_detail_checkpoint`) of a training result."""
    return make_detail_checkpoint(result.generator, uv_size_of(uv_maps), str(face_model_params.get("kind", "ict")).lower(),
                                  result.final_step, float(train_params.get("albedo_blur_sigma", 2.0)))


def train_detail_generator(
    aligned_faces: FaceShards,
    face_masks: FaceShards,
    face_coefficients: FaceShards,
    uv_maps: FaceShards,
    train_params: dict[str, Any],
    face_model_params: dict[str, Any],
    weights_params: dict[str, Any],
    device: str,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """Train the detail generator (single process) on the training split streamed from the four stage shards.

    The split is by content hash (``validation_fraction``) over the faces trainable in all four
    stages; the validation split is evaluated at the end. Multi-process training: see
    ``facedetail.pipelines.train.torchrun``.

    Returns:
        ``(detail_model, training_history, split)``: the final checkpoint (generator weights, model
        config, UV size, face model kind, step), one row of losses per step, and the train/validation
        face ids.
    """
    log_metrics, log_images = _mlflow_logging_callbacks()
    history, split, result = run_training(
        aligned_faces, face_masks, face_coefficients, uv_maps, train_params, face_model_params, weights_params, seed,
        single_process(resolve_device(device)), log_metrics, log_images, _mlflow_set_tags,
    )
    checkpoint = detail_model_of(result, uv_maps, face_model_params, train_params)
    if mlflow.active_run() is not None and train_params.get("log_checkpoint_artifact", True) and result.checkpoint is not None:
        # the full training state (G, D, optimisers, RNG) of the final step, to resume or fine-tune elsewhere
        mlflow.log_artifact(str(result.checkpoint), artifact_path="train/checkpoint")
    return checkpoint, history, split


#: The parameter groups the registered model carries (``params.json`` artifact); each is a ``params:<group>`` node
#: input, so kedro-mlflow logs them once, flattened (a ``parameters`` input would log every group a second time).
MODEL_PARAMETER_GROUPS = ("face_model", "weights", "data_prep", "estimation", "uv_maps", "inference", "device", "seed")


def register_model(
    detail_model: dict[str, Any], training_history: pd.DataFrame, train_split: dict[str, list[str]], train_params: dict[str, Any], face_model: dict[str, Any],
    weights: dict[str, Any], data_prep: dict[str, Any], estimation: dict[str, Any], uv_maps: dict[str, Any],
    inference: dict[str, Any], device: str, seed: int,
) -> dict[str, Any]:
    """Register the trained model (models-from-code pyfunc) under ``train.registered_model_name``, alias ``candidate``.

    Raises:
        facedetail.serving.RegistrationRefused: non-finite generator weights or final training loss (nothing is registered).
    """
    from facedetail.serving import register_detail_model

    if mlflow.active_run() is None:
        logger.warning("no active MLflow run: the model is not registered")
        return {"registered_model_name": train_params["registered_model_name"], "version": None}
    parameters = {"face_model": face_model, "weights": weights, "data_prep": data_prep, "estimation": estimation,
                  "uv_maps": uv_maps, "inference": inference, "device": device, "seed": seed, "train": train_params}
    record = register_detail_model(detail_model, parameters, train_params["registered_model_name"], history=training_history,
                                   split=train_split)
    logger.info("registered %s version %s (%s)", record["registered_model_name"], record["version"], record["model_uri"])
    return record
