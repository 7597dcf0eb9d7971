"""Per-face UV maps from fitted coefficients: the expression map and the unwrapped face texture."""
from __future__ import annotations

import numpy as np
import torch

from facedetail.geometry.camera import transform_and_project
from facedetail.geometry.face_model import FaceModel
from facedetail.geometry.uv import expression_map, unwrap_texture


def fitted_screen_vertices(face_model: FaceModel, coefficients: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """Screen vertices ``(B, V, 3)`` of the fitted meshes in the aligned crop."""
    parts = face_model.layout.split(coefficients)
    camera = face_model.camera if image_size == face_model.camera.image_size else face_model.camera.resized(image_size)
    shape = face_model.shape(parts["id"], parts["exp"])
    screen, _, _ = transform_and_project(shape, parts["angles"], parts["trans"], camera)
    return screen


@torch.no_grad()
def face_uv_maps(
    face_model: FaceModel,
    coefficients: torch.Tensor,
    images: torch.Tensor,
    size: int = 256,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Expression maps and unwrapped textures of a batch of fitted faces.

    Args:
        face_model: the morphable model the coefficients belong to.
        coefficients: (B, K) in ``face_model.layout``.
        images: (B, 3, H, W) aligned crops in [0, 1].
        size: UV map side.
        backend: rasterizer backend for the visibility test.

    Returns:
        ``expression_maps`` (B, 3, S, S) = B·β baked into UV (model units; identity, pose and
        lighting excluded), ``expression_valid`` (S, S) bool, ``uv_textures`` (B, 3, S, S) in [0, 1]
        and ``texture_valid`` (B, 1, S, S) (texels the camera sees; occluded ones are 0).
    """
    parts = face_model.layout.split(coefficients)
    offsets = face_model.expression_offsets(parts["exp"])
    exp_maps, exp_valid = expression_map(offsets, face_model.triangles, face_model.tri_uv_idx, face_model.uv, size)
    screen = fitted_screen_vertices(face_model, coefficients, images.shape[-1])
    texture, visible = unwrap_texture(images, screen, face_model.triangles, face_model.tri_uv_idx, face_model.uv, size, backend=backend)
    return {"expression_maps": exp_maps, "expression_valid": exp_valid, "uv_textures": texture, "texture_valid": visible}


def stored_uv_maps(
    face_model: FaceModel, coefficients: np.ndarray, images: np.ndarray, size: int, backend: str = "auto"
) -> dict[str, np.ndarray]:
    """:func:`face_uv_maps` of uint8 crops, quantised as stored: float16 expression maps, uint8
    textures (round to nearest), bool validity. Training and inference read exactly these dtypes.

    Args:
        coefficients: (B, K) float32; images: (B, H, W, 3) uint8 aligned crops.
    """
    device = face_model.device if hasattr(face_model, "device") else torch.device("cpu")
    images_t = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    coeffs = torch.from_numpy(np.asarray(coefficients, np.float32)).to(device)
    maps = face_uv_maps(face_model, coeffs, images_t, size, backend=backend)
    return {
        "expression_maps": maps["expression_maps"].cpu().numpy().astype(np.float16),
        "expression_valid": maps["expression_valid"].cpu().numpy().astype(bool),
        "uv_textures": (maps["uv_textures"].clamp(0, 1) * 255 + 0.5).byte().cpu().numpy(),
        "texture_valid": maps["texture_valid"].cpu().numpy() > 0.5,
    }
