"""SH (Lambertian, Deng et al.) shading for the renderer: per vertex, per covered pixel and per normal map.

The high layer of :mod:`facedetail.render` (it uses :mod:`facedetail.geometry.lighting`'s SH basis).
Used by the 3DMM fitter's photometric term and overlay (:mod:`facedetail.estimation.fitting`) and by
the deferred detail renders (:mod:`facedetail.render.detail`). Colours are linear [0, 1] RGB, not clamped
unless said.
"""
from __future__ import annotations

import torch

from facedetail.geometry.lighting import irradiance, shade
from facedetail.render.fragments import Fragments
from facedetail.render.rasterizer import interpolate_packed, pixel_batch_index


def shade_vertices(albedo: torch.Tensor, normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) colours ``(Y(n)·γ) ⊙ albedo`` of unit vertex normals (B, V, 3) with SH gamma (B, 27)."""
    return shade(albedo, normals, gamma)


def irradiance_map(normal_map: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """SH irradiance (B, 3, H, W) of a map of unit normals (B, 3, H, W) (a UV normal map or a per-pixel one)."""
    batch, _, height, width = normal_map.shape
    flat = normal_map.flatten(2).transpose(1, 2)
    return irradiance(flat, gamma).transpose(1, 2).reshape(batch, 3, height, width)


def covered_pixel_colours(
    fragments: Fragments, faces: torch.Tensor, vertex_colours: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertex colours (B, V, 3) interpolated at the covered pixels only.

    Returns:
        ``(pixel_index (N,), batch_index (N,), colours (N, 3))``: flat ``(b * H + row) * W + col`` index of each
        covered pixel, its image, and its colour (differentiable w.r.t. the colours and screen vertices).
    """
    return fragments.pixel_index, pixel_batch_index(fragments), interpolate_packed(fragments, faces, vertex_colours)
