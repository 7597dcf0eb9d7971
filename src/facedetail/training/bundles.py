"""Join the per-face bundles of the pipelines (``aligned_faces``, ``face_estimates``, ``uv_maps``) into the
:class:`~facedetail.training.loop.FaceTensors` that training and evaluation read (plain module, no Kedro)."""
from __future__ import annotations

import logging

import numpy as np
import torch

from facedetail.training.loop import FaceTensors, TrainingError

logger = logging.getLogger(__name__)


def assemble_face_tensors(
    aligned_faces: dict[str, np.ndarray], face_estimates: dict[str, np.ndarray], uv_maps: dict[str, np.ndarray]
) -> FaceTensors:
    """Join the three per-face bundles on ``face_ids`` (faces missing from any bundle are dropped, with a warning)."""
    aligned_row = {f: i for i, f in enumerate(aligned_faces["face_ids"].tolist())}
    estimate_row = {f: i for i, f in enumerate(face_estimates["face_ids"].tolist())}
    face_ids = [str(f) for f in uv_maps["face_ids"].tolist() if f in aligned_row and f in estimate_row]
    dropped = len(uv_maps["face_ids"]) - len(face_ids)
    if dropped:
        logger.warning("%d faces of uv_maps lack aligned crops or estimates and are not trained on", dropped)
    uv_row = {f: i for i, f in enumerate(uv_maps["face_ids"].tolist())}
    a = [aligned_row[f] for f in face_ids]
    e = [estimate_row[f] for f in face_ids]
    u = [uv_row[f] for f in face_ids]
    if "masks" not in face_estimates:
        raise TrainingError("face_estimates has no 'masks': rerun the estimation pipeline")
    # Compact dtypes (uint8 images/textures, bool masks, float16 maps); the trainer converts per batch.
    return FaceTensors(
        face_ids,
        torch.from_numpy(np.ascontiguousarray(aligned_faces["images"][a].transpose(0, 3, 1, 2))),
        torch.from_numpy(face_estimates["masks"][e].astype(bool))[:, None],
        torch.from_numpy(face_estimates["coefficients"][e].astype(np.float32)),
        torch.from_numpy(uv_maps["uv_textures"][u]),
        torch.from_numpy(uv_maps["texture_valid"][u].astype(bool)),
        torch.from_numpy(uv_maps["expression_maps"][u]),
    )
