"""Per-face UV maps from fitted coefficients: the expression map and the unwrapped face texture.

:func:`generator_inputs` is THE builder of the detail generator's inputs, shared by the ``uv_maps`` pipeline
(which stores its output) and the inference engine (which feeds it straight to the generator through
:func:`as_generator_tensors`), so a model sees at inference exactly the dtypes and quantisation it trained on:

* ``expression_maps`` (B, 3, S, S) float16 (model units), ``uv_textures`` (B, 3, S, S) uint8,
  ``texture_valid`` (B, 1, S, S) bool, ``expression_valid`` (S, S) bool (numpy arrays, the stored form);
* :func:`as_generator_tensors`: float32 tensors, textures / 255 (as ``FaceTensors.as_float`` in training).
"""
from __future__ import annotations

from typing import Mapping

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
def expression_uv_maps(face_model: FaceModel, expression: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expression maps (B, 3, S, S) = B·β baked into UV (float32, model units) of expression coefficients (B, K_exp),
    and the UV layout's texels (S, S) bool."""
    offsets = face_model.expression_offsets(expression)
    return expression_map(offsets, face_model.triangles, face_model.tri_uv_idx, face_model.uv, size)


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
    exp_maps, exp_valid = expression_uv_maps(face_model, face_model.layout.split(coefficients)["exp"], size)
    screen = fitted_screen_vertices(face_model, coefficients, images.shape[-1])
    texture, visible = unwrap_texture(images, screen, face_model.triangles, face_model.tri_uv_idx, face_model.uv, size, backend=backend)
    return {"expression_maps": exp_maps, "expression_valid": exp_valid, "uv_textures": texture, "texture_valid": visible}


#: Stored dtype of each generator input (the ``uv_maps`` bundle).
GENERATOR_INPUT_DTYPES = {"expression_maps": np.float16, "uv_textures": np.uint8, "texture_valid": np.bool_}


def quantise_uv_maps(maps: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """:func:`face_uv_maps`' float output (all its keys, or some) -> the stored generator inputs (module docstring)."""
    convert = {
        "expression_maps": lambda t: t.cpu().numpy().astype(np.float16),
        "uv_textures": lambda t: (t.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy(),
        "texture_valid": lambda t: t.cpu().numpy() > 0.5,
        "expression_valid": lambda t: t.cpu().numpy().astype(bool),
    }
    return {key: convert[key](value) for key, value in maps.items() if key in convert}


@torch.no_grad()
def generator_inputs(
    face_model: FaceModel,
    coefficients: torch.Tensor,
    images: torch.Tensor,
    size: int,
    backend: str = "auto",
) -> dict[str, np.ndarray]:
    """The detail generator's inputs of a batch of fitted faces, in their stored dtypes.

    Args:
        face_model: the morphable model the coefficients belong to.
        coefficients: (B, K) float32 in ``face_model.layout``.
        images: (B, 3, H, W) aligned crops, uint8 or float in [0, 1] (uint8 is divided by 255).
        size: UV side (the generator's ``uv_size``).
        backend: rasterizer backend for the visibility test.

    Returns:
        ``expression_maps`` float16, ``uv_textures`` uint8, ``texture_valid`` bool, ``expression_valid`` bool.
    """
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return quantise_uv_maps(face_uv_maps(face_model, coefficients, images, size, backend=backend))


def as_generator_tensors(inputs: Mapping[str, np.ndarray | torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Stored generator inputs -> float32 tensors on ``device``: ``uv_textures`` in [0, 1] (uint8 / 255),
    ``texture_valid`` 0/1, ``expression_maps`` float32 (exactly what training feeds the generator); keys that are
    missing are skipped."""
    out = {}
    for key in ("expression_maps", "uv_textures", "texture_valid"):
        if key not in inputs:
            continue
        tensor = torch.as_tensor(np.asarray(inputs[key])).to(device)
        out[key] = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    return out
