"""3D morphable face models behind one interface: ICT-FaceKit (open default) and BFM09 (Deng et al.).

``S = mean_shape + id_basis . alpha + exp_basis . beta`` and, where the model has one,
``T = albedo_mean + albedo_basis . delta``. Coefficient vectors follow Deng et al.'s block order
``id, exp, tex, angles(3), gamma(27), trans(3)`` with each model's own block sizes; read them from
:class:`CoefficientLayout` (``FaceModel.layout``), never hard-code 80/64/80.

Units: ``FaceModel.mm_per_unit`` (ICT centimetres: 10, BFM decimetres: 100). Both models are
recentred like Deng et al. (mean of the face-region vertices at the origin); the offset that was
removed is kept in ``FaceModel.recenter_offset``.

Closed surface: by default (``close_holes=True``, parameter ``face_model.close_holes``) the loaders
fill every inner boundary loop of the mesh (ICT: both eyes and the mouth; see
:mod:`facedetail.geometry.holes`) so renders, UV baking and exports see no holes. The fill's
vertices come after the original ones (``FaceModel.n_open_vertices``), are linear in the bases
(they follow identity and expression) and are outside ``face_mask`` / ``skin_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from facedetail.geometry.camera import PerspectiveCamera
from facedetail.geometry.holes import HoleFill, plan_hole_fill
from facedetail.geometry.lighting import SH_COEFFS_PER_CHANNEL
from facedetail.utils import SettingError

BLOCK_ORDER = ("id", "exp", "tex", "angles", "gamma", "trans")

ICT_KEYS = {
    "neutral": "(V, 3) float mean shape in centimetres",
    "id_basis": "(K_id, V, 3) identity deltas",
    "exp_basis": "(K_exp, V, 3) expression deltas",
    "exp_names": "(K_exp,) str",
    "tris": "(F, 3) int triangle vertex ids",
    "tri_uv_idx": "(F, 3) int per-corner uv ids",
    "uv": "(T, 2) float texture coordinates",
    "lmk68": "(68,) int landmark vertex ids",
}
BFM_KEYS = {
    "meanshape": "(1, 3N) mean shape in decimetres",
    "idBase": "(3N, K_id) identity basis",
    "exBase": "(3N, K_exp) expression basis",
    "meantex": "(1, 3N) mean albedo in 0..255",
    "texBase": "(3N, K_tex) albedo basis (0..255 scale)",
    "tri": "(F, 3) 1-based triangle vertex ids",
    "keypoints": "(68,) 1-based landmark vertex ids",
}


class FaceModelFileError(SettingError):
    """A face-model file exists but does not have the expected keys or shapes."""


@dataclass(frozen=True)
class CoefficientLayout:
    """Sizes and slices of the coefficient blocks, in Deng et al.'s order.

    BFM09: 80/64/80/3/27/3 = 257; ICT: 100/53/0/3/27/3 = 186.
    """

    n_id: int
    n_exp: int
    n_tex: int
    n_angles: int = 3
    n_gamma: int = 3 * SH_COEFFS_PER_CHANNEL
    n_trans: int = 3

    @property
    def sizes(self) -> dict[str, int]:
        """Block name -> size, in order."""
        return dict(zip(BLOCK_ORDER, (self.n_id, self.n_exp, self.n_tex, self.n_angles, self.n_gamma, self.n_trans)))

    @property
    def slices(self) -> dict[str, slice]:
        """Block name -> slice into the coefficient vector."""
        out, start = {}, 0
        for name, size in self.sizes.items():
            out[name] = slice(start, start + size)
            start += size
        return out

    @property
    def total(self) -> int:
        """Length of the full coefficient vector."""
        return sum(self.sizes.values())

    def split(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split (B, total) coefficients into the blocks (views, (B, size) each)."""
        if coeffs.shape[-1] != self.total:
            raise ValueError(f"coefficients have {coeffs.shape[-1]} entries, the layout expects {self.total} ({self.sizes})")
        return {name: coeffs[..., s] for name, s in self.slices.items()}

    def join(self, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate blocks (missing or empty ones become zeros) into (B, total) coefficients."""
        ref = next(v for v in blocks.values() if v is not None)
        batch = ref.shape[0]
        parts = []
        for name, size in self.sizes.items():
            block = blocks.get(name)
            if block is None:
                block = ref.new_zeros(batch, size)
            if block.shape[-1] != size:
                raise ValueError(f"block '{name}' has {block.shape[-1]} entries, expected {size}")
            parts.append(block)
        return torch.cat(parts, dim=-1)

    def zeros(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch, total) zero coefficients (neutral shape, frontal, ambient light 0.8, no shift)."""
        return torch.zeros(batch, self.total, device=device, dtype=dtype)


class FaceModel(torch.nn.Module):
    """A linear 3D face model (tensors are buffers: ``model.to(device)`` moves everything).

    Attributes (V vertices, F triangles, T uv coordinates):
        kind: ``"ict"`` or ``"bfm"``.
        mean_shape: (V, 3) model units, recentred.
        id_basis: (K_id, V, 3); exp_basis: (K_exp, V, 3).
        albedo_mean: (V, 3) in [0, 1] or None; albedo_basis: (K_tex, V, 3) or None.
        triangles: (F, 3) long, counter-clockwise seen from the front (normals point out).
        uv: (T, 2) in [0, 1] (v up); tri_uv_idx: (F, 3) long per-corner indices into ``uv``.
        lmk68: (68,) long vertex ids (iBUG order). face_mask: (V,) bool photometric region.
        skin_mask: (V,) bool skin region (BFM ``skinmask``; ICT: same as face_mask).
        exp_names: names of the expression blocks. exp_bounds: (lo, hi) or None (ICT: (0, 1)).
        mm_per_unit: ICT 10 (cm), BFM 100 (dm). camera: Deng's camera in these units.
        layout: the :class:`CoefficientLayout`. recenter_offset: (3,) removed mean, model units.
        hole_fill: the :class:`~facedetail.geometry.holes.HoleFill` that closed the mesh (None: as
            loaded); vertices ``n_open_vertices ..`` and the last triangles are the fill.
    """

    def __init__(
        self,
        *,
        kind: str,
        mean_shape: np.ndarray,
        id_basis: np.ndarray,
        exp_basis: np.ndarray,
        triangles: np.ndarray,
        uv: np.ndarray,
        tri_uv_idx: np.ndarray,
        lmk68: np.ndarray,
        face_mask: np.ndarray,
        exp_names: tuple[str, ...],
        mm_per_unit: float,
        albedo_mean: np.ndarray | None = None,
        albedo_basis: np.ndarray | None = None,
        skin_mask: np.ndarray | None = None,
        exp_bounds: tuple[float, float] | None = None,
        recenter: bool = True,
        source_path: str = "",
        hole_fill: HoleFill | None = None,
    ) -> None:
        super().__init__()
        self.hole_fill = hole_fill
        self.kind = kind
        self.exp_names = tuple(str(n) for n in exp_names)
        self.exp_bounds = exp_bounds
        self.mm_per_unit = float(mm_per_unit)
        self.camera = PerspectiveCamera.for_units(self.mm_per_unit)
        self.source_path = source_path
        mean_shape = np.asarray(mean_shape, np.float32)
        face_mask = np.asarray(face_mask, bool)
        offset = mean_shape[face_mask].mean(0) if recenter else np.zeros(3, np.float32)
        f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        i64 = lambda a: torch.as_tensor(np.asarray(a, np.int64))  # noqa: E731
        self.register_buffer("mean_shape", f32(mean_shape - offset))
        self.register_buffer("recenter_offset", f32(offset))
        self.register_buffer("id_basis", f32(id_basis))
        self.register_buffer("exp_basis", f32(exp_basis))
        self.register_buffer("albedo_mean", None if albedo_mean is None else f32(albedo_mean))
        self.register_buffer("albedo_basis", None if albedo_basis is None else f32(albedo_basis))
        self.register_buffer("triangles", i64(triangles))
        self.register_buffer("uv", f32(uv))
        self.register_buffer("tri_uv_idx", i64(tri_uv_idx))
        self.register_buffer("lmk68", i64(lmk68))
        self.register_buffer("face_mask", torch.as_tensor(face_mask))
        self.register_buffer("skin_mask", torch.as_tensor(face_mask if skin_mask is None else np.asarray(skin_mask, bool)))
        n_tex = 0 if albedo_basis is None else int(albedo_basis.shape[0])
        self.layout = CoefficientLayout(n_id=int(id_basis.shape[0]), n_exp=int(exp_basis.shape[0]), n_tex=n_tex)

    @property
    def n_vertices(self) -> int:
        """Number of vertices V."""
        return int(self.mean_shape.shape[0])

    @property
    def n_open_vertices(self) -> int:
        """Vertex count of the mesh as loaded, before the hole fill (= ``n_vertices`` when none)."""
        return self.n_vertices if self.hole_fill is None else int(self.hole_fill.n_vertices)

    @property
    def has_albedo(self) -> bool:
        """True when the model has an albedo (texture) basis."""
        return self.albedo_basis is not None

    @property
    def device(self) -> torch.device:
        """Device of the model's tensors."""
        return self.mean_shape.device

    def expression_offsets(self, exp_coeffs: torch.Tensor) -> torch.Tensor:
        """Per-vertex expression displacement ``B . beta``: (B, K_exp) -> (B, V, 3), model units."""
        return _apply_basis(self.exp_basis, exp_coeffs, "exp")

    def identity_offsets(self, id_coeffs: torch.Tensor) -> torch.Tensor:
        """Per-vertex identity displacement ``A . alpha``: (B, K_id) -> (B, V, 3), model units."""
        return _apply_basis(self.id_basis, id_coeffs, "id")

    def shape(self, id_coeffs: torch.Tensor, exp_coeffs: torch.Tensor) -> torch.Tensor:
        """Model-space vertices ``mean + A alpha + B beta``: (B, K_id), (B, K_exp) -> (B, V, 3)."""
        return self.mean_shape + self.identity_offsets(id_coeffs) + self.expression_offsets(exp_coeffs)

    def albedo(self, tex_coeffs: torch.Tensor) -> torch.Tensor:
        """Per-vertex albedo in [0, 1] (not clamped): (B, K_tex) -> (B, V, 3).

        Raises:
            ValueError: for a model without an albedo basis (ICT); estimate albedo from the image.
        """
        if self.albedo_basis is None or self.albedo_mean is None:
            raise ValueError(f"the {self.kind} face model has no albedo basis; albedo has to come from the image")
        return self.albedo_mean + _apply_basis(self.albedo_basis, tex_coeffs, "tex")


def _apply_basis(basis: torch.Tensor, coeffs: torch.Tensor, name: str) -> torch.Tensor:
    """``sum_k coeffs[:, k] * basis[k]`` -> (B, V, 3)."""
    if coeffs.ndim != 2 or coeffs.shape[1] != basis.shape[0]:
        raise ValueError(f"{name} coefficients must have shape (B, {basis.shape[0]}), got {tuple(coeffs.shape)}")
    n_basis, n_vertices = basis.shape[0], basis.shape[1]
    return (coeffs.to(basis.dtype) @ basis.reshape(n_basis, n_vertices * 3)).reshape(-1, n_vertices, 3)


# --------------------------------------------------------------------------------------------- loaders


def load_face_model(
    kind: str,
    path: str | Path,
    *,
    uv_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    close_holes: bool = True,
) -> FaceModel:
    """Load a face model.

    Args:
        kind: ``"ict"`` (ICT-FaceKit npz, the open default) or ``"bfm"`` (Deng et al.'s
            ``BFM_model_front.mat``).
        path: the model file (from ``conf/``: ``face_model.ict_path`` / ``face_model.bfm_path``).
        uv_path: BFM only: optional ``.npz``/``.mat`` with ``uv`` (V, 2) (and optionally
            ``tri_uv_idx`` (F, 3)); without it a cylindrical projection is generated.
        device: where to put the tensors.
        close_holes: fill the mesh's inner boundary loops (eyes, mouth; see
            :func:`close_face_model_holes`); False keeps the mesh as stored.

    Raises:
        FileNotFoundError: the file does not exist (message names the path and the setting).
        FaceModelFileError: keys or shapes are not as expected (message lists what was expected).
    """
    kind = str(kind).lower()
    if kind == "ict":
        model = load_ict_model(path, close_holes=close_holes)
    elif kind == "bfm":
        model = load_bfm_model(path, uv_path=uv_path, close_holes=close_holes)
    else:
        raise ValueError(f"unknown face model kind '{kind}'; expected 'ict' or 'bfm'")
    return model.to(device)


def load_face_model_from_params(face_model_params: Mapping[str, Any], device: str | torch.device = "cpu") -> FaceModel:
    """Load from the ``face_model`` block of ``conf/base/parameters.yml`` (kind, ict_path, bfm_path,
    bfm_uv_path, close_holes: default True)."""
    kind = str(face_model_params.get("kind", "ict")).lower()
    key = f"{kind}_path"
    if key not in face_model_params:
        raise KeyError(f"face_model parameters need '{key}' for kind '{kind}'")
    return load_face_model(
        kind,
        face_model_params[key],
        uv_path=face_model_params.get("bfm_uv_path") or None,
        device=device,
        close_holes=bool(face_model_params.get("close_holes", True)),
    )


def _require_file(path: str | Path, what: str, expected: Mapping[str, str]) -> Path:
    path = Path(path)
    if not path.is_file():
        keys = ", ".join(f"{k} {v}" for k, v in expected.items())
        raise FileNotFoundError(
            f"{what} file not found: '{path}' (set face_model.*_path in conf/ or its environment variable). "
            f"Expected a file with keys: {keys}"
        )
    return path


#: The setting (and its environment variable) that names each kind of face-model file, for messages.
_SETTINGS = {"ICT": "face_model.ict_path / FACEDETAIL_ICT_MODEL", "BFM": "face_model.bfm_path / FACEDETAIL_BFM_MODEL",
             "UV": "face_model.bfm_uv_path / FACEDETAIL_BFM_UV"}


def _malformed(path: Path, what: str, problem: str, expected: Mapping[str, str]) -> FaceModelFileError:
    """One-line error naming the file, its setting, the problem and the expected keys (a :class:`SettingError`)."""
    keys = "; ".join(f"{k} {v}" for k, v in expected.items())
    setting = next((v for k, v in _SETTINGS.items() if k in what), "face_model.*_path")
    problem = " ".join(problem.split())  # one line
    if "allow_pickle" in problem:  # numpy advises loading pickles unsafely: never
        problem = problem.split("(", 1)[0] + "(holds pickled Python objects, refused)"
    return FaceModelFileError(f"malformed {what} file '{path}' (set {setting}): {problem}. Expected keys: {keys}")


def _check_indices(array: np.ndarray, upper: int, name: str, path: Path, what: str, expected: Mapping[str, str]) -> None:
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise _malformed(path, what, f"'{name}' has indices outside [0, {upper})", expected)


def load_ict_model(path: str | Path, close_holes: bool = True) -> FaceModel:
    """Load the ICT-FaceKit npz (see ``../shared/assets/README.md``); f16 bases become f32.

    Identity weights are ~N(0, 1); expression weights live in [0, 1] (``exp_bounds``). The face
    mask (photometric region) excludes neck, ears and the scalp: vertices inside the outline made by
    the jaw landmarks and the brows lifted by a quarter of the brow-to-chin height.
    """
    what = "ICT-FaceKit face model (.npz)"
    path = _require_file(path, what, ICT_KEYS)
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # zip/format errors have many types
        raise _malformed(path, what, f"cannot be read as .npz ({exc})", ICT_KEYS) from exc
    missing = [k for k in ICT_KEYS if k not in arrays]
    if missing:
        raise _malformed(path, what, f"missing keys {missing}", ICT_KEYS)
    neutral = arrays["neutral"]
    if neutral.ndim != 2 or neutral.shape[1] != 3:
        raise _malformed(path, what, f"'neutral' has shape {neutral.shape}", ICT_KEYS)
    n_vertices = neutral.shape[0]
    for key in ("id_basis", "exp_basis"):
        if arrays[key].ndim != 3 or arrays[key].shape[1:] != (n_vertices, 3):
            raise _malformed(path, what, f"'{key}' has shape {arrays[key].shape}, expected (K, {n_vertices}, 3)", ICT_KEYS)
    tris, tri_uv_idx, uv, lmk68 = arrays["tris"], arrays["tri_uv_idx"], arrays["uv"], arrays["lmk68"].reshape(-1)
    if tris.ndim != 2 or tris.shape[1] != 3 or tri_uv_idx.shape != tris.shape:
        raise _malformed(path, what, f"'tris' {tris.shape} / 'tri_uv_idx' {tri_uv_idx.shape} are not matching (F, 3)", ICT_KEYS)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise _malformed(path, what, f"'uv' has shape {uv.shape}", ICT_KEYS)
    if lmk68.shape != (68,):
        raise _malformed(path, what, f"'lmk68' has shape {arrays['lmk68'].shape}", ICT_KEYS)
    exp_names = arrays["exp_names"].reshape(-1)
    if exp_names.shape[0] != arrays["exp_basis"].shape[0]:
        raise _malformed(path, what, f"{exp_names.shape[0]} exp_names for {arrays['exp_basis'].shape[0]} expressions", ICT_KEYS)
    _check_indices(tris, n_vertices, "tris", path, what, ICT_KEYS)
    _check_indices(lmk68, n_vertices, "lmk68", path, what, ICT_KEYS)
    _check_indices(tri_uv_idx, uv.shape[0], "tri_uv_idx", path, what, ICT_KEYS)
    face_mask = landmark_outline_mask(neutral, lmk68, tris)
    return _face_model(
        close_holes,
        kind="ict",
        mean_shape=neutral.astype(np.float32),
        id_basis=arrays["id_basis"].astype(np.float32),
        exp_basis=arrays["exp_basis"].astype(np.float32),
        triangles=tris,
        uv=uv,
        tri_uv_idx=tri_uv_idx,
        lmk68=lmk68,
        face_mask=face_mask,
        exp_names=tuple(exp_names.tolist()),
        exp_bounds=(0.0, 1.0),
        mm_per_unit=10.0,
        source_path=str(path),
    )


def close_face_model_holes(fields: dict[str, Any], **fill_options: Any) -> dict[str, Any]:
    """:class:`FaceModel` keyword arguments with the mesh's inner holes filled.

    Appends the fill's vertices to ``mean_shape`` (with the eye bulge / mouth recess), to the
    identity / expression (/ albedo) bases (same affine combinations, no offset: the fill follows
    shape and expression), its triangles to ``triangles`` and its UVs to ``uv`` / ``tri_uv_idx``.
    The new vertices are outside ``face_mask`` and ``skin_mask``; BFM's per-vertex albedo mean is
    extended like the shape. A mesh without inner holes comes back unchanged (``hole_fill`` with
    no new vertices). ``fill_options`` go to :func:`~facedetail.geometry.holes.plan_hole_fill`.
    """
    mean_shape = np.asarray(fields["mean_shape"], np.float32)
    fill = plan_hole_fill(mean_shape, fields["triangles"], fields["uv"], fields["tri_uv_idx"], fields["lmk68"], **fill_options)
    out = dict(fields, hole_fill=fill)
    if not fill.n_new:
        return out
    out["mean_shape"] = fill.extend(mean_shape, with_offsets=True)
    for key in ("id_basis", "exp_basis", "albedo_mean", "albedo_basis"):
        if fields.get(key) is not None:
            out[key] = fill.extend(np.asarray(fields[key], np.float32))
    pad = np.zeros(fill.n_new, bool)
    out["face_mask"] = np.concatenate([np.asarray(fields["face_mask"], bool), pad])
    if fields.get("skin_mask") is not None:
        out["skin_mask"] = np.concatenate([np.asarray(fields["skin_mask"], bool), pad])
    else:
        out["skin_mask"] = out["face_mask"]
    out["triangles"] = np.concatenate([np.asarray(fields["triangles"], np.int64), fill.triangles])
    out["uv"] = np.concatenate([np.asarray(fields["uv"], np.float32), fill.uv.astype(np.float32)])
    out["tri_uv_idx"] = np.concatenate([np.asarray(fields["tri_uv_idx"], np.int64), fill.tri_uv_idx])
    return out


def _face_model(close_holes: bool, **fields: Any) -> FaceModel:
    """Build a :class:`FaceModel`, closing the mesh's inner holes first when ``close_holes``."""
    return FaceModel(**(close_face_model_holes(fields) if close_holes else fields))


def landmark_outline_mask(
    vertices: np.ndarray,
    lmk68: np.ndarray,
    triangles: np.ndarray,
    forehead_fraction: float = 0.25,
    eye_scale: float = 1.15,
) -> np.ndarray:
    """Photometric face region of a neutral mesh, from its 68 landmark vertices.

    Inside the outline (frontal x-y projection) made of the jaw line (landmarks 0..16) closed over
    the forehead by the brows (26..17) raised by ``forehead_fraction`` of the brow-to-chin height;
    in front of the jaw-line ends (no ears); outside the eye openings (landmarks 36..41 / 42..47
    scaled by ``eye_scale``: the ICT face-only mesh has open eye sockets and no eyeballs); and
    facing the camera (vertex normal z > 0: drops socket walls and the inner, rolled-in lips).
    """
    lmk = vertices[lmk68]
    brow_y = lmk[17:27, 1].mean()
    lift = forehead_fraction * (brow_y - lmk[8, 1])
    brows = lmk[26:16:-1, :2] + np.array([0.0, lift])
    polygon = np.concatenate([lmk[0:17, :2], brows], axis=0)
    inside = _points_in_polygon(vertices[:, :2], polygon)
    in_front = vertices[:, 2] >= min(lmk[0, 2], lmk[16, 2])
    in_eyes = np.zeros(len(vertices), bool)
    for eye in (slice(36, 42), slice(42, 48)):  # eye openings (the face-only mesh has open eye sockets)
        ring = lmk[eye, :2]
        centre = ring.mean(0)
        in_eyes |= _points_in_polygon(vertices[:, :2], centre + eye_scale * (ring - centre))
    facing_camera = _vertex_normals_np(vertices, triangles)[:, 2] > 0.0  # drops socket walls, inner lips
    return inside & in_front & ~in_eyes & facing_camera


def _vertex_normals_np(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals in numpy (used once at load time)."""
    v = np.asarray(vertices, np.float64)
    cross = np.cross(v[triangles[:, 1]] - v[triangles[:, 0]], v[triangles[:, 2]] - v[triangles[:, 0]])
    normals = np.zeros_like(v)
    for corner in range(3):
        np.add.at(normals, triangles[:, corner], cross)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def _points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over points: (P, 2), (M, 2) -> (P,) bool."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0][None], polygon[:, 1][None]
    x1, y1 = np.roll(polygon[:, 0], -1)[None], np.roll(polygon[:, 1], -1)[None]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at_y = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (crosses & (x < x_at_y)).sum(axis=1) % 2 == 1


def _mat_array(mat: Mapping[str, Any], key: str) -> np.ndarray:
    return np.asarray(mat[key])


def load_bfm_model(path: str | Path, uv_path: str | Path | None = None, close_holes: bool = True) -> FaceModel:
    """Load Deng et al.'s ``BFM_model_front.mat`` (decimetres; 1-based ``tri``/``keypoints``/masks).

    ``meantex``/``texBase`` are on a 0..255 scale and are divided by 255. The face mask comes from
    ``frontmask2_idx`` (1-based, Deng's photometric region) when present, else all vertices; the
    skin mask from ``skinmask`` when present. BFM has no UVs: pass ``uv_path`` or get the
    cylindrical projection of :func:`cylindrical_uv`.
    """
    from scipy.io import loadmat

    what = "BFM09 face model (Deng et al. BFM_model_front.mat)"
    path = _require_file(path, what, BFM_KEYS)
    try:
        mat = loadmat(str(path))
    except Exception as exc:
        raise _malformed(path, what, f"cannot be read as a MATLAB .mat file ({exc})", BFM_KEYS) from exc
    missing = [k for k in BFM_KEYS if k not in mat]
    if missing:
        raise _malformed(path, what, f"missing keys {missing}", BFM_KEYS)
    mean_flat = _mat_array(mat, "meanshape").reshape(-1)
    if mean_flat.size % 3:
        raise _malformed(path, what, f"'meanshape' has {mean_flat.size} entries, not a multiple of 3", BFM_KEYS)
    n_vertices = mean_flat.size // 3

    def basis(key: str) -> np.ndarray:
        b = _mat_array(mat, key)
        if b.ndim != 2 or b.shape[0] != 3 * n_vertices:
            raise _malformed(path, what, f"'{key}' has shape {b.shape}, expected ({3 * n_vertices}, K)", BFM_KEYS)
        return b.astype(np.float32).T.reshape(b.shape[1], n_vertices, 3)

    id_basis, exp_basis, tex_basis = basis("idBase"), basis("exBase"), basis("texBase")
    mean_tex = _mat_array(mat, "meantex").reshape(-1)
    if mean_tex.size != 3 * n_vertices:
        raise _malformed(path, what, f"'meantex' has {mean_tex.size} entries, expected {3 * n_vertices}", BFM_KEYS)
    tri = _mat_array(mat, "tri").astype(np.int64)
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise _malformed(path, what, f"'tri' has shape {tri.shape}, expected (F, 3)", BFM_KEYS)
    tri = tri - 1
    keypoints = _mat_array(mat, "keypoints").reshape(-1).astype(np.int64) - 1
    if keypoints.shape != (68,):
        raise _malformed(path, what, f"'keypoints' has {keypoints.size} entries, expected 68", BFM_KEYS)
    _check_indices(tri, n_vertices, "tri (1-based)", path, what, BFM_KEYS)
    _check_indices(keypoints, n_vertices, "keypoints (1-based)", path, what, BFM_KEYS)
    face_mask = np.ones(n_vertices, bool)
    if "frontmask2_idx" in mat:
        front = _mat_array(mat, "frontmask2_idx").reshape(-1).astype(np.int64) - 1
        _check_indices(front, n_vertices, "frontmask2_idx (1-based)", path, what, BFM_KEYS)
        face_mask = np.zeros(n_vertices, bool)
        face_mask[front] = True
    skin_mask = None
    if "skinmask" in mat:
        skin = _mat_array(mat, "skinmask").reshape(-1)
        if skin.size != n_vertices:
            raise _malformed(path, what, f"'skinmask' has {skin.size} entries, expected {n_vertices}", BFM_KEYS)
        skin_mask = skin.astype(bool)
    mean_shape = mean_flat.reshape(n_vertices, 3).astype(np.float32)
    if uv_path is not None:
        uv, tri_uv_idx = load_uv_file(uv_path, n_vertices, tri)
    else:
        uv, tri_uv_idx = cylindrical_uv(mean_shape), tri.copy()
    return _face_model(
        close_holes,
        kind="bfm",
        mean_shape=mean_shape,
        id_basis=id_basis,
        exp_basis=exp_basis,
        albedo_mean=mean_tex.reshape(n_vertices, 3).astype(np.float32) / 255.0,
        albedo_basis=tex_basis / 255.0,
        triangles=tri,
        uv=uv,
        tri_uv_idx=tri_uv_idx,
        lmk68=keypoints,
        face_mask=face_mask,
        skin_mask=skin_mask,
        exp_names=tuple(f"exp_{k:02d}" for k in range(exp_basis.shape[0])),
        exp_bounds=None,
        mm_per_unit=100.0,
        source_path=str(path),
    )


def cylindrical_uv(vertices: np.ndarray, margin: float = 0.02) -> np.ndarray:
    """Per-vertex UVs from a cylindrical projection around the vertical (y) axis.

    The axis sits behind the face (at ``z_min - depth``), so ``u`` follows the azimuth
    ``atan2(x - x_mid, z - z_axis)`` and ``v`` the height y (up); both are scaled to
    ``[margin, 1 - margin]``. No seams: ``tri_uv_idx`` equals the triangles.
    """
    v = np.asarray(vertices, np.float64)
    x_mid = 0.5 * (v[:, 0].min() + v[:, 0].max())
    depth = max(v[:, 2].max() - v[:, 2].min(), 1e-8)
    z_axis = v[:, 2].min() - depth
    azimuth = np.arctan2(v[:, 0] - x_mid, v[:, 2] - z_axis)
    height = v[:, 1]

    def rescale(a: np.ndarray) -> np.ndarray:
        span = max(a.max() - a.min(), 1e-12)
        return margin + (1 - 2 * margin) * (a - a.min()) / span

    return np.stack([rescale(azimuth), rescale(height)], axis=1).astype(np.float32)


def load_uv_file(path: str | Path, n_vertices: int, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read UVs for a model without them: ``.npz`` or ``.mat`` with ``uv``/``UV`` (V, 2) or
    (T, 2) plus ``tri_uv_idx`` (F, 3)."""
    expected = {"uv": "(V, 2) or (T, 2) with tri_uv_idx", "tri_uv_idx": "(F, 3) optional, 0-based"}
    what = "UV coordinates"
    path = _require_file(path, what, expected)
    try:
        if path.suffix.lower() == ".mat":
            from scipy.io import loadmat

            arrays = {k: v for k, v in loadmat(str(path)).items() if not k.startswith("__")}
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise _malformed(path, what, f"cannot be read ({exc})", expected) from exc
    uv = arrays.get("uv", arrays.get("UV"))
    if uv is None or uv.ndim != 2 or uv.shape[1] != 2:
        raise _malformed(path, what, "no (N, 2) 'uv' array", expected)
    if "tri_uv_idx" in arrays:
        tri_uv_idx = np.asarray(arrays["tri_uv_idx"], np.int64)
        if tri_uv_idx.shape != triangles.shape:
            raise _malformed(path, what, f"'tri_uv_idx' {tri_uv_idx.shape} does not match triangles {triangles.shape}", expected)
        _check_indices(tri_uv_idx, uv.shape[0], "tri_uv_idx", path, what, expected)
    elif uv.shape[0] == n_vertices:
        tri_uv_idx = triangles.copy()
    else:
        raise _malformed(path, what, f"'uv' has {uv.shape[0]} rows for {n_vertices} vertices and no tri_uv_idx", expected)
    return uv.astype(np.float32), tri_uv_idx
