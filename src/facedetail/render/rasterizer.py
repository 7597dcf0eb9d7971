"""Rasterization and interpolation with a choice of backend (the low layer of :mod:`facedetail.render`).

This layer knows no geometry: :mod:`facedetail.geometry` (UV baking) builds on it, and the shading /
detail renders that use geometry (:mod:`facedetail.render.shading`, :mod:`facedetail.render.detail`)
sit above geometry.

Conventions (shared by every backend, by :mod:`facedetail.geometry.camera` and by
:mod:`facedetail.geometry.uv`):

* **Screen vertices** ``(B, V, 3) = (x_px, y_px, depth)``: x to the right, y down (image rows),
  continuous pixel coordinates where pixel ``(row r, col c)`` covers ``[c, c+1) x [r, r+1)`` and is
  sampled at its centre ``(c + 0.5, r + 0.5)``. (pytorch3d's NDC has +X left, +Y up; the pytorch3d
  backend maps ``x_ndc = (W - 2 x_px) / min(H, W)``, ``y_ndc = (H - 2 y_px) / min(H, W)``.)
* **Depth**: camera-space distance along the optical axis, larger = farther; the nearest surface
  wins; a pixel whose interpolated depth is < 0 is behind the camera and ignored. Empty pixels have
  depth -1 in :class:`Fragments`.
* **Faces** ``(F, 3)`` shared by the whole batch; ``pix_to_face`` holds the face index within its
  own mesh (0..F-1), -1 for empty pixels (pytorch3d's packed ``b * F + f`` is converted).
  Front-facing = counter-clockwise as seen on screen (OBJ winding); ``cull_backfaces`` drops the
  others.
* **Barycentrics**: screen-space (``perspective_correct=False``, as pytorch3d's default) unless
  asked otherwise; differentiable w.r.t. the screen vertices (no silhouette gradients: blur 0).
* **UV**: ``(u, v)`` in [0, 1], origin at the **bottom-left** of a UV map as in OBJ files: ``v = 0``
  is the last row. UV map ``(B, C, S, S)`` texel ``(row r, col c)`` has its centre at
  ``u = (c + 0.5) / S``, ``v = 1 - (r + 0.5) / S``. Meshes with seams use per-corner UV indices
  ``tri_uv_idx (F, 3)`` into ``uv (T, 2)``.
* **Images** are channel-first ``(B, C, H, W)``; background pixels are 0 (use ``mask``).

Backends: ``"fast"`` (:mod:`facedetail.render.rasterize_fast`, pure PyTorch, CPU or CUDA),
``"pytorch3d"`` (:mod:`facedetail.render.rasterize_pytorch3d`), ``"auto"`` = fast on CPU and
``AUTO_CUDA_BACKEND`` on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from facedetail.render.fragments import Fragments
from facedetail.render.rasterize_fast import rasterize_fast
from facedetail.render.rasterize_pytorch3d import rasterize_pytorch3d

BACKENDS = ("auto", "fast", "pytorch3d")
#: Backend that "auto" picks on CUDA. Not yet measured on a GPU (run benchmarks/render.py there).
AUTO_CUDA_BACKEND = "fast"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ("fast" or "pytorch3d") for a backend setting and a device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return AUTO_CUDA_BACKEND if torch.device(device).type == "cuda" else "fast"


def rasterize(
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    image_size: int | tuple[int, int],
    backend: str = "auto",
    cull_backfaces: bool = False,
    perspective_correct: bool = False,
) -> Fragments:
    """Rasterize a batch of meshes (one face per pixel, no blur) with the chosen backend.

    Args:
        screen_verts: (B, V, 3) ``(x_px, y_px, depth)`` (see module conventions).
        faces: (F, 3) integer vertex indices, shared by the batch.
        image_size: ``H`` or ``(H, W)``.
        backend: "auto" | "fast" | "pytorch3d".
        cull_backfaces: drop faces that are clockwise on screen.
        perspective_correct: perspective-correct barycentrics (default: screen-space).

    Returns:
        :class:`Fragments` (pix_to_face (B, H, W), bary_coords (B, H, W, 3), zbuf (B, H, W)).
    """
    chosen = resolve_backend(backend, screen_verts.device)
    rasterizer = rasterize_fast if chosen == "fast" else rasterize_pytorch3d
    return rasterizer(
        screen_verts, faces, image_size, cull_backfaces=cull_backfaces, perspective_correct=perspective_correct
    )


def interpolate(fragments: Fragments, faces: torch.Tensor, vertex_attrs: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes at every covered pixel (0 elsewhere).

    Differentiable w.r.t. ``vertex_attrs`` and (through the barycentrics) the screen vertices.
    ``faces`` may differ from the rasterized triangles as long as the face order is the same
    (e.g. rasterize ``tri_uv_idx`` in UV space, interpolate vertex values with ``tris``).

    Args:
        fragments: from :func:`rasterize`, batch B_f.
        faces: (F, 3) integer indices into the attributes' V axis.
        vertex_attrs: (B_a, V, C) or (V, C); B_a and B_f must match or one of them be 1.

    Returns:
        (B, H, W, C) with B = max(B_f, B_a).
    """
    if vertex_attrs.ndim == 2:
        vertex_attrs = vertex_attrs[None]
    if vertex_attrs.ndim != 3:
        raise ValueError(f"vertex_attrs must have shape (B, V, C) or (V, C), got {tuple(vertex_attrs.shape)}")
    frag_batch, attr_batch = fragments.batch_size, vertex_attrs.shape[0]
    if frag_batch != attr_batch and 1 not in (frag_batch, attr_batch):
        raise ValueError(
            f"fragments have batch {frag_batch} but vertex_attrs batch {attr_batch}; they must match or be 1"
        )
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    height, width = fragments.image_size
    n_channels = vertex_attrs.shape[2]
    if attr_batch == frag_batch or attr_batch == 1:
        packed = interpolate_packed(fragments, faces, vertex_attrs)
        out = vertex_attrs.new_zeros(frag_batch * height * width, n_channels)
        out = out.index_put((fragments.pixel_index,), packed)
        return out.view(frag_batch, height, width, n_channels)
    # One rasterization shared by a batch of attributes (e.g. UV-space baking).
    faces = faces.to(device=vertex_attrs.device, dtype=torch.long)
    corner_ids = faces.index_select(0, fragments.face_index)  # (N, 3)
    bary = fragments.bary_packed.to(vertex_attrs.dtype)
    values = vertex_attrs[:, corner_ids.reshape(-1)].reshape(attr_batch, -1, 3, n_channels)
    packed = (values * bary[None, :, :, None]).sum(2)  # (B, N, C)
    out = vertex_attrs.new_zeros(attr_batch, height * width, n_channels)
    out = _scatter_rows(out, fragments.pixel_index, packed)
    return out.view(attr_batch, height, width, n_channels)


