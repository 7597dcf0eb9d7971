"""Per-vertex tangent frames from UVs and tangent-space normal maps (what game engines and glTF expect).

Conventions (OBJ UVs, origin bottom-left, v up, as in :mod:`facedetail.geometry.uv`):

* a mesh with UV seams is split into one vertex per (position, uv) pair (:func:`split_uv_vertices`), as
  OBJ importers, glTF and MikkTSpace do;
* the tangent ``T`` follows ``dP/du``, the bitangent ``B = w (N x T)`` follows ``dP/dv`` (v up), ``w = ±1``
  (glTF ``TANGENT.w``; -1 on mirrored UV charts). Tangents are accumulated per triangle corner weighted
  by the corner angle, then Gram-Schmidt-orthogonalised against the vertex normal (MikkTSpace-like);
* a tangent-space normal ``t`` of an object-space normal ``n`` is ``(n·T, n·B, n·N)`` with the interpolated
  frame: the **OpenGL convention** (+X right = +u, +Y up = +v, +Z out of the surface), the one glTF 2.0,
  Blender and Unity use. DirectX/Unreal flip the green channel (``G' = 1 - G``).
"""
from __future__ import annotations

import numpy as np
import torch

from facedetail.geometry.uv import bake_to_uv


def split_uv_vertices(faces: np.ndarray, face_uv_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One vertex per (position index, uv index) pair used by a triangle corner.

    Returns:
        ``(position_index (V',), uv_index (V',), faces (F, 3) into the split vertices)``.
    """
    pairs = np.stack([np.asarray(faces, np.int64).reshape(-1), np.asarray(face_uv_idx, np.int64).reshape(-1)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return unique[:, 0], unique[:, 1], inverse.reshape(-1, 3)


def vertex_tangents(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Per-vertex tangents (V, 4) ``(T, w)`` of a mesh whose vertices each have one uv (split seams first).

    Args:
        vertices: (V, 3) positions; faces: (F, 3); uv: (V, 2) OBJ UVs (v up); normals: (V, 3) unit normals.

    Returns:
        (V, 4) float: unit ``T`` orthogonal to the normal, ``w = ±1`` so that ``w (N x T)`` follows ``+v``.
        Vertices without a usable UV gradient get an arbitrary tangent orthogonal to the normal and ``w = 1``.
    """
    vertices = np.asarray(vertices, np.float64)
    uv = np.asarray(uv, np.float64)
    normals = np.asarray(normals, np.float64)
    faces = np.asarray(faces, np.int64)
    p0, p1, p2 = (vertices[faces[:, k]] for k in range(3))
    t0, t1, t2 = (uv[faces[:, k]] for k in range(3))
    e1, e2 = p1 - p0, p2 - p0
    d1, d2 = t1 - t0, t2 - t0
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-20
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    tangent = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inv  # dP/du
    bitangent = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * inv  # dP/dv
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-20)
    bitangent /= np.maximum(np.linalg.norm(bitangent, axis=1, keepdims=True), 1e-20)
    # corner angles as weights (MikkTSpace weights by angle too)
    corners = ((p0, p1, p2), (p1, p2, p0), (p2, p0, p1))
    acc_t = np.zeros_like(vertices)
    acc_b = np.zeros_like(vertices)
    for k, (a, b, c) in enumerate(corners):
        u, v = b - a, c - a
        cos = (u * v).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1), 1e-20)
        weight = (np.arccos(np.clip(cos, -1.0, 1.0)) * ok)[:, None]
        np.add.at(acc_t, faces[:, k], tangent * weight)
        np.add.at(acc_b, faces[:, k], bitangent * weight)
    t = acc_t - normals * (acc_t * normals).sum(1, keepdims=True)
    length = np.linalg.norm(t, axis=1, keepdims=True)
    fallback = np.cross(normals, np.where(np.abs(normals[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]]))
    t = np.where(length > 1e-12, t / np.maximum(length, 1e-20), fallback)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-20)
    w = np.where((np.cross(normals, t) * acc_b).sum(1) < 0.0, -1.0, 1.0)
    return np.concatenate([t, w[:, None]], axis=1)


def object_to_tangent_normal_map(
    normal_map: np.ndarray,
    valid: np.ndarray,
    vertices: np.ndarray,
    normals: np.ndarray,
    tangents: np.ndarray,
    faces: np.ndarray,
    uv: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-space (OpenGL, +Y = +v) normals of an object-space UV normal map over a (seam-split) mesh.

    The mesh's per-vertex normal and tangent ``(T, w)`` are baked into UV space (barycentric, as a shader
    interpolates them), the frame is re-orthonormalised per texel and the object-space normal is projected.

    Args:
        normal_map: (3, S, S) object-space normals (e.g. :attr:`FaceReconstruction.detailed_normals`).
        valid: (S, S) texels to convert; others become flat ``(0, 0, 1)``.
        vertices, normals, tangents, faces, uv: the split mesh of :func:`split_uv_vertices` with
            :func:`vertex_tangents` (one uv per vertex).

    Returns:
        ``(tangent_map (3, S, S) unit vectors, covered (S, S) bool)``.
    """
    normal_map = np.asarray(normal_map, np.float64)
    size = normal_map.shape[-1]
    values = torch.from_numpy(np.concatenate([np.asarray(normals), np.asarray(tangents)], 1).astype(np.float32))
    faces_t = torch.from_numpy(np.asarray(faces, np.int64))
    baked, covered = bake_to_uv(values, faces_t, faces_t, torch.from_numpy(np.asarray(uv, np.float32)), size)
    baked = baked[0].numpy().astype(np.float64)
    covered = covered.numpy().astype(bool) & np.asarray(valid, bool)
    n_frame = baked[0:3] / np.maximum(np.linalg.norm(baked[0:3], axis=0, keepdims=True), 1e-12)
    t_frame = baked[3:6] - n_frame * (baked[3:6] * n_frame).sum(0, keepdims=True)
    t_frame /= np.maximum(np.linalg.norm(t_frame, axis=0, keepdims=True), 1e-12)
    sign = np.where(baked[6] < 0.0, -1.0, 1.0)
    b_frame = sign[None] * np.cross(n_frame, t_frame, axis=0)
    n = normal_map / np.maximum(np.linalg.norm(normal_map, axis=0, keepdims=True), 1e-12)
    local = np.stack([(n * t_frame).sum(0), (n * b_frame).sum(0), (n * n_frame).sum(0)])
    ok = covered & np.isfinite(local).all(axis=0)
    local = np.where(ok[None], local, np.array([0.0, 0.0, 1.0])[:, None, None])
    local /= np.maximum(np.linalg.norm(local, axis=0, keepdims=True), 1e-12)
    return local, ok
