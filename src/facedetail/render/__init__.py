"""facedetail.render (plain module, knows nothing of Kedro): rasterizer backends, interpolation, texturing.

See :mod:`facedetail.render.renderer` for the coordinate, depth and UV conventions.
"""
from facedetail.render.fragments import Fragments
from facedetail.render.rasterize_fast import rasterize_fast
from facedetail.render.rasterize_pytorch3d import pytorch3d_available, rasterize_pytorch3d
from facedetail.render.renderer import (
    BACKENDS,
    Renderer,
    RenderOutput,
    interpolate,
    interpolate_uv,
    rasterize,
    render_mesh,
    resolve_backend,
    sample_uv_map,
    uv_to_grid,
)

__all__ = [
    "BACKENDS",
    "Fragments",
    "RenderOutput",
    "Renderer",
    "interpolate",
    "interpolate_uv",
    "pytorch3d_available",
    "rasterize",
    "rasterize_fast",
    "rasterize_pytorch3d",
    "render_mesh",
    "resolve_backend",
    "sample_uv_map",
    "uv_to_grid",
]
