"""One training run over the streamed stage shards, in this process (one rank of a DDP job, or alone).

Shared by the ``train`` pipeline's node (single process) and the torchrun entry point
(``facedetail.pipelines.train.torchrun``). Knows nothing of Kedro; logging goes through callbacks.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from facedetail.data.shards import FaceShards
from facedetail.data.streaming import FaceShardStream, ShardBatches, split_faces, trainable_faces
from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.models.facenet import load_face_embedder
from facedetail.training.distributed import DistContext
from facedetail.training.loop import DetailTrainer, TrainingError
from facedetail.utils import seed_everything


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
    ctx: DistContext, log_metrics=None, log_images=None, set_tags=None,
) -> tuple[pd.DataFrame, dict[str, Any], Any]:
    """Train on the streamed shards in this process (one rank of ``ctx``; a single process when ``world_size == 1``).

    Returns ``(training_history, split, result)``: one row of losses per step, the train/validation
    face ids, and the :class:`~facedetail.training.loop.TrainingResult` (generator, final step, checkpoint).
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
        if ctx.is_main and set_tags is not None:
            set_tags({"facenet_weights": source})
    uv_size = uv_size_of(uv_maps)
    trainer = DetailTrainer(
        face_model, embedder, {**train_params, "seed": seed}, uv_size, ctx.device,
        log_metrics=log_metrics, log_images=log_images, backend=train_params.get("backend", "auto"), distributed=ctx,
    )
    train = streaming_batches(stages, train_ids, train_params, seed, ctx, infinite=True)
    validation = streaming_batches(stages, val_ids, train_params, seed, ctx, infinite=False) if val_ids else None
    result = trainer.fit(train, validation)
    return pd.DataFrame(result.history), {"train": train_ids, "validation": val_ids}, result


