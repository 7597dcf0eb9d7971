"""UV-space baking: per-vertex values to UV maps, expression maps, and texture unwrapping.

UV conventions are those of :mod:`facedetail.render.rasterizer`: ``(u, v)`` in [0, 1] with the origin
at the bottom-left (OBJ), so a UV map ``(B, C, S, S)`` has texel ``(row r, col c)`` centred at
``u = (c + 0.5) / S``, ``v = 1 - (r + 0.5) / S``. A mesh in UV space is rasterized with the fast
rasterizer using ``(x_px, y_px) = (u S, (1 - v) S)`` as screen coordinates and the per-corner UV
indices ``tri_uv_idx`` as faces (so seams are handled); the face order is shared with ``faces``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from facedetail.render.fragments import Fragments
from facedetail.render.rasterize_fast import rasterize_fast
from facedetail.render.rasterizer import interpolate, rasterize


def _check_uv_mesh(faces: torch.Tensor, tri_uv_idx: torch.Tensor, uv: torch.Tensor) -> None:
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if tri_uv_idx.shape != faces.shape:
        raise ValueError(
            f"tri_uv_idx must have the same shape as faces {tuple(faces.shape)} (one UV index per corner), "
            f"got {tuple(tri_uv_idx.shape)}"
        )
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"uv must have shape (T, 2), got {tuple(uv.shape)}")
    if tri_uv_idx.numel() and int(tri_uv_idx.max()) >= uv.shape[0]:
        raise ValueError(f"tri_uv_idx refers to uv index {int(tri_uv_idx.max())} but uv has {uv.shape[0]} rows")


def uv_to_screen(uv: torch.Tensor, size: int) -> torch.Tensor:
    """UV coordinates (T, 2) to UV-map "screen" vertices (1, T, 3) = (u S, (1 - v) S, 0)."""
    x = uv[:, 0] * size
    y = (1.0 - uv[:, 1]) * size
    return torch.stack([x, y, torch.zeros_like(x)], dim=-1)[None]


def rasterize_uv(tri_uv_idx: torch.Tensor, uv: torch.Tensor, size: int = 256) -> Fragments:
    """Rasterize the UV layout into an S x S map (batch 1): which face covers each texel centre."""
    if size <= 0:
        raise ValueError(f"UV map size must be positive, got {size}")
    return rasterize_fast(uv_to_screen(uv, size), tri_uv_idx.long(), (size, size))


def bake_to_uv(
    vertex_values: torch.Tensor,
    faces: torch.Tensor,
    tri_uv_idx: torch.Tensor,
    uv: torch.Tensor,
    size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bake per-vertex values into UV maps by barycentric interpolation inside each UV triangle.

    Args:
        vertex_values: (B, V, C) or (V, C) values per mesh vertex.
        faces: (F, 3) vertex indices.
        tri_uv_idx: (F, 3) UV indices of the same faces' corners.
        uv: (T, 2) UV coordinates (origin bottom-left).
        size: map side S in texels.

    Returns:
        ``(uv_map (B, C, S, S), valid (S, S) bool)``; texels whose centre no UV triangle covers
        are 0 and invalid. Differentiable w.r.t. ``vertex_values``.
    """
    if vertex_values.ndim == 2:
        vertex_values = vertex_values[None]
    if vertex_values.ndim != 3:
        raise ValueError(f"vertex_values must have shape (B, V, C), got {tuple(vertex_values.shape)}")
    device = vertex_values.device
    faces, tri_uv_idx = faces.to(device).long(), tri_uv_idx.to(device).long()
    uv = uv.to(device=device, dtype=vertex_values.dtype)
    _check_uv_mesh(faces, tri_uv_idx, uv)
    if int(faces.max()) >= vertex_values.shape[1]:
        raise ValueError(
            f"faces refer to vertex {int(faces.max())} but vertex_values has {vertex_values.shape[1]} vertices"
        )
    fragments = rasterize_uv(tri_uv_idx, uv, size)
    baked = interpolate(fragments, faces, vertex_values)  # (B, S, S, C)
    return baked.permute(0, 3, 1, 2).contiguous(), fragments.mask[0]


def expression_offsets(expression_basis: torch.Tensor, expression_coeffs: torch.Tensor) -> torch.Tensor:
    """Per-vertex expression displacement ``B·beta``: (K, V, 3) basis and (B, K) coefficients -> (B, V, 3)."""
    shapes_ok = expression_basis.ndim == 3 and expression_coeffs.ndim == 2
    if not shapes_ok or expression_basis.shape[0] != expression_coeffs.shape[1]:
        raise ValueError(
            f"expected expression_basis (K, V, 3) and expression_coeffs (B, K), got "
            f"{tuple(expression_basis.shape)} and {tuple(expression_coeffs.shape)}"
        )
    return torch.einsum("bk,kvc->bvc", expression_coeffs, expression_basis.to(expression_coeffs.dtype))


