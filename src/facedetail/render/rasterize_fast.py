"""A vectorised, pure-PyTorch triangle rasterizer (one face per pixel, no blur).

Works on any device torch supports (CPU, CUDA) with no compiled extension. Conventions are those of
:mod:`facedetail.render.rasterizer`: screen vertices ``(x_px, y_px, depth)``, x right, y down, pixel
``(row r, col c)`` sampled at its centre ``(c + 0.5, r + 0.5)``, smaller depth wins, faces with
depth < 0 at the pixel are ignored (behind the camera), exactly like pytorch3d's
``rasterize_meshes(faces_per_pixel=1, blur_radius=0)``.

Algorithm:

1. Per face: screen bounding box -> the integer range of pixel centres it can cover, and the
   affine coefficients of its barycentric coordinates relative to its first corner (numerically
   stable for small triangles far from the origin).
2. Candidate (face, pixel) pairs are enumerated for all faces at once (``repeat_interleave`` over
   the per-face bounding-box pixel counts), in chunks bounded by ``max_candidates``.
3. Inside test (all barycentrics >= -EDGE_EPS: watertight on shared edges) and depth by
   screen-space interpolation.
4. Z-test: each pair gets the int64 key ``(float32 depth bits << 32) | face``; for non-negative
   depths the bits order like the floats, so one ``scatter_reduce(amin)`` per pixel picks the
   nearest face (ties: smallest face index, as pytorch3d's priority queue).
5. Barycentrics and depth of the winning faces are recomputed with autograd from the screen
   vertices, so everything interpolated from them is differentiable w.r.t. vertex positions
   (gradients of the barycentrics inside faces; no silhouette gradients, as with blur 0).
"""
from __future__ import annotations

import torch

from facedetail.render.fragments import Fragments, check_mesh_inputs, parse_image_size

#: pytorch3d skips faces whose NDC edge-function area is within this of zero.
ZERO_AREA_EPS_NDC = 1e-8
#: Default cap on (face, pixel) candidate pairs processed at once (bounds memory, ~40 bytes each).
DEFAULT_MAX_CANDIDATES = 1 << 22
#: A pixel centre counts as inside when all barycentrics are >= -EDGE_EPS, so centres that lie
#: exactly on an edge shared by two faces are never dropped by rounding (pytorch3d's strict > 0
#: leaves holes there, e.g. on regular UV grids); the z-test then picks one of the faces.
EDGE_EPS = 1e-6
_EMPTY_KEY = torch.iinfo(torch.int64).max


