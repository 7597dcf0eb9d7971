"""Differentiable triangle-mesh helpers: face and vertex normals."""
from __future__ import annotations

import torch


def _check_vertices_triangles(vertices: torch.Tensor, triangles: torch.Tensor) -> None:
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have shape (B, V, 3), got {tuple(vertices.shape)}")
    if triangles.ndim != 2 or triangles.shape[-1] != 3:
        raise ValueError(f"triangles must have shape (F, 3), got {tuple(triangles.shape)}")


def face_normals(vertices: torch.Tensor, triangles: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Triangle normals ``(v1 - v0) x (v2 - v0)`` (counter-clockwise winding faces the normal).

    Args:
        vertices: (B, V, 3).
        triangles: (F, 3) long vertex indices.
        normalize: unit length if True; otherwise the length is twice the triangle area.

    Returns:
        (B, F, 3).
    """
    _check_vertices_triangles(vertices, triangles)
    v0 = vertices[:, triangles[:, 0]]
    v1 = vertices[:, triangles[:, 1]]
    v2 = vertices[:, triangles[:, 2]]
    normals = torch.cross(v1 - v0, v2 - v0, dim=-1)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12) if normalize else normals


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (sum of unnormalised incident face normals).

    Differentiable with respect to ``vertices``. A vertex used by no triangle gets a zero normal.

    Args:
        vertices: (B, V, 3).
        triangles: (F, 3) long vertex indices.

    Returns:
        (B, V, 3).
    """
    weighted = face_normals(vertices, triangles, normalize=False)  # (B, F, 3)
    batch, n_vertices = vertices.shape[0], vertices.shape[1]
    accumulated = torch.zeros(batch, n_vertices, 3, dtype=vertices.dtype, device=vertices.device)
    for corner in range(3):
        accumulated = accumulated.index_add(1, triangles[:, corner], weighted)
    return torch.nn.functional.normalize(accumulated, dim=-1, eps=1e-12)
