"""facedetail.render (plain module, knows nothing of Kedro): THE renderer, in two layers.

* Low layer (below :mod:`facedetail.geometry`, which bakes UV maps with it): rasterizer backends
  (:mod:`~facedetail.render.rasterize_fast`, :mod:`~facedetail.render.rasterize_pytorch3d`),
  :class:`Fragments` and interpolation / UV sampling (:mod:`facedetail.render.rasterizer`, conventions there).
  These names are re-exported here.
* High layer (above geometry; import the modules by their full path): SH shading of vertices, pixels
  and normal maps (:mod:`facedetail.render.shading`, used by the 3DMM fitter) and the deferred
  coarse/detailed renders of fitted faces (:mod:`facedetail.render.detail`: ``DetailRenderer``, used by
  training, evaluation and inference).
"""
from facedetail.render.fragments import Fragments
from facedetail.render.rasterize_fast import rasterize_fast
from facedetail.render.rasterize_pytorch3d import pytorch3d_available, rasterize_pytorch3d
from facedetail.render.rasterizer import (
    BACKENDS,
    interpolate,
    interpolate_packed,
    interpolate_uv,
    pixel_batch_index,
    rasterize,
    resolve_backend,
    sample_uv_map,
    uv_to_grid,
)

__all__ = [
    "BACKENDS",
    "Fragments",
    "interpolate",
    "interpolate_packed",
    "interpolate_uv",
    "pixel_batch_index",
    "pytorch3d_available",
    "rasterize",
    "rasterize_fast",
    "rasterize_pytorch3d",
    "resolve_backend",
    "sample_uv_map",
    "uv_to_grid",
]
