"""Rotation from Euler angles, rigid transform and the perspective camera of Deng et al. (2019).

Conventions (shared by the fitting, the renderer and the UV baking):

* Model space: x to the subject's left (image right), y up, z out of the face towards the camera.
* Rotation: ``R = (Rz(z) @ Ry(y) @ Rx(x))^T`` and vertices are rows, ``v_world = v @ R + t``
  (exactly Deng et al.'s ``compute_rotation`` / ``transform``).
* Camera: placed on the +z axis at ``camera_distance`` (model units) looking at the origin;
  camera depth ``z_cam = camera_distance - z_world``.
* Screen: ``x_px = focal * x / z_cam + center``, ``y_px = center - focal * y / z_cam`` (rows grow
  downwards), ``depth = z_cam`` (larger = farther). Pixel coordinates are continuous: pixel
  ``(col i, row j)`` covers ``[i, i+1) x [j, j+1)``, so the crop centre is ``(112, 112)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

#: Deng et al.'s focal length in pixels for a 224x224 crop.
DENG_FOCAL_PX = 1015.0
#: Deng et al.'s principal point (both axes) for a 224x224 crop.
DENG_CENTER_PX = 112.0
#: Deng et al.'s crop size in pixels.
DENG_IMAGE_SIZE = 224
#: Deng et al.'s camera distance in millimetres (10 decimetres in BFM units).
DENG_CAMERA_DISTANCE_MM = 1000.0


@dataclass(frozen=True)
class PerspectiveCamera:
    """A pinhole camera on the +z axis looking at the origin (Deng et al.'s setup).

    Attributes:
        focal: focal length in pixels.
        center: principal point in pixels (same for x and y).
        image_size: square image side in pixels.
        camera_distance: distance of the camera from the model origin, in model units.
    """

    focal: float = DENG_FOCAL_PX
    center: float = DENG_CENTER_PX
    image_size: int = DENG_IMAGE_SIZE
    camera_distance: float = 10.0

    @classmethod
    def for_units(cls, mm_per_unit: float, image_size: int = DENG_IMAGE_SIZE) -> "PerspectiveCamera":
        """Deng et al.'s physical setup (camera 1 m away) for a model measured in ``mm_per_unit``."""
        return cls(camera_distance=DENG_CAMERA_DISTANCE_MM / float(mm_per_unit)).resized(image_size)

    def resized(self, image_size: int) -> "PerspectiveCamera":
        """The same camera for another square image size (focal and centre scale with the side)."""
        scale = float(image_size) / float(self.image_size)
        return replace(self, focal=self.focal * scale, center=self.center * scale, image_size=int(image_size))


def euler_to_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from Euler angles, exactly as Deng et al.

    Args:
        angles: (B, 3) radians (x = pitch, y = yaw, z = roll).

    Returns:
        (B, 3, 3) matrix ``R = (Rz @ Ry @ Rx)^T``, to be applied to row vectors: ``v @ R``.
    """
    if angles.ndim != 2 or angles.shape[-1] != 3:
        raise ValueError(f"angles must have shape (B, 3), got {tuple(angles.shape)}")
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(angles[:, 0]), torch.zeros_like(angles[:, 0])
    cx, cy, cz = cos.unbind(-1)
    sx, sy, sz = sin.unbind(-1)
    rot_x = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).view(-1, 3, 3)
    rot_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rot_z = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).view(-1, 3, 3)
    return (rot_z @ rot_y @ rot_x).transpose(1, 2)


def rigid_transform(vertices: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``vertices @ rotation + translation`` for row-vector points.

    Args:
        vertices: (B, V, 3).
        rotation: (B, 3, 3) from :func:`euler_to_rotation`.
        translation: (B, 3), model units.

    Returns:
        (B, V, 3) world-space vertices (model units, same axes as model space).
    """
    return vertices @ rotation + translation[:, None, :]


def project_to_screen(world_vertices: torch.Tensor, camera: PerspectiveCamera) -> torch.Tensor:
    """Perspective projection of world-space vertices to screen vertices for the rasterizer.

    Args:
        world_vertices: (B, V, 3) after :func:`rigid_transform`, model units.
        camera: the camera (see module docstring for the conventions).

    Returns:
        (B, V, 3) ``(x_px, y_px, depth)``: x right, y down (image rows), depth = camera z in model
        units (positive in front of the camera, larger = farther).
    """
    depth = camera.camera_distance - world_vertices[..., 2]
    safe_depth = torch.where(depth.abs() < 1e-8, torch.full_like(depth, 1e-8), depth)
    x_px = camera.focal * world_vertices[..., 0] / safe_depth + camera.center
    y_px = camera.center - camera.focal * world_vertices[..., 1] / safe_depth
    return torch.stack([x_px, y_px, depth], dim=-1)


def transform_and_project(
    vertices: torch.Tensor, angles: torch.Tensor, translation: torch.Tensor, camera: PerspectiveCamera
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate, translate and project model-space vertices.

    Args:
        vertices: (B, V, 3) model-space vertices (e.g. ``FaceModel.shape``), model units.
        angles: (B, 3) Euler angles in radians.
        translation: (B, 3) translation, model units.
        camera: the camera.

    Returns:
        ``(screen (B, V, 3), world (B, V, 3), rotation (B, 3, 3))``; rotate normals with
        ``normals @ rotation`` before shading.
    """
    rotation = euler_to_rotation(angles)
    world = rigid_transform(vertices, rotation, translation)
    return project_to_screen(world, camera), world, rotation
