"""Nodes of the train pipeline (thin wiring around facedetail.training)."""
from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from facedetail.data.shards import FaceShards
from facedetail.engine.checkpoint import make_detail_checkpoint
from facedetail.data.streaming import FaceShardStream, ShardBatches, split_faces, trainable_faces
from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.models.facenet import load_face_embedder
from facedetail.training.distributed import DistContext, single_process
from facedetail.training.loop import DetailTrainer, TrainingError
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


def streaming_batches(
    stages: tuple[FaceShards, FaceShards, FaceShards, FaceShards], face_ids: list[str], train_params: dict[str, Any], seed: int,
    ctx: DistContext, infinite: bool,
) -> ShardBatches:
    """This rank's batch source over the four stage shards (``train.streaming`` settings, with defaults).

    ``train.streaming``: ``shuffle_buffer`` (faces, default 256), ``num_workers`` (DataLoader
    workers per rank, default 0), ``prefetch_factor`` (default 2), ``split`` (auto|sample|shard),
    ``min_shards_per_consumer`` (default 2).
    """
    settings = dict(train_params.get("streaming") or {})
    stream = FaceShardStream.from_stages(
        *stages, face_ids=face_ids, batch_size=int(train_params["batch_size"]) // ctx.world_size, seed=int(seed),
        shuffle_buffer=int(settings.get("shuffle_buffer", 256)) if infinite else 0, infinite=infinite, rank=ctx.rank,
        world_size=ctx.world_size, split=str(settings.get("split", "auto")), min_shards_per_consumer=int(settings.get("min_shards_per_consumer", 2)),
    )
    return ShardBatches(stream, int(settings.get("num_workers", 0)), int(settings.get("prefetch_factor", 2)))


def uv_size_of(uv_maps: FaceShards) -> int:
    """The UV map side, from the stage meta or else from the first successful face."""
    if uv_maps.meta.get("uv_size"):
        return int(uv_maps.meta["uv_size"])
    for record in uv_maps.iter_faces():
        if record.get("status", "ok") == "ok":
            return int(record["expression_map"].shape[-1])
    raise TrainingError("uv_maps holds no successful face")


def run_training(
    aligned_faces: FaceShards, face_masks: FaceShards, face_coefficients: FaceShards, uv_maps: FaceShards,
    train_params: dict[str, Any], face_model_params: dict[str, Any], weights_params: dict[str, Any], seed: int,
    ctx: DistContext, log_metrics=None, log_images=None,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any], Any]:
    """Train on the streamed shards in this process (one rank of ``ctx``; a single process when ``world_size == 1``).

    Returns ``(detail_model, training_history, split, result)`` (see :func:`train_detail_generator`).
    """
    seed_everything(int(seed))
    stages = (aligned_faces, face_masks, face_coefficients, uv_maps)
    table = trainable_faces(*stages)
    train_ids, val_ids = split_faces(table, float(train_params["validation_fraction"]), int(train_params.get("split_seed", seed)))
    if not train_ids:
        raise TrainingError("no faces to train on: data_prep/estimation produced no usable face (see face_manifest)")
    face_model = load_face_model_from_params(face_model_params, ctx.device)
    embedder = None
    if float(train_params["loss_weights"].get("perceptual", 0.0)) > 0:
        embedder, source = load_face_embedder(weights_params.get("facenet") or None, weights_params["facenet_cache"], ctx.device)
        if ctx.is_main and mlflow.active_run() is not None:
            mlflow.set_tag("facenet_weights", source)
    uv_size = uv_size_of(uv_maps)
    trainer = DetailTrainer(
        face_model, embedder, {**train_params, "seed": seed}, uv_size, ctx.device,
        log_metrics=log_metrics, log_images=log_images, backend=train_params.get("backend", "auto"), distributed=ctx,
    )
    train = streaming_batches(stages, train_ids, train_params, seed, ctx, infinite=True)
    validation = streaming_batches(stages, val_ids, train_params, seed, ctx, infinite=False) if val_ids else None
    result = trainer.fit(train, validation)
    checkpoint = make_detail_checkpoint(result.generator, uv_size, face_model.kind, result.final_step,
                                        float(train_params.get("albedo_blur_sigma", 2.0)))
    return checkpoint, pd.DataFrame(result.history), {"train": train_ids, "validation": val_ids}, result


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
    ``facedetail.training.torchrun_train``.

    Returns:
        ``(detail_model, training_history, split)``: the final checkpoint (generator weights, model
        config, UV size, face model kind, step), one row of losses per step, and the train/validation
        face ids.
    """
    log_metrics, log_images = _mlflow_logging_callbacks()
    checkpoint, history, split, result = run_training(
        aligned_faces, face_masks, face_coefficients, uv_maps, train_params, face_model_params, weights_params, seed,
        single_process(resolve_device(device)), log_metrics, log_images,
    )
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
