"""Nodes of the uv_maps pipeline (thin: load arrays, call facedetail.geometry, return bundles)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
import torch
from tqdm.auto import tqdm

from facedetail.geometry.face_model import load_face_model_from_params
from facedetail.geometry.face_uv import generator_inputs
from facedetail.io.images import contact_sheet
from facedetail.utils import resolve_device

logger = logging.getLogger(__name__)


def build_uv_maps(
    aligned_faces: dict[str, np.ndarray],
    face_estimates: dict[str, np.ndarray],
    uv_params: dict[str, Any],
    face_model_params: dict[str, Any],
    device: str,
) -> dict[str, np.ndarray]:
    """Expression map and unwrapped texture of every estimated face.

    Args:
        aligned_faces: data_prep bundle (``face_ids``, ``images`` (N,224,224,3) uint8).
        face_estimates: estimation bundle (``face_ids``, ``coefficients`` (M,K), M <= N).
        uv_params: ``uv_maps`` parameters (``uv_size``, ``batch_size``, ``backend``).
        face_model_params: ``face_model`` parameters.
        device: "auto" | "cpu" | "cuda".

    Returns:
        Bundle: ``face_ids`` (M,), ``expression_maps`` (M,3,S,S) float16 (model units),
        ``expression_valid`` (S,S) bool, ``uv_textures`` (M,3,S,S) uint8, ``texture_valid`` (M,1,S,S) bool.
    """
    torch_device = resolve_device(device)
    face_model = load_face_model_from_params(face_model_params, torch_device)
    size, batch_size = int(uv_params["uv_size"]), int(uv_params.get("batch_size", 8))
    row_of = {face_id: i for i, face_id in enumerate(aligned_faces["face_ids"].tolist())}
    face_ids = [str(f) for f in face_estimates["face_ids"].tolist()]
    missing = [f for f in face_ids if f not in row_of]
    if missing:
        raise ValueError(f"face_estimates has faces that aligned_faces lacks (stale bundles?): {missing[:5]}")
    outputs: dict[str, list[np.ndarray]] = {"expression_maps": [], "uv_textures": [], "texture_valid": []}
    valid = np.zeros((size, size), bool)
    starts = range(0, len(face_ids), batch_size)
    for start in tqdm(starts, desc="uv maps", unit="batch", total=len(starts)):
        ids = face_ids[start : start + batch_size]
        images = np.stack([aligned_faces["images"][row_of[f]] for f in ids])
        images_t = torch.from_numpy(images).to(torch_device).permute(0, 3, 1, 2)
        coeffs = torch.from_numpy(np.asarray(face_estimates["coefficients"][start : start + batch_size], np.float32)).to(torch_device)
        maps = generator_inputs(face_model, coeffs, images_t, size, backend=uv_params.get("backend", "auto"))
        for key in outputs:
            outputs[key].append(maps[key])
        valid = maps["expression_valid"]
    shape = {"expression_maps": (0, 3, size, size), "uv_textures": (0, 3, size, size), "texture_valid": (0, 1, size, size)}
    bundle = {k: (np.concatenate(v) if v else np.zeros(shape[k], np.float16 if k == "expression_maps" else np.uint8)) for k, v in outputs.items()}
    logger.info("uv maps: %d faces at %dx%d", len(face_ids), size, size)
    return {"face_ids": np.asarray(face_ids, dtype=str), "expression_valid": valid, **bundle}


def uv_maps_preview(uv_maps: dict[str, np.ndarray], max_faces: int = 12) -> Image.Image:
    """Contact sheet: for each face its unwrapped texture and its expression map (RGB = xyz)."""
    tiles, labels = [], []
    for i, face_id in enumerate(uv_maps["face_ids"][:max_faces].tolist()):
        texture = uv_maps["uv_textures"][i].transpose(1, 2, 0)
        expression = uv_maps["expression_maps"][i].astype(np.float32).transpose(1, 2, 0)
        scale = max(float(np.abs(expression).max()), 1e-6)
        tiles += [texture, ((expression / scale) * 0.5 + 0.5).clip(0, 1).__mul__(255).astype(np.uint8)]
        labels += [f"{face_id} texture", f"{face_id} expression"]
    if not tiles:
        return Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    return Image.fromarray(contact_sheet(tiles, labels, columns=4))
