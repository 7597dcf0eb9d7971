"""Nodes of the uv_maps pipeline: per-face expression maps and unwrapped UV textures, shard by shard."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from facedetail.data.execution import run_face_stage
from facedetail.data.face_stages import UVMapStage
from facedetail.data.shards import FaceShards
from facedetail.data.stages import shard_inputs
from facedetail.io.images import contact_sheet

logger = logging.getLogger(__name__)


def build_uv_maps(
    aligned_faces: FaceShards, face_coefficients: FaceShards, uv_params: dict[str, Any], face_model_params: dict[str, Any],
    device: str, execution: dict[str, Any],
) -> FaceShards:
    """Expression map (B·β in UV) and unwrapped texture of every face with coefficients.

    Records: ``expression_map`` (3,S,S) float16 model units, ``uv_texture`` (3,S,S) uint8,
    ``texture_valid`` (1,S,S) bool, ``expression_valid`` (S,S) bool.
    """
    stage = UVMapStage(dict(uv_params), face_model_params, device)
    uv_maps, _ = run_face_stage(stage, shard_inputs([aligned_faces, face_coefficients]), execution, meta={"uv_size": int(uv_params["uv_size"])})
    logger.info("uv maps: %d/%d faces at %dx%d", uv_maps.count("ok"), len(uv_maps), int(uv_params["uv_size"]), int(uv_params["uv_size"]))
    return uv_maps


def uv_maps_preview(uv_maps: FaceShards, max_faces: int = 12) -> Image.Image:
    """Contact sheet: for each of the first faces its unwrapped texture and its expression map (RGB = xyz)."""
    tiles, labels = [], []
    for face in uv_maps.iter_faces():
        if len(labels) >= 2 * max_faces:
            break
        if face.get("status") != "ok":
            continue
        texture = face["uv_texture"].transpose(1, 2, 0)
        expression = face["expression_map"].astype(np.float32).transpose(1, 2, 0)
        scale = max(float(np.abs(expression).max()), 1e-6)
        tiles += [texture, ((expression / scale) * 0.5 + 0.5).clip(0, 1).__mul__(255).astype(np.uint8)]
        labels += [f"{face['face_id']} texture", f"{face['face_id']} expression"]
    if not tiles:
        return Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    return Image.fromarray(contact_sheet(tiles, labels, columns=4))