def _face_tables(
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    cull_backfaces: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-face candidate counts and lookup tables for the faces that can cover a pixel centre.

    Returns ``(counts (Fa,), float_table (Fa, 9), int_table (Fa, 3))`` for the Fa active faces of
    the whole batch; float columns: offset of the bbox's first pixel centre from corner 0 (x, y),
    barycentric gradients (w1: x, y; w2: x, y), corner depths (z0, z1, z2); int columns: bbox
    width in pixels, flat index of the bbox's first pixel, face index within its mesh.
    """
    n_faces = faces.shape[0]
    corners = screen_verts[:, faces]  # (B, F, 3 corners, 3 coords)
    xs, ys, zs = corners[..., 0], corners[..., 1], corners[..., 2]
    e1x, e1y = xs[..., 1] - xs[..., 0], ys[..., 1] - ys[..., 0]
    e2x, e2y = xs[..., 2] - xs[..., 0], ys[..., 2] - ys[..., 0]
    area2 = e1x * e2y - e1y * e2x  # twice the signed area in pixels^2 (> 0: clockwise on screen)
    ndc_scale = 4.0 / float(min(height, width)) ** 2
    keep = area2.abs() * ndc_scale > ZERO_AREA_EPS_NDC
    keep &= zs.amax(-1) >= 0  # wholly behind the camera
    if cull_backfaces:
        keep &= area2 < 0  # keep counter-clockwise-on-screen (front-facing for OBJ winding)

    # Integer range of pixel centres (c + 0.5) inside the bounding box, clamped to the image.
    col_first = torch.ceil(xs.amin(-1) - 0.5).clamp(min=0)
    col_last = torch.floor(xs.amax(-1) - 0.5).clamp(max=width - 1)
    row_first = torch.ceil(ys.amin(-1) - 0.5).clamp(min=0)
    row_last = torch.floor(ys.amax(-1) - 0.5).clamp(max=height - 1)
    n_cols = (col_last - col_first + 1).clamp(min=0)
    n_rows = (row_last - row_first + 1).clamp(min=0)
    counts = torch.where(keep, n_cols * n_rows, torch.zeros_like(n_cols))
    active = torch.nonzero(counts.reshape(-1) > 0).squeeze(1)

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1)[active]

    inv_area2 = 1.0 / pick(area2)
    e1x, e1y, e2x, e2y = pick(e1x), pick(e1y), pick(e2x), pick(e2y)
    float_table = torch.stack(
        [
            pick(col_first) + 0.5 - pick(xs[..., 0]),
            pick(row_first) + 0.5 - pick(ys[..., 0]),
            e2y * inv_area2,
            -e2x * inv_area2,
            -e1y * inv_area2,
            e1x * inv_area2,
            pick(zs[..., 0]),
            pick(zs[..., 1]),
            pick(zs[..., 2]),
        ],
        dim=1,
    )
    batch_index = torch.div(active, n_faces, rounding_mode="floor")
    first_pixel = (batch_index * height + pick(row_first).long()) * width + pick(col_first).long()
    int_table = torch.stack([pick(n_cols).long(), first_pixel, active - batch_index * n_faces], dim=1)
    return pick(counts).long(), float_table, int_table


def _zbuffer_keys(
    counts: torch.Tensor,
    float_table: torch.Tensor,
    int_table: torch.Tensor,
    n_pixels: int,
    width: int,
    perspective_correct: bool,
    max_candidates: int,
) -> torch.Tensor:
    """Run the candidate test and z-test; returns the per-pixel min key (n_pixels,) int64."""
    device = counts.device
    keys = torch.full((n_pixels,), _EMPTY_KEY, dtype=torch.int64, device=device)
    if counts.numel() == 0:
        return keys
    ends = torch.cumsum(counts, 0)
    # Chunk boundaries (in faces) so that each chunk has at most ~max_candidates pairs.
    total = int(ends[-1])
    if total <= max_candidates:
        bounds = [0, counts.numel()]
    else:
        targets = torch.arange(max_candidates, total, max_candidates, device=device)
        cuts = torch.searchsorted(ends, targets, right=True).tolist()
        bounds = sorted(set([0, *cuts, counts.numel()]))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        chunk_counts = counts[lo:hi]
        n_pairs = int(ends[hi - 1] - (ends[lo - 1] if lo > 0 else 0))
        pair_face = torch.repeat_interleave(torch.arange(hi - lo, device=device), chunk_counts, output_size=n_pairs)
        starts = ends[lo:hi] - chunk_counts - (ends[lo - 1] if lo > 0 else 0)
        ints = int_table[lo:hi].index_select(0, pair_face)
        local = torch.arange(n_pairs, device=device) - starts.index_select(0, pair_face)
        row = torch.div(local, ints[:, 0], rounding_mode="floor")
        col = local - row * ints[:, 0]
        floats = float_table[lo:hi].index_select(0, pair_face)
        dx = floats[:, 0] + col.to(floats.dtype)
        dy = floats[:, 1] + row.to(floats.dtype)
        w1 = floats[:, 2] * dx + floats[:, 3] * dy
        w2 = floats[:, 4] * dx + floats[:, 5] * dy
        w0 = 1.0 - w1 - w2
        inside = (w0 >= -EDGE_EPS) & (w1 >= -EDGE_EPS) & (w2 >= -EDGE_EPS)
        z0, z1, z2 = floats[:, 6], floats[:, 7], floats[:, 8]
        if perspective_correct:
            depth = 1.0 / (w0 / z0 + w1 / z1 + w2 / z2)
        else:
            depth = w0 * z0 + w1 * z1 + w2 * z2
        inside &= depth >= 0
        hit = torch.nonzero(inside).squeeze(1)
        depth = depth.index_select(0, hit).float()
        depth = torch.where(depth > 0, depth, torch.zeros_like(depth))  # no -0.0 (sign bit)
        depth_bits = depth.view(torch.int32).long()
        key = (depth_bits << 32) | ints[:, 2].index_select(0, hit)
        pixel = ints[:, 1].index_select(0, hit) + row.index_select(0, hit) * width + col.index_select(0, hit)
        keys.scatter_reduce_(0, pixel, key, reduce="amin", include_self=True)
    return keys


def barycentrics_at_pixels(
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    pixel_index: torch.Tensor,
    face_index: torch.Tensor,
    height: int,
    width: int,
    perspective_correct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable barycentrics and depth of given faces at given pixel centres.

    Args:
        screen_verts: (B, V, 3) screen vertices.
        faces: (F, 3) long.
        pixel_index: (N,) flat ``(b * H + row) * W + col``.
        face_index: (N,) face within its mesh.
        height, width: image size.
        perspective_correct: correct the screen-space barycentrics with the corner depths.

    Returns:
        ``(bary (N, 3), depth (N,))``, differentiable w.r.t. ``screen_verts``.
    """
    batch, n_verts, _ = screen_verts.shape
    col = pixel_index % width
    row = torch.div(pixel_index, width, rounding_mode="floor") % height
    batch_index = torch.div(pixel_index, height * width, rounding_mode="floor")
    vertex_ids = faces.index_select(0, face_index) + (batch_index * n_verts)[:, None]
    corners = screen_verts.reshape(batch * n_verts, 3)[vertex_ids.reshape(-1)].reshape(-1, 3, 3)
    pixel = torch.stack([col, row], dim=1).to(corners.dtype) + 0.5
    rel = corners[..., :2] - pixel[:, None, :]  # corners relative to the pixel centre
    # Edge functions of the pixel against each opposite edge (cross products).
    cross01 = rel[:, 0, 0] * rel[:, 1, 1] - rel[:, 0, 1] * rel[:, 1, 0]
    cross12 = rel[:, 1, 0] * rel[:, 2, 1] - rel[:, 1, 1] * rel[:, 2, 0]
    cross20 = rel[:, 2, 0] * rel[:, 0, 1] - rel[:, 2, 1] * rel[:, 0, 0]
    area2 = cross01 + cross12 + cross20
    bary = torch.stack([cross12, cross20, cross01], dim=1) / area2[:, None]
    depths = corners[..., 2]
    if perspective_correct:
        weighted = bary / depths
        bary = weighted / weighted.sum(1, keepdim=True)
    depth = (bary * depths).sum(1)
    return bary, depth


def rasterize_fast(
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    image_size: int | tuple[int, int],
    cull_backfaces: bool = False,
    perspective_correct: bool = False,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> Fragments:
    """Rasterize a batch of meshes sharing one triangle list (pure PyTorch, any device).

    Args:
        screen_verts: (B, V, 3) ``(x_px, y_px, depth)``; x right, y down, pixel centres at
            ``integer + 0.5``; depth larger = farther (negative = behind the camera).
        faces: (F, 3) integer vertex indices (shared by the batch).
        image_size: ``H`` or ``(H, W)``.
        cull_backfaces: drop faces that appear clockwise on screen (back-facing for
            counter-clockwise / OBJ winding).
        perspective_correct: perspective-correct barycentrics (default False: screen-space,
            like pytorch3d's ``perspective_correct=False``).
        max_candidates: memory bound on candidate (face, pixel) pairs per chunk.

    Returns:
        :class:`Fragments` with per-mesh face indices; ``bary_coords``/``zbuf`` differentiable.
    """
    check_mesh_inputs(screen_verts, faces)
    height, width = parse_image_size(image_size)
    faces = faces.to(device=screen_verts.device, dtype=torch.long)
    batch = screen_verts.shape[0]
    n_pixels = batch * height * width
    with torch.no_grad():
        counts, float_table, int_table = _face_tables(screen_verts.detach(), faces, height, width, cull_backfaces)
        keys = _zbuffer_keys(counts, float_table, int_table, n_pixels, width, perspective_correct, max_candidates)
        pixel_index = torch.nonzero(keys != _EMPTY_KEY).squeeze(1)
        face_index = keys.index_select(0, pixel_index) & 0xFFFFFFFF
    bary, depth = barycentrics_at_pixels(
        screen_verts, faces, pixel_index, face_index, height, width, perspective_correct
    )
    pix_to_face = torch.full((n_pixels,), -1, dtype=torch.long, device=screen_verts.device)
    pix_to_face[pixel_index] = face_index
    bary_dense = torch.full((n_pixels, 3), -1.0, dtype=screen_verts.dtype, device=screen_verts.device)
    bary_dense = bary_dense.index_put((pixel_index,), bary)
    zbuf = torch.full((n_pixels,), -1.0, dtype=screen_verts.dtype, device=screen_verts.device)
    zbuf = zbuf.index_put((pixel_index,), depth)
    return Fragments(
        pix_to_face=pix_to_face.view(batch, height, width),
        bary_coords=bary_dense.view(batch, height, width, 3),
        zbuf=zbuf.view(batch, height, width),
        pixel_index=pixel_index,
        face_index=face_index,
        bary_packed=bary,
    )
