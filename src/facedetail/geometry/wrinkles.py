"""Synthetic, expression-driven wrinkle displacement maps in UV (ground truth of ``benchmarks/detail_recovery.py``).

Real wrinkles are riggable: their placement and shape belong to the person, their depth to the expression.
:func:`wrinkle_displacement` builds such maps for any face model with named ARKit-style blendshapes (ICT):

* forehead furrows (horizontal, slightly arched ridges/valleys between the brows and the hairline), driven by
  the brow raise (``browInnerUp_*``, ``browOuterUp_*``);
* crow's feet (lines fanning out from the outer eye corners), driven per side by ``eyeSquint``, ``cheekSquint``
  and ``mouthSmile``;
* nasolabial folds (a groove with raised shoulders from the nose wing past the mouth corner), driven per side
  by ``mouthSmile`` and ``cheekSquint``.

Each term is ``depth x driver(beta) x envelope(uv) x pattern(uv)``: the driver is a clamped linear mix of
expression weights in [0, 1] (so a neutral face has no wrinkles and depth grows linearly with the driving
blendshape), the placement (offsets, arch, spacing, phase, width) and the depth of each term are per-face
:class:`WrinkleStyle` parameters. Anchors are the model's 68 landmarks in UV, so the wrinkles sit where they do
on real faces whatever the UV layout. Units are the face model's (ICT cm): depths 0.03-0.1 = 0.3-1 mm.

Maps are ``(B, 1, S, S)`` in the project's UV-image convention (row 0 is v = 1, column 0 is u = 0); they are a
continuous function of (u, v), so any UV size samples the same wrinkles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from facedetail.geometry.face_model import FaceModel

#: Wrinkle groups, in the column order of :func:`wrinkle_drivers`.
WRINKLE_GROUPS = ("forehead", "crows_feet_L", "crows_feet_R", "nasolabial_L", "nasolabial_R")

#: driver of each group = clamp(sum of weight x blendshape, 0, 1) (ICT/ARKit names; ``_L`` is the subject's left).
DRIVER_WEIGHTS: dict[str, dict[str, float]] = {
    "forehead": {"browInnerUp_L": 0.25, "browInnerUp_R": 0.25, "browOuterUp_L": 0.25, "browOuterUp_R": 0.25},
    "crows_feet_L": {"eyeSquint_L": 0.6, "cheekSquint_L": 0.4, "mouthSmile_L": 0.4},
    "crows_feet_R": {"eyeSquint_R": 0.6, "cheekSquint_R": 0.4, "mouthSmile_R": 0.4},
    "nasolabial_L": {"mouthSmile_L": 0.8, "cheekSquint_L": 0.3},
    "nasolabial_R": {"mouthSmile_R": 0.8, "cheekSquint_R": 0.3},
}


@dataclass(frozen=True)
class WrinkleStyle:
    """Per-face wrinkle placement and depth (UV units for lengths, face-model units for depths)."""

    forehead_depth: float = 0.06
    forehead_period: float = 0.05      # furrow spacing along v
    forehead_phase: float = 0.0        # radians
    forehead_arch: float = 0.6         # v shift per (u - 0.5)^2: furrows bend down towards the temples
    forehead_shift: float = 0.0        # vertical offset of the furrow band
    crows_depth: float = 0.05
    crows_frequency: float = 7.0       # angular frequency of the fan (lines per radian x 2 pi)
    crows_phase: float = 0.0
    crows_radius: float = 0.045        # distance of the fan from the eye corner
    nasolabial_depth: float = 0.07
    nasolabial_offset: float = 0.03    # outward offset of the fold from the nose wing / mouth corner
    nasolabial_bend: float = 0.015     # outward bow of the fold
    nasolabial_width: float = 0.016    # groove width

    @staticmethod
    def sample(rng: np.random.Generator, spacing: float = 1.0) -> "WrinkleStyle":
        """A random plausible face (depths 0.3-1 mm in ICT cm, placement varying by a few texels at UV 64).

        ``spacing`` scales the forehead furrow period and the crow's-feet line spacing (same random draws). On the
        ICT layout (about 250 x 380 mm per UV unit along u x v at the forehead, 330 x 250 at the eye corners) 1
        gives furrows 17-25 mm and crow's feet ~8-15 mm apart (coarser than real faces); 0.5 about real spacing
        (furrows ~9-12 mm, crow's feet ~4-8 mm), near the sampling limit of UV 128 (2-3 mm texels).
        """
        if not spacing > 0:
            raise ValueError(f"spacing must be > 0, got {spacing}")
        return WrinkleStyle(
            forehead_depth=float(rng.uniform(0.03, 0.1)),
            forehead_period=float(rng.uniform(0.045, 0.065)) * spacing,
            forehead_phase=float(rng.uniform(0, 2 * math.pi)),
            forehead_arch=float(rng.uniform(0.2, 1.0)),
            forehead_shift=float(rng.uniform(-0.01, 0.01)),
            crows_depth=float(rng.uniform(0.03, 0.08)),
            crows_frequency=float(rng.uniform(5.5, 8.5)) / spacing,
            crows_phase=float(rng.uniform(0, 2 * math.pi)),
            crows_radius=float(rng.uniform(0.035, 0.055)),
            nasolabial_depth=float(rng.uniform(0.04, 0.1)),
            nasolabial_offset=float(rng.uniform(0.02, 0.04)),
            nasolabial_bend=float(rng.uniform(0.005, 0.025)),
            nasolabial_width=float(rng.uniform(0.013, 0.02)),
        )

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], np.float64)


def sample_styles(count: int, seed: int, spacing: float = 1.0) -> list[WrinkleStyle]:
    """``count`` seeded random styles (face ``i`` always gets the same style for one seed; ``spacing``: see
    :meth:`WrinkleStyle.sample`)."""
    return [WrinkleStyle.sample(np.random.default_rng([seed, i]), spacing) for i in range(count)]


def wrinkle_drivers(face_model: FaceModel, expression: torch.Tensor) -> torch.Tensor:
    """(B, K_exp) expression weights -> (B, 5) drivers in [0, 1] (columns: :data:`WRINKLE_GROUPS`)."""
    names = list(face_model.exp_names)
    mix = torch.zeros(len(names), len(WRINKLE_GROUPS), dtype=expression.dtype, device=expression.device)
    for j, group in enumerate(WRINKLE_GROUPS):
        for name, weight in DRIVER_WEIGHTS[group].items():
            if name not in names:
                raise KeyError(f"wrinkle driver {name!r} is not an expression of the {face_model.kind} face model")
            mix[names.index(name), j] = weight
    return (expression @ mix).clamp(0.0, 1.0)


def landmark_uv(face_model: FaceModel) -> np.ndarray:
    """(68, 2) UV coordinates of the model's 68 landmarks (the first UV of a vertex on a seam)."""
    triangles = face_model.triangles.cpu().numpy().reshape(-1)
    uv_index = face_model.tri_uv_idx.cpu().numpy().reshape(-1)
    first = np.full(face_model.n_vertices, -1, np.int64)
    for vertex, index in zip(triangles[::-1], uv_index[::-1]):  # reversed: the first occurrence wins
        first[vertex] = index
    return face_model.uv.cpu().numpy()[first[face_model.lmk68.cpu().numpy()]].astype(np.float64)


def uv_grid(size: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Texel-centre (u, v) grids (S, S) in the UV-image convention (row 0 is v = 1)."""
    centres = (torch.arange(size, dtype=dtype) + 0.5) / size
    v, u = torch.meshgrid(1.0 - centres, centres, indexing="ij")
    return u, v


def _super_gauss(x: torch.Tensor, half_width: float, power: int = 4) -> torch.Tensor:
    return torch.exp(-((x / half_width) ** power))


def _bezier_distance(u: torch.Tensor, v: torch.Tensor, p0: np.ndarray, p1: np.ndarray, p2: np.ndarray,
                     samples: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance to a quadratic Bezier curve, curve parameter of the nearest point) per texel."""
    t = torch.linspace(0.0, 1.0, samples, dtype=u.dtype)
    curve = ((1 - t)[:, None] ** 2 * torch.as_tensor(p0, dtype=u.dtype) + 2 * ((1 - t) * t)[:, None] * torch.as_tensor(p1, dtype=u.dtype)
             + (t ** 2)[:, None] * torch.as_tensor(p2, dtype=u.dtype))
    d2 = (u[..., None] - curve[:, 0]) ** 2 + (v[..., None] - curve[:, 1]) ** 2
    best, index = d2.min(-1)
    return best.sqrt(), t[index]


def wrinkle_patterns(face_model: FaceModel, style: WrinkleStyle, size: int) -> torch.Tensor:
    """(5, S, S) unit-depth wrinkle shape of each group (:data:`WRINKLE_GROUPS`) for one face, ``|x| <= 1``."""
    lmk = landmark_uv(face_model)
    u, v = uv_grid(size, torch.float64)
    out = torch.zeros(len(WRINKLE_GROUPS), size, size, dtype=torch.float64)
    # forehead: band above the brows, between the outer brow ends
    brow_top = float(lmk[17:27, 1].max())
    centre_u = float(lmk[[17, 26], 0].mean())
    half_u = 0.8 * float(lmk[26, 0] - lmk[17, 0]) / 2
    low, high = brow_top + 0.02 + style.forehead_shift, brow_top + 0.11 + style.forehead_shift
    arched = v + style.forehead_arch * (u - centre_u) ** 2
    envelope = _super_gauss(u - centre_u, half_u) * _super_gauss(arched - (low + high) / 2, (high - low) / 2)
    out[0] = envelope * torch.cos(2 * math.pi * (arched - low) / style.forehead_period + style.forehead_phase)
    # crow's feet and nasolabial folds, per side (side +1: the subject's left, larger u on ICT's layout)
    for k, (side, corner, wing, mouth) in enumerate(((+1, 45, 35, 54), (-1, 36, 31, 48))):
        centre = lmk[corner] + np.array([side * 0.012, 0.0])
        du, dv = (u - centre[0]) * side, v - centre[1]
        radius, angle = torch.sqrt(du**2 + dv**2), torch.atan2(dv, du)
        envelope = torch.exp(-(((radius - style.crows_radius) / 0.022) ** 2)) * _super_gauss(angle, 1.0) * (du > -0.005)
        out[1 + k] = envelope * torch.cos(style.crows_frequency * angle + style.crows_phase)
        p0 = lmk[wing] + np.array([side * style.nasolabial_offset * 0.6, 0.01])
        p2 = lmk[mouth] + np.array([side * style.nasolabial_offset, -0.045])
        p1 = (p0 + p2) / 2 + np.array([side * style.nasolabial_bend, 0.0])
        distance, t = _bezier_distance(u, v, p0, p1, p2)
        x2 = (distance / style.nasolabial_width) ** 2
        profile = -(1.0 - x2) * torch.exp(-x2)  # a groove (-1 on the curve) with raised shoulders
        taper = torch.sin(math.pi * t.clamp(0, 1)).clamp_min(0) ** 0.5
        out[3 + k] = profile * taper
    return out.to(face_model.mean_shape.dtype)


def style_depths(style: WrinkleStyle) -> np.ndarray:
    """(5,) depth of each group (face-model units), :data:`WRINKLE_GROUPS` order."""
    return np.array([style.forehead_depth, style.crows_depth, style.crows_depth, style.nasolabial_depth, style.nasolabial_depth])


def wrinkle_displacement(
    face_model: FaceModel, styles: list[WrinkleStyle], expression: torch.Tensor, size: int,
    patterns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ground-truth displacement maps (B, 1, S, S), model units, along the normals (positive = outwards).

    Args:
        face_model: the morphable model (its landmarks anchor the wrinkles, its ``exp_names`` drive them).
        styles: one :class:`WrinkleStyle` per face.
        expression: (B, K_exp) expression weights.
        size: UV side.
        patterns: optional precomputed ``(B, 5, S, S)`` :func:`wrinkle_patterns` of the styles (speed).

    Returns:
        ``sum_g depth_g x driver_g(expression) x pattern_g``, 0 outside the UV layout.
    """
    if len(styles) != expression.shape[0]:
        raise ValueError(f"{len(styles)} styles for {expression.shape[0]} expressions")
    if patterns is None:
        patterns = torch.stack([wrinkle_patterns(face_model, s, size) for s in styles])
    patterns = patterns.to(expression.device, expression.dtype)
    depths = torch.as_tensor(np.stack([style_depths(s) for s in styles]), dtype=expression.dtype, device=expression.device)
    drivers = wrinkle_drivers(face_model, expression) * depths
    return (drivers[:, :, None, None] * patterns).sum(1, keepdim=True)


def normal_angle_degrees(normals_a: torch.Tensor, normals_b: torch.Tensor) -> torch.Tensor:
    """Per-texel angle (B, 1, S, S) in degrees between two normal maps (B, 3, S, S).

    ``atan2(|a x b|, a . b)`` in float64: exact for small angles (``acos`` of a float32 cosine cannot resolve
    angles below ~0.02 degrees, the size of the differences this benchmark measures)."""
    a, b = normals_a.double(), normals_b.double()
    sine = torch.linalg.vector_norm(torch.cross(a, b, dim=1), dim=1, keepdim=True)
    cosine = (a * b).sum(1, keepdim=True)
    return torch.rad2deg(torch.atan2(sine, cosine)).to(normals_a.dtype)