def pixel_batch_index(fragments: Fragments) -> torch.Tensor:
    """(N,) image of each covered pixel of ``fragments.pixel_index``."""
    height, width = fragments.image_size
    return torch.div(fragments.pixel_index, height * width, rounding_mode="floor")


def interpolate_packed(fragments: Fragments, faces: torch.Tensor, vertex_attrs: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes interpolated at the covered pixels only: (N, C), row ``i`` at ``fragments.pixel_index[i]``.

    ``vertex_attrs`` is (B, V, C) with B the fragments' batch, or (1, V, C) / (V, C) shared by it. No dense
    (B, H, W, C) image is made (the fitter's photometric term compares only covered pixels).
    """
    if vertex_attrs.ndim == 2:
        vertex_attrs = vertex_attrs[None]
    n_verts, n_channels = vertex_attrs.shape[1], vertex_attrs.shape[2]
    faces = faces.to(device=vertex_attrs.device, dtype=torch.long)
    corner_ids = faces.index_select(0, fragments.face_index)  # (N, 3)
    bary = fragments.bary_packed.to(vertex_attrs.dtype)
    if vertex_attrs.shape[0] > 1:
        corner_ids = corner_ids + (pixel_batch_index(fragments) * n_verts)[:, None]
    flat_attrs = vertex_attrs.reshape(-1, n_channels)
    values = flat_attrs[corner_ids.reshape(-1)].reshape(-1, 3, n_channels)
    return (values * bary[:, :, None]).sum(1)


def _scatter_rows(out: torch.Tensor, pixel_index: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``out[:, pixel_index] = packed`` out of place (differentiable)."""
    index = pixel_index.view(1, -1, 1).expand(out.shape[0], -1, out.shape[2])
    return out.scatter(1, index, packed)


def interpolate_uv(fragments: Fragments, tri_uv_idx: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Per-pixel UV coordinates (B, H, W, 2) from per-corner UV indices (0 where empty).

    Args:
        fragments: from :func:`rasterize` of the mesh whose faces correspond row by row to
            ``tri_uv_idx``.
        tri_uv_idx: (F, 3) indices into ``uv`` (seams: one vertex may have several UVs).
        uv: (T, 2) or (B, T, 2) texture coordinates (origin bottom-left).
    """
    if uv.shape[-1] != 2:
        raise ValueError(f"uv must have shape (T, 2) or (B, T, 2), got {tuple(uv.shape)}")
    return interpolate(fragments, tri_uv_idx, uv)


def uv_to_grid(pixel_uv: torch.Tensor) -> torch.Tensor:
    """UV (origin bottom-left) to ``grid_sample`` coordinates (x, y in [-1, 1], y down)."""
    return torch.stack([pixel_uv[..., 0] * 2.0 - 1.0, 1.0 - pixel_uv[..., 1] * 2.0], dim=-1)


def sample_uv_map(
    uv_map: torch.Tensor,
    pixel_uv: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Sample a UV map at per-pixel UV coordinates (``grid_sample``, ``align_corners=False``).

    Args:
        uv_map: (B or 1, C, S, S) map whose last row is v = 0 (see module conventions).
        pixel_uv: (B, H, W, 2) from :func:`interpolate_uv`.
        mask: optional (B, H, W) or (B, 1, H, W); the output is zeroed where it is False/0.
        mode: "bilinear" | "nearest".

    Returns:
        (B, C, H, W).
    """
    if uv_map.ndim != 4:
        raise ValueError(f"uv_map must have shape (B, C, S, S), got {tuple(uv_map.shape)}")
    if pixel_uv.ndim != 4 or pixel_uv.shape[-1] != 2:
        raise ValueError(f"pixel_uv must have shape (B, H, W, 2), got {tuple(pixel_uv.shape)}")
    batch = max(uv_map.shape[0], pixel_uv.shape[0])
    grid = uv_to_grid(pixel_uv).to(uv_map.dtype).expand(batch, -1, -1, -1)
    sampled = F.grid_sample(
        uv_map.expand(batch, -1, -1, -1), grid, mode=mode, padding_mode="border", align_corners=False
    )
    if mask is not None:
        mask = mask if mask.ndim == 4 else mask[:, None]
        sampled = sampled * mask.to(sampled.dtype)
    return sampled
