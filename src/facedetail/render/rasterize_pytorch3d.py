"""pytorch3d backend: ``rasterize_meshes`` (1 face per pixel, blur 0) returning our :class:`Fragments`.

Our screen pixels map to pytorch3d's NDC (+X left, +Y up, the shorter image side spans [-1, 1]) by
``x_ndc = (W - 2 x_px) / S`` and ``y_ndc = (H - 2 y_px) / S`` with ``S = min(H, W)``: pixel
``(row r, col c)`` has its centre ``(c + 0.5, r + 0.5)`` at pytorch3d's pixel-centre NDC for the
same output cell. Depth is passed through unchanged as NDC z (pytorch3d's ``MeshRasterizer``
also keeps view-space depth there). pytorch3d's packed face index ``b * F + f`` is turned into the
per-mesh index ``f``.

pytorch3d divides by ``area + 1e-8`` (NDC units) when computing barycentrics, so for the small
triangles of a face mesh its weights sum to slightly less than 1 (up to ~1e-3 below at 224 px).
We renormalise them to sum to 1 (and rescale the depth the same way), which removes that bias;
what remains is float32 rounding (~1e-5 typical).
"""
from __future__ import annotations

import torch

from facedetail.render.fragments import Fragments, check_mesh_inputs, fragments_from_dense, parse_image_size


def pytorch3d_available() -> bool:
    """True when pytorch3d and its compiled ops import."""
    try:
        from pytorch3d import _C  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def screen_to_ndc(screen_verts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Our ``(x_px, y_px, depth)`` to pytorch3d NDC ``(x, y, depth)`` (see module docstring)."""
    short_side = float(min(height, width))
    x_ndc = (width - 2.0 * screen_verts[..., 0]) / short_side
    y_ndc = (height - 2.0 * screen_verts[..., 1]) / short_side
    return torch.stack([x_ndc, y_ndc, screen_verts[..., 2]], dim=-1)


def rasterize_pytorch3d(
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    image_size: int | tuple[int, int],
    cull_backfaces: bool = False,
    perspective_correct: bool = False,
) -> Fragments:
    """Rasterize with pytorch3d (CPU: naive and slow; CUDA: coarse-to-fine) into :class:`Fragments`.

    Same arguments and outputs as :func:`facedetail.render.rasterize_fast.rasterize_fast`.
    ``cull_backfaces`` drops faces that appear clockwise on screen (back-facing for OBJ winding).
    """
    if not pytorch3d_available():
        raise RuntimeError("backend 'pytorch3d' needs pytorch3d with its compiled ops (pip install easypytorch3d)")
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    check_mesh_inputs(screen_verts, faces)
    height, width = parse_image_size(image_size)
    batch, _, _ = screen_verts.shape
    faces = faces.to(device=screen_verts.device, dtype=torch.long)
    verts_ndc = screen_to_ndc(screen_verts.float(), height, width)
    meshes = Meshes(verts=verts_ndc, faces=faces[None].expand(batch, -1, -1))
    # pytorch3d culls faces with a negative NDC edge-function area; both NDC axes are flipped
    # relative to ours, so that is the same sign as our screen-space area: we pass the flag through.
    pix_to_face, zbuf, bary, _ = rasterize_meshes(
        meshes,
        image_size=(height, width),
        blur_radius=0.0,
        faces_per_pixel=1,
        perspective_correct=perspective_correct,
        cull_backfaces=cull_backfaces,
    )
    pix_to_face = pix_to_face[..., 0]
    n_faces = faces.shape[0]
    batch_offset = (torch.arange(batch, device=pix_to_face.device) * n_faces).view(batch, 1, 1)
    pix_to_face = torch.where(pix_to_face >= 0, pix_to_face - batch_offset, pix_to_face)
    bary = bary[..., 0, :].to(screen_verts.dtype)
    zbuf = zbuf[..., 0].to(screen_verts.dtype)
    covered = pix_to_face >= 0
    bary_sum = torch.where(covered, bary.sum(-1), torch.ones_like(zbuf))
    bary = torch.where(covered[..., None], bary / bary_sum[..., None], bary)
    zbuf = torch.where(covered, zbuf / bary_sum, zbuf)
    return fragments_from_dense(pix_to_face, bary, zbuf)