def expression_map(
    exp_offsets: torch.Tensor,
    faces: torch.Tensor,
    tri_uv_idx: torch.Tensor,
    uv: torch.Tensor,
    size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UV map of the expression displacement (identity excluded; camera and lighting invariant).

    Args:
        exp_offsets: (B, V, 3) ``B·beta`` in model units (see :func:`expression_offsets`).
        faces, tri_uv_idx, uv, size: as :func:`bake_to_uv`.

    Returns:
        ``(map (B, 3, S, S) in model units (x, y, z of the displacement), valid (S, S) bool)``.
    """
    if exp_offsets.ndim != 3 or exp_offsets.shape[-1] != 3:
        raise ValueError(f"exp_offsets must have shape (B, V, 3), got {tuple(exp_offsets.shape)}")
    return bake_to_uv(exp_offsets, faces, tri_uv_idx, uv, size)


def unwrap_texture(
    image: torch.Tensor,
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    tri_uv_idx: torch.Tensor,
    uv: torch.Tensor,
    size: int = 256,
    depth_tolerance: float | None = None,
    require_front_facing: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample an image into UV space through a fitted mesh, keeping only texels the camera sees.

    For each texel: its surface point (screen position baked into UV) samples the image
    bilinearly; it is visible when (i) its face is front-facing (counter-clockwise on screen, i.e.
    the normal faces the camera for OBJ winding) and (ii) each of the 2x2 image pixels that the
    bilinear sample reads is inside the image and its z-buffer shows the same face, or a depth
    within ``depth_tolerance`` of the texel face's plane evaluated at that pixel centre (so
    neighbouring faces of the same surface pass; occluders and background do not, and no
    background or occluder colour bleeds into the texture).

    Args:
        image: (B, 3, H, W) in [0, 1].
        screen_verts: (B, V, 3) ``(x_px, y_px, depth)`` of the fitted mesh in that image.
        faces: (F, 3) vertex indices; tri_uv_idx (F, 3); uv (T, 2).
        size: UV map side S.
        depth_tolerance: absolute depth tolerance; default 1% of each mesh's depth extent.
        require_front_facing: apply test (ii).
        backend: rasterizer backend for the image-space z-buffer.

    Returns:
        ``(texture (B, 3, S, S), visible (B, 1, S, S) float)``; invisible texels are 0.
    """
    if image.ndim != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    if screen_verts.ndim != 3 or screen_verts.shape[0] != image.shape[0] or screen_verts.shape[-1] != 3:
        raise ValueError(
            f"screen_verts must have shape (B, V, 3) with B = {image.shape[0]} (the image batch), "
            f"got {tuple(screen_verts.shape)}"
        )
    device, dtype = screen_verts.device, screen_verts.dtype
    batch, n_channels, height, width = image.shape
    faces, tri_uv_idx = faces.to(device).long(), tri_uv_idx.to(device).long()
    uv = uv.to(device=device, dtype=dtype)
    _check_uv_mesh(faces, tri_uv_idx, uv)

    uv_fragments = rasterize_uv(tri_uv_idx, uv, size)
    texel_face = uv_fragments.face_index  # (N,)
    corners = screen_verts[:, faces.index_select(0, texel_face)]  # (B, N, 3, 3)
    point = (corners * uv_fragments.bary_packed.to(dtype)[None, :, :, None]).sum(2)  # (B, N, 3)

    image_fragments = rasterize(screen_verts.detach(), faces, (height, width), backend=backend)
    with torch.no_grad():
        corners_detached = corners.detach()
        edge1 = corners_detached[..., 1, :2] - corners_detached[..., 0, :2]
        edge2 = corners_detached[..., 2, :2] - corners_detached[..., 0, :2]
        area2 = edge1[..., 0] * edge2[..., 1] - edge1[..., 1] * edge2[..., 0]  # < 0: front-facing
        visible = area2.abs() > 1e-12
        if require_front_facing:
            visible &= area2 < 0
        if depth_tolerance is None:
            depths = screen_verts.detach()[..., 2]
            tolerance = 0.01 * (depths.amax(1) - depths.amin(1))[:, None]
        else:
            tolerance = torch.full((batch, 1), float(depth_tolerance), dtype=dtype, device=device)
        # The 2x2 pixels that bilinear sampling reads must all show this texel's surface.
        first_col = torch.floor(point[..., 0].detach() - 0.5).long()
        first_row = torch.floor(point[..., 1].detach() - 0.5).long()
        for row_step in (0, 1):
            for col_step in (0, 1):
                visible &= _shows_surface(
                    image_fragments, corners_detached, texel_face, first_row + row_step, first_col + col_step, tolerance
                )

    grid = torch.stack([point[..., 0] * (2.0 / width) - 1.0, point[..., 1] * (2.0 / height) - 1.0], -1)
    sampled = F.grid_sample(image.to(dtype), grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled[:, :, 0] * visible[:, None].to(dtype)  # (B, C, N)
    index = uv_fragments.pixel_index.view(1, 1, -1).expand(batch, n_channels, -1)
    texture = sampled.new_zeros(batch, n_channels, size * size).scatter(2, index, sampled)
    visible_map = sampled.new_zeros(batch, 1, size * size).scatter(2, index[:, :1], visible[:, None].to(dtype))
    return texture.view(batch, n_channels, size, size), visible_map.view(batch, 1, size, size)


def _shows_surface(
    fragments: Fragments,
    corners: torch.Tensor,
    texel_face: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    tolerance: torch.Tensor,
) -> torch.Tensor:
    """Whether pixel (row, col) shows the texels' surface: inside the image, covered, and either the
    same face or a depth within ``tolerance`` of the texel face's plane at that pixel centre.

    Args:
        fragments: image-space rasterization (B, H, W).
        corners: (B, N, 3, 3) screen corners of each texel's face.
        texel_face: (N,) face of each texel.
        row, col: (B, N) integer pixel coordinates.
        tolerance: (B, 1) depth tolerance.

    Returns:
        (B, N) bool.
    """
    batch, height, width = fragments.pix_to_face.shape
    in_image = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    flat = (torch.arange(batch, device=row.device)[:, None] * height + row.clamp(0, height - 1)) * width
    flat = flat + col.clamp(0, width - 1)
    face_at_pixel = fragments.pix_to_face.reshape(-1)[flat]
    depth_at_pixel = fragments.zbuf.reshape(-1)[flat]
    # Depth of the texel face's plane at the pixel centre (extrapolated barycentrics).
    rel = corners[..., :2] - torch.stack([col, row], -1).to(corners.dtype)[:, :, None, :] - 0.5
    cross01 = rel[..., 0, 0] * rel[..., 1, 1] - rel[..., 0, 1] * rel[..., 1, 0]
    cross12 = rel[..., 1, 0] * rel[..., 2, 1] - rel[..., 1, 1] * rel[..., 2, 0]
    cross20 = rel[..., 2, 0] * rel[..., 0, 1] - rel[..., 2, 1] * rel[..., 0, 0]
    area2 = cross01 + cross12 + cross20
    safe_area = torch.where(area2.abs() > 1e-12, area2, torch.ones_like(area2))
    plane_depth = (torch.stack([cross12, cross20, cross01], -1) / safe_area[..., None] * corners[..., 2]).sum(-1)
    same_surface = (face_at_pixel == texel_face[None]) | ((depth_at_pixel - plane_depth).abs() <= tolerance)
    return in_image & (face_at_pixel >= 0) & same_surface


def fill_invalid_texels(uv_map: torch.Tensor, valid: torch.Tensor, iterations: int = 4) -> torch.Tensor:
    """Grow valid texels into invalid ones (mean of valid 3x3 neighbours), e.g. to pad UV islands
    before bilinear sampling. Valid texels are unchanged.

    Args:
        uv_map: (B, C, S, S).
        valid: (S, S), (B, S, S) or (B, 1, S, S) bool/float.
        iterations: number of one-texel growth steps.
    """
    weight = valid.to(uv_map.dtype)
    while weight.ndim < 4:
        weight = weight[None]
    weight = weight.expand(uv_map.shape[0], 1, -1, -1)
    filled = uv_map * weight
    for _ in range(iterations):
        summed = F.avg_pool2d(filled, 3, stride=1, padding=1, count_include_pad=False)
        counts = F.avg_pool2d(weight, 3, stride=1, padding=1, count_include_pad=False)
        grown = summed / counts.clamp(min=1e-12)
        filled = torch.where(weight > 0, filled, grown * (counts > 0).to(uv_map.dtype))
        weight = torch.where(weight > 0, weight, (counts > 0).to(uv_map.dtype))
    return filled
