"""Exports users open in other tools: OBJ meshes with UVs (+ MTL + texture), the dense detailed
UV-grid mesh, 16-bit displacement PNGs with a JSON sidecar, normal-map PNGs, visualisation strips
and GIFs (plain module, no Kedro, no torch import: torch tensors are accepted and converted).

Conventions (shared with :mod:`facedetail.render.rasterizer` and :mod:`facedetail.geometry.uv`):

* **Model frame / units**: coordinates are written in the face model's units (ICT: cm, BFM: dm;
  see :func:`units_from_mm_per_unit`), x to the image right, **y up**, z towards the camera (out of
  the face). Every OBJ starts with a comment header stating the unit and the axes. Blender's OBJ
  importer (default "Y up") shows the face upright.
* **Winding**: OBJ faces are counter-clockwise seen from the front (outside), so face normals
  ``(v1 - v0) x (v2 - v0)`` point outwards.
* **UV**: ``(u, v)`` in [0, 1], origin bottom-left as in OBJ. A UV map ``(C, S, S)`` has texel
  ``(row r, col c)`` centred at ``u = (c + 0.5) / S``, ``v = 1 - (r + 0.5) / S``; row 0 is the top
  (v = 1), which is also the top row of a PNG, so UV maps are saved as PNG without flipping.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

#: Name of the OBJ unit for the face models' ``mm_per_unit``.
UNIT_NAMES = {1.0: "mm", 10.0: "cm", 100.0: "dm", 1000.0: "m"}
#: Units the exports can be written in (``inference.export_units`` / ``--units``): millimetres per unit.
EXPORT_UNITS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
#: Default long-edge filter of the dense UV-grid mesh: off (see :func:`uv_grid_mesh` for the measurements).
DEFAULT_MAX_EDGE_RATIO: float | None = None
DISPLACEMENT_ENCODING = "value = pixel / 65535 * scale + offset"
PNG16_MAX = 65535


class ExportError(ValueError):
    """Input to an exporter has the wrong shape/type/values (the message says what was expected)."""


# ----------------------------------------------------------------------------------------------
# small helpers


def to_numpy(array: Any, name: str = "array") -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device, detached) or a nested list."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise ExportError(f"{name} could not be converted to a numpy array: {error}") from error


def units_from_mm_per_unit(mm_per_unit: float) -> str:
    """OBJ unit name for a face model's ``mm_per_unit`` (ICT 10 -> "cm", BFM 100 -> "dm")."""
    key = float(mm_per_unit)
    if key in UNIT_NAMES:
        return UNIT_NAMES[key]
    return f"{key:g} mm"


def unit_scale(mm_per_unit: float, units: str) -> float:
    """Factor from a face model's units (``mm_per_unit``) to ``units`` (one of :data:`EXPORT_UNITS`): ICT cm -> m = 0.01."""
    if units not in EXPORT_UNITS:
        raise ExportError(f"units must be one of {sorted(EXPORT_UNITS)}, got {units!r}")
    return float(mm_per_unit) / EXPORT_UNITS[units]


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+=@,-]+")


def safe_file_name(name: str, fallback: str = "face") -> str:
    """A file-name-safe version of ``name`` for files that OBJ/MTL lines reference.

    Control characters (newline, tab, ...), whitespace, path separators, quotes and other characters outside
    ``[A-Za-z0-9._+=@,-]`` become ``_`` (runs collapse), accents are dropped, leading dots removed, so a
    photo named ``"a b\nmtllib x.mtl.jpg"`` cannot inject lines into an OBJ/MTL or break ``mtllib``.
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE_NAME.sub("_", text).strip("_").lstrip(".")
    return text[:200] or fallback


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text (``\\n`` line ends) to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _one_line(text: str) -> str:
    """Comment text on one line: control characters become spaces."""
    return "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in str(text))


def _squeeze_leading_ones(array: np.ndarray, ndim: int) -> np.ndarray:
    while array.ndim > ndim and array.shape[0] == 1:
        array = array[0]
    return array


def _as_points(array: Any, name: str, columns: int) -> np.ndarray:
    points = _squeeze_leading_ones(to_numpy(array, name), 2)
    if points.ndim != 2 or points.shape[1] != columns:
        raise ExportError(f"{name} must have shape (N, {columns}), got {points.shape}")
    if not np.issubdtype(points.dtype, np.number):
        raise ExportError(f"{name} must be numeric, got dtype {points.dtype}")
    points = points.astype(np.float64)
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points)).any(axis=1).sum())
        raise ExportError(f"{name} has {bad} rows with NaN/inf values; OBJ files cannot hold them")
    return points


def _as_indices(array: Any, name: str, upper: int, upper_name: str) -> np.ndarray:
    indices = _squeeze_leading_ones(to_numpy(array, name), 2)
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise ExportError(f"{name} must have shape (F, 3), got {indices.shape}")
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        if not np.array_equal(indices, np.round(indices)):
            raise ExportError(f"{name} must hold integer indices, got dtype {indices.dtype}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= upper):
        raise ExportError(
            f"{name} must index 0..{upper - 1} ({upper_name} has {upper} rows), "
            f"got range {indices.min()}..{indices.max()}"
        )
    return indices


def _prepare_output(path: str | Path, suffixes: Sequence[str]) -> Path:
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ExportError(f"output path {path} must end with one of {tuple(suffixes)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def to_uint8_image(image: Any, name: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 RGB image from (H, W, 3|4), (H, W), (3, H, W) or (1, 3, H, W) input.

    uint8 is kept; floats are taken as [0, 1] (clipped, rounded); uint16 is scaled by 1/257.
    Channel-first input is recognised when the first axis has 1 or 3 entries and the last does not.
    """
    image = _squeeze_leading_ones(to_numpy(image, name), 3)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ExportError(f"{name} must be an (H, W, 3) RGB image (or (3, H, W)), got shape {image.shape}")
    if image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.uint16:
        return np.round(image / 257.0).astype(np.uint8)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if not np.issubdtype(image.dtype, np.number):
        raise ExportError(f"{name} must be numeric, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.integer):
        return np.clip(image, 0, 255).astype(np.uint8)
    image = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_rgb_png(path: Path, image_rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8/uint16 RGB array as PNG (cv2 wants BGR)."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(image_rgb[..., ::-1])):
        raise OSError(f"could not write PNG {path}")


# ----------------------------------------------------------------------------------------------
# OBJ


def _to_metres(units: str) -> str:
    """The scale factor from ``units`` to metres as text ("0.01" for cm; "?" for an unknown unit)."""
    for mm, name in UNIT_NAMES.items():
        if name == units:
            return f"{mm / 1000.0:g}"
    return "?"


def _obj_header(units: str, extra: Sequence[str] = ()) -> str:
    lines = [
        "# facedetail export",
        f"# units: {units}" + ("" if units == "m" else
                                f" (Blender and engines assume metres: import with scale {_to_metres(units)} or export with --units m)"),
        "# axes: y up, x to the image right, z towards the camera (out of the face); "
        "faces counter-clockwise seen from outside",
        "# uv: origin bottom-left (v up)",
        *[f"# {_one_line(line)}" for line in extra],
    ]
    return "\n".join(lines) + "\n"


def write_obj_with_uv(
    path: str | Path,
    vertices: Any,
    faces: Any,
    uv: Any,
    face_uv_idx: Any,
    normals: Any = None,
    texture_png: Any = None,
    material_name: str = "face_material",
    *,
    units: str = "cm",
    texture_filename: str | None = None,
    comments: Sequence[str] = (),
    normal_map_filename: str | None = None,
    displacement_filename: str | None = None,
    mtl_comments: Sequence[str] = (),
) -> dict[str, Path]:
    """Write a triangle mesh with per-corner UVs as Wavefront OBJ (+ MTL + texture PNG).

    Args:
        path: the ``.obj`` file (parent folders are created).
        vertices: (V, 3) positions in the face model's units (``units``), y up.
        faces: (F, 3) vertex indices (0-based), counter-clockwise seen from outside.
        uv: (T, 2) texture coordinates, origin bottom-left.
        face_uv_idx: (F, 3) per-corner indices into ``uv`` (0-based; seams allowed).
        normals: optional (V, 3) per-vertex normals, written as ``vn`` with the vertex's index.
        texture_png: optional (H, W, 3) uint8 (or float in [0, 1], or (3, H, W)) texture, row 0 = v 1.
            When given, ``<stem>.mtl`` (``map_Kd``) and the PNG are written next to the OBJ.
        material_name: ``newmtl`` / ``usemtl`` name (no whitespace).
        units: unit name written in the header (see :func:`units_from_mm_per_unit`).
        texture_filename: PNG file name (default ``<stem>_texture.png``), relative to the OBJ folder.
        comments: extra header comment lines (control characters become spaces).
        normal_map_filename: an already written TANGENT-space normal map PNG next to the OBJ, referenced in
            the MTL as ``norm`` and ``map_Bump -bm 1`` (with a texture only).
        displacement_filename: an already written displacement PNG next to the OBJ, referenced as ``disp``.
        mtl_comments: comment lines of the MTL.

    The names the OBJ/MTL reference (MTL, texture, maps) pass through :func:`safe_file_name`, so no
    whitespace or control character reaches an ``mtllib``/``map_*`` line; the OBJ is written atomically.

    Returns:
        ``{"obj": path, "mtl": path, "texture": path}`` (the last two only with a texture).

    Raises:
        ExportError: shapes, index ranges, non-finite values or names are wrong.
    """
    path = _prepare_output(path, (".obj",))
    vertices_np = _as_points(vertices, "vertices", 3)
    uv_np = _as_points(uv, "uv", 2)
    faces_np = _as_indices(faces, "faces", len(vertices_np), "vertices")
    face_uv_np = _as_indices(face_uv_idx, "face_uv_idx", len(uv_np), "uv")
    if face_uv_np.shape != faces_np.shape:
        raise ExportError(f"face_uv_idx must have the shape of faces {faces_np.shape}, got {face_uv_np.shape}")
    normals_np = None
    if normals is not None:
        normals_np = _as_points(normals, "normals", 3)
        if len(normals_np) != len(vertices_np):
            raise ExportError(f"normals must have one row per vertex ({len(vertices_np)}), got {len(normals_np)}")
        lengths = np.linalg.norm(normals_np, axis=1, keepdims=True)
        normals_np = np.where(lengths > 1e-12, normals_np / np.maximum(lengths, 1e-12), [0.0, 0.0, 1.0])
    if not material_name or any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in material_name):
        raise ExportError(f"material_name must be a non-empty name without whitespace, got {material_name!r}")

    written: dict[str, Path] = {"obj": path}
    with_texture = texture_png is not None
    if with_texture:
        texture_rgb = to_uint8_image(texture_png, "texture_png")
        texture_path = path.with_name(safe_file_name(texture_filename or f"{path.stem}_texture.png"))
        if texture_path.suffix.lower() != ".png":
            raise ExportError(f"texture_filename must end with .png, got {texture_path.name}")
        mtl_path = path.with_name(safe_file_name(path.stem) + ".mtl")
        _write_rgb_png(texture_path, texture_rgb)
        maps = [f"map_Kd {texture_path.name}"]
        if normal_map_filename:
            name = safe_file_name(normal_map_filename)
            # `norm` (PBR extension) and `map_Bump -bm 1` (what Blender's importer maps to a Normal Map node):
            # both name the TANGENT-space normal map (OpenGL, +Y green up)
            maps += [f"norm {name}", f"map_Bump -bm 1.000000 {name}"]
        if displacement_filename:
            maps.append(f"disp {safe_file_name(displacement_filename)}")
        atomic_write_text(
            mtl_path,
            "# facedetail export\n"
            + "".join(f"# {_one_line(line)}\n" for line in mtl_comments)
            + f"newmtl {material_name}\n"
            "Ka 1.000000 1.000000 1.000000\n"
            "Kd 1.000000 1.000000 1.000000\n"
            "Ks 0.000000 0.000000 0.000000\n"
            "d 1.0\n"
            "illum 1\n"
            + "".join(line + "\n" for line in maps),
        )
        written.update(mtl=mtl_path, texture=texture_path)

    extra = [f"{len(vertices_np)} vertices, {len(faces_np)} faces, {len(uv_np)} uv", *comments]
    handle = io.StringIO()
    handle.write(_obj_header(units, extra))
    if with_texture:
        handle.write(f"mtllib {written['mtl'].name}\n")
    np.savetxt(handle, vertices_np, fmt="v %.6f %.6f %.6f")
    np.savetxt(handle, uv_np, fmt="vt %.6f %.6f")
    if normals_np is not None:
        np.savetxt(handle, normals_np, fmt="vn %.6f %.6f %.6f")
    if with_texture:
        handle.write(f"usemtl {material_name}\n")
    if normals_np is not None:
        corners = np.stack([faces_np, face_uv_np, faces_np], axis=-1).reshape(-1, 9) + 1
        np.savetxt(handle, corners, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    else:
        corners = np.stack([faces_np, face_uv_np], axis=-1).reshape(-1, 6) + 1
        np.savetxt(handle, corners, fmt="f %d/%d %d/%d %d/%d")
    atomic_write_text(path, handle.getvalue())
    return written


# ----------------------------------------------------------------------------------------------
# dense UV-grid mesh


def _as_map(array: Any, name: str, channels: int | None) -> np.ndarray:
    """(C, H, W) float map from (C, H, W) or (1, C, H, W); (H, W) when ``channels`` is None."""
    data = to_numpy(array, name)
    ndim = 2 if channels is None else 3
    data = _squeeze_leading_ones(data, ndim)
    if data.ndim != ndim or (channels is not None and data.shape[0] != channels):
        expected = "(S, S)" if channels is None else f"({channels}, S, S)"
        raise ExportError(f"{name} must have shape {expected} (or with leading 1s), got {to_numpy(array).shape}")
    return data


def _as_valid(valid: Any, shape: tuple[int, int], name: str = "valid") -> np.ndarray:
    mask = _squeeze_leading_ones(to_numpy(valid, name), 2)
    if mask.shape != shape:
        raise ExportError(f"{name} must have shape {shape} like the map, got {mask.shape}")
    return mask.astype(bool)


def texel_uv(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> np.ndarray:
    """UV of texel centres: ``u = (c + 0.5) / W``, ``v = 1 - (r + 0.5) / H`` -> (N, 2)."""
    return np.stack([(cols + 0.5) / width, 1.0 - (rows + 0.5) / height], axis=-1)


def _grid_triangles(index: np.ndarray, border_triangles: bool) -> np.ndarray:
    """Triangles of the texel grid, counter-clockwise in UV (v up); index -1 = invalid texel."""
    tl, tr = index[:-1, :-1], index[:-1, 1:]
    bl, br = index[1:, :-1], index[1:, 1:]
    ok_tl, ok_tr, ok_bl, ok_br = tl >= 0, tr >= 0, bl >= 0, br >= 0
    full = ok_tl & ok_tr & ok_bl & ok_br
    parts = [
        np.stack([tl[full], bl[full], br[full]], -1),
        np.stack([tl[full], br[full], tr[full]], -1),
    ]
    if border_triangles:
        three = (ok_tl.astype(int) + ok_tr + ok_bl + ok_br) == 3
        for missing, corners in (
            (~ok_tl, (bl, br, tr)),
            (~ok_tr, (tl, bl, br)),
            (~ok_bl, (tl, br, tr)),
            (~ok_br, (tl, bl, tr)),
        ):
            select = three & missing
            parts.append(np.stack([corner[select] for corner in corners], -1))
    return np.concatenate(parts, axis=0).astype(np.int64)


def triangle_normals(vertices: np.ndarray, faces: np.ndarray, normalize: bool = True) -> np.ndarray:
    """``(v1 - v0) x (v2 - v0)`` per face, (F, 3) (unit length when ``normalize``; 0 for degenerate)."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    normals = np.cross(v1 - v0, v2 - v0)
    if normalize:
        lengths = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = np.where(lengths > 0, normals / np.where(lengths > 0, lengths, 1.0), 0.0)
    return normals


def triangle_longest_edges(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Length of the longest edge of each triangle, (F,)."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    edges = np.stack([v1 - v0, v2 - v1, v0 - v2], axis=1)
    return np.linalg.norm(edges, axis=-1).max(axis=1)


ORIENT_MODES = ("chart", "triangle")


def _orient_faces(vertices: np.ndarray, faces: np.ndarray, reference: np.ndarray, orient: str) -> np.ndarray:
    """Flip faces whose normal disagrees with ``reference`` (F, 3): per connected chart (area-weighted
    majority, keeps the winding consistent) or per triangle."""
    if orient not in ORIENT_MODES:
        raise ExportError(f"orient must be one of {ORIENT_MODES}, got {orient!r}")
    reference = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    agreement = (triangle_normals(vertices, faces, normalize=False) * reference).sum(axis=1)
    if orient == "triangle":
        flip = agreement < 0
    else:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
        cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
        graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(vertices), len(vertices)))
        _, labels = connected_components(graph, directed=False)
        chart = labels[faces[:, 0]]
        votes = np.bincount(chart, weights=agreement, minlength=int(labels.max()) + 1)
        flip = votes[chart] < 0
    faces = faces.copy()
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return faces


def uv_grid_mesh(
    position_map: Any,
    valid: Any,
    normal_map: Any = None,
    *,
    outward: Sequence[float] | None = None,
    max_edge_ratio: float | None = DEFAULT_MAX_EDGE_RATIO,
    border_triangles: bool = True,
    orient: str = "chart",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dense mesh of a UV position map (DECA's scheme): one vertex per valid texel.

    Vertices are the valid texels in row-major order (vertex ``i`` is texel ``np.flatnonzero(valid)[i]``),
    each with the UV of its texel centre. Every 2x2 block of valid texels gives two triangles
    (diagonal top-left to bottom-right); with ``border_triangles`` a block with exactly three valid
    texels gives one, which smooths the staircase at chart borders.

    Orientation: triangles start counter-clockwise in UV (v up). The reference is the sum of each
    triangle's corner normals from ``normal_map`` (else the ``outward`` direction). With
    ``orient="chart"`` (default) each connected piece of the grid mesh is flipped as a whole when its
    area-weighted agreement ``sum((v1-v0) x (v2-v0) . ref)`` is negative: mirrored UV charts come out
    right and the winding stays consistent (a fold keeps facing inwards). ``orient="triangle"``
    flips every disagreeing triangle on its own. Without a reference the UV winding is kept.
    Measured on ICT (neutral, jawOpen, smile+blink; S = 64..512): the UV winding already agrees
    with the baked normals for all but 3..34 triangles (nostril interiors, where the UV map is
    folded/compressed), so charts are never flipped.

    Long-edge filter (off by default): a 2x2 block that straddles two abutting UV charts stitches
    far-apart surface points. ``max_edge_ratio=k`` drops triangles whose longest edge exceeds k x
    the median longest edge. Measured on ICT: its face UV layout is ONE island, nothing is
    stitched, and the longest triangles are legitimate nostril interiors (UV strongly compressed):
    max/median 2.6x (S=64), 5.6x (128), 11.3x (256), 16.5x (512); 99.9th percentile 2-3x. A filter
    at 6 would punch 15 (S=256) to 62 (S=512) holes in the nostrils, hence off. For layouts with
    abutting charts use k of about 20 (stitches span centimetres; the ICT worst is < 17x).
    Note: the ICT eye slits in UV are thinner than a texel below S = 256, so at S = 64 / 128 the
    dense mesh joins upper and lower eyelids (the mouth slit stays open from S = 64); no edge
    filter can tell these from real surface (edge ratio ~3).

    Args:
        position_map: (3, H, W) (or (1, 3, H, W)) surface points in model units.
        valid: (H, W) bool; non-finite texels are treated as invalid too.
        normal_map: optional (3, H, W) normals used as the orientation reference.
        outward: optional (3,) direction used as the reference when there is no normal map.
        max_edge_ratio: long-edge filter threshold (None: off).
        border_triangles: add one triangle per 2x2 block with three valid texels.
        orient: "chart" or "triangle" (see above).

    Returns:
        ``(vertices (M, 3) float32, faces (K, 3) int64, uv (M, 2) float32)``; the faces index both
        the vertices and the UVs (``face_uv_idx = faces``). Some vertices may be unreferenced
        (isolated texels, filtered triangles): see :func:`drop_unreferenced_vertices`.
    """
    positions = _as_map(position_map, "position_map", 3).astype(np.float64)
    height, width = positions.shape[1:]
    mask = _as_valid(valid, (height, width)) & np.isfinite(positions).all(axis=0)
    normals = None
    if normal_map is not None:
        normals = _as_map(normal_map, "normal_map", 3).astype(np.float64)
        if normals.shape[1:] != (height, width):
            raise ExportError(f"normal_map must be (3, {height}, {width}) like position_map, got {normals.shape}")
        normals = np.nan_to_num(normals)
    index = np.full((height, width), -1, dtype=np.int64)
    rows, cols = np.nonzero(mask)
    index[rows, cols] = np.arange(len(rows))
    vertices = positions[:, rows, cols].T
    uv = texel_uv(rows, cols, height, width)
    faces = _grid_triangles(index, border_triangles) if len(rows) else np.zeros((0, 3), np.int64)

    if len(faces):
        reference = None
        if normals is not None:
            vertex_normals = normals[:, rows, cols].T
            reference = vertex_normals[faces].sum(axis=1)
        elif outward is not None:
            direction = np.asarray(outward, dtype=np.float64).reshape(-1)
            if direction.shape != (3,):
                raise ExportError(f"outward must be a (3,) direction, got shape {np.shape(outward)}")
            reference = np.broadcast_to(direction, faces.shape)
        if reference is not None:
            faces = _orient_faces(vertices, faces, reference, orient)
        if max_edge_ratio is not None:
            longest = triangle_longest_edges(vertices, faces)
            median = float(np.median(longest))
            if median > 0:
                faces = faces[longest <= max_edge_ratio * median]
    return vertices.astype(np.float32), faces, uv.astype(np.float32)


def drop_unreferenced_vertices(
    vertices: np.ndarray, faces: np.ndarray, *per_vertex: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Remove vertices no face uses (keeping order).

    Returns:
        ``(vertices, faces reindexed, [each per-vertex array filtered], kept_index (M',))`` where
        ``kept_index`` are the old indices of the kept vertices.
    """
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.reshape(-1)] = True
    kept = np.flatnonzero(used)
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    return vertices[kept], remap[faces], [array[kept] for array in per_vertex], kept


def write_detail_obj(
    path: str | Path,
    position_map: Any,
    valid: Any,
    normal_map: Any,
    texture: Any = None,
    *,
    units: str = "cm",
    max_edge_ratio: float | None = DEFAULT_MAX_EDGE_RATIO,
    write_normals: bool = True,
    material_name: str = "face_detail",
    texture_filename: str | None = None,
) -> dict[str, Any]:
    """Write the dense detailed mesh of a (displaced) UV position map as OBJ, keeping its UVs.

    Built by :func:`uv_grid_mesh` (oriented by ``normal_map``); vertices that no triangle uses
    are dropped, so Blender/MeshLab show no loose points. The UVs are the texel centres in the
    same UV square as the face model's UVs, so the same UV texture works on the coarse and the
    dense mesh.

    Args:
        path: the ``.obj`` file.
        position_map: (3, S, S) detailed surface points (``p + d n``), model units.
        valid: (S, S) bool texels to keep.
        normal_map: (3, S, S) normals of the detailed surface (orientation reference; written as
            ``vn`` when ``write_normals``).
        texture: optional UV texture, (S', S', 3) uint8 / float [0, 1] or (3, S', S') float.
        units, material_name, texture_filename: as :func:`write_obj_with_uv`.
        max_edge_ratio: long-edge filter of :func:`uv_grid_mesh`.

    Returns:
        The written paths (``obj``, optionally ``mtl``, ``texture``) plus ``n_vertices`` and ``n_faces``.
    """
    vertices, faces, uv = uv_grid_mesh(position_map, valid, normal_map, max_edge_ratio=max_edge_ratio)
    if len(faces) == 0:
        raise ExportError(f"the position map for {path} has no 2x2 block of valid texels: nothing to export")
    normals = None
    if write_normals:
        positions = _as_map(position_map, "position_map", 3)
        mask = _as_valid(valid, positions.shape[1:]) & np.isfinite(positions).all(axis=0)
        normals = _as_map(normal_map, "normal_map", 3)[:, mask].T.astype(np.float64)  # same order as vertices
    per_vertex = [uv] if normals is None else [uv, normals]
    vertices, faces, kept_arrays, _ = drop_unreferenced_vertices(vertices, faces, *per_vertex)
    uv = kept_arrays[0]
    normals = kept_arrays[1] if normals is not None else None
    if normals is not None:
        normals = np.nan_to_num(normals)
    written: dict[str, Any] = dict(
        write_obj_with_uv(
            path,
            vertices,
            faces,
            uv,
            faces,
            normals=normals,
            texture_png=texture,
            material_name=material_name,
            units=units,
            texture_filename=texture_filename,
            comments=("dense UV-grid mesh: one vertex per UV texel (uv = texel centre)",),
        )
    )
    written.update(n_vertices=int(len(vertices)), n_faces=int(len(faces)))
    return written


# ----------------------------------------------------------------------------------------------
# maps


def displacement_sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a displacement PNG: ``<path>.json`` (e.g. ``x_disp.png.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_displacement_png16(
    path: str | Path,
    displacement: Any,
    valid: Any = None,
    *,
    units: str = "cm",
    include_zero: bool = True,
) -> dict[str, Any]:
    """Write a displacement map as a 16-bit grayscale PNG with a JSON sidecar ``<path>.json``.

    Encoding: ``pixel = round((value - offset) / scale * 65535)`` and back
    ``value = pixel / 65535 * scale + offset`` where ``[offset, offset + scale]`` is the range of
    the valid texels (extended to contain 0 when ``include_zero``, so zero displacement has an
    exact-ish pixel level). Quantisation error <= ``scale / 131070`` (< 1e-5 of the range).
    Invalid texels (``valid`` False, NaN) are written at the zero-displacement level (clipped to
    the range when 0 is outside it).

    The sidecar holds ``scale``, ``offset``, ``units``, ``encoding``, ``zero_pixel_value`` (pixel
    of zero displacement, rounded; null when 0 is outside the range), the displacement direction,
    and Blender Displace-modifier settings ``midlevel = -offset/scale``, ``strength = scale``.

    Args:
        path: ``.png`` output.
        displacement: (S, S) (or (1, 1, S, S)) displacement along the normal, model units.
        valid: optional (S, S) bool mask.
        units: unit name stored in the sidecar.
        include_zero: extend the encoded range to contain 0.

    Returns:
        The sidecar dict (plus ``"png"`` and ``"json"`` paths as strings).
    """
    path = _prepare_output(path, (".png",))
    values = _as_map(displacement, "displacement", None).astype(np.float64)
    mask = np.isfinite(values)
    if valid is not None:
        mask &= _as_valid(valid, values.shape)
    if not mask.any():
        raise ExportError(f"displacement for {path} has no valid finite texel")
    low, high = float(values[mask].min()), float(values[mask].max())
    if include_zero:
        low, high = min(low, 0.0), max(high, 0.0)
    scale = high - low
    zero_pixel = None
    if scale > 0:
        normalized = (values - low) / scale
        zero_level = (0.0 - low) / scale
        if 0.0 <= zero_level <= 1.0:
            zero_pixel = int(round(zero_level * PNG16_MAX))
        normalized = np.where(mask, normalized, np.clip(zero_level, 0.0, 1.0))
        pixels = np.round(np.clip(normalized, 0.0, 1.0) * PNG16_MAX).astype(np.uint16)
    else:  # constant map: every pixel 0 decodes to offset
        pixels = np.zeros(values.shape, dtype=np.uint16)
        zero_pixel = 0 if low == 0.0 else None
    if not cv2.imwrite(str(path), pixels):
        raise OSError(f"could not write 16-bit PNG {path}")
    info: dict[str, Any] = {
        "scale": scale,
        "offset": low,
        "units": units,
        "encoding": DISPLACEMENT_ENCODING,
        "zero_pixel_value": zero_pixel,
        "bit_depth": 16,
        "meaning": "displacement along the surface normal (detailed = coarse + value * normal), "
        "UV layout of the face model (row 0 = v 1)",
        "invalid_texels": "written at the zero-displacement level",
        "valid_range": [float(values[mask].min()), float(values[mask].max())],
        "blender_displace_modifier": {
            "midlevel": (-low / scale) if scale > 0 else 0.0,
            "strength": scale,
            "note": "Displace modifier, direction Normal, texture coordinates UV, image colour space Non-Color",
        },
    }
    sidecar = displacement_sidecar_path(path)
    sidecar.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return {**info, "png": str(path), "json": str(sidecar)}


def read_displacement_png16(path: str | Path) -> np.ndarray:
    """Decode a PNG written by :func:`write_displacement_png16` (needs its ``<path>.json``) -> (S, S) float64."""
    path = Path(path)
    sidecar = displacement_sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"displacement PNG not found: {path}")
    if not sidecar.is_file():
        raise FileNotFoundError(f"displacement sidecar not found: {sidecar} (expected next to {path.name})")
    info = json.loads(sidecar.read_text(encoding="utf-8"))
    for key in ("scale", "offset", "encoding"):
        if key not in info:
            raise ExportError(f"sidecar {sidecar} lacks '{key}' (expected scale, offset, encoding)")
    if info["encoding"] != DISPLACEMENT_ENCODING:
        raise ExportError(f"sidecar {sidecar} has unknown encoding {info['encoding']!r}; expected {DISPLACEMENT_ENCODING!r}")
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ExportError(f"could not read {path} as PNG")
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ExportError(f"{path} must be a 16-bit grayscale PNG, got dtype {pixels.dtype} shape {pixels.shape}")
    return pixels.astype(np.float64) / PNG16_MAX * float(info["scale"]) + float(info["offset"])


def encode_normal_map(normal_map: Any, valid: Any = None) -> np.ndarray:
    """Normal map (3, S, S) -> (S, S, 3) float RGB in [0, 1]: ``n * 0.5 + 0.5`` of the unit normal.

    Invalid texels (``valid`` False, zero-length or non-finite normals) become flat (0.5, 0.5, 1).
    """
    normals = _as_map(normal_map, "normal_map", 3).astype(np.float64)
    lengths = np.linalg.norm(normals, axis=0)
    mask = np.isfinite(lengths) & (lengths > 1e-8)
    if valid is not None:
        mask &= _as_valid(valid, normals.shape[1:])
    unit = np.where(mask, normals / np.where(mask, lengths, 1.0), np.array([0.0, 0.0, 1.0])[:, None, None])
    return np.moveaxis(unit * 0.5 + 0.5, 0, -1)


def write_normal_map_png(path: str | Path, normal_map: Any, valid: Any = None, *, bit_depth: int = 8) -> Path:
    """Write a normal map (3, S, S) as RGB PNG ``(n * 0.5 + 0.5)``, 8-bit (default) or 16-bit.

    The normals are object-space in the model frame (x right, y up, z towards the camera), not
    tangent-space; invalid texels are flat (0.5, 0.5, 1) = +z. 8-bit: ``round(rgb * 255)``;
    16-bit: ``round(rgb * 65535)``.
    """
    if bit_depth not in (8, 16):
        raise ExportError(f"bit_depth must be 8 or 16, got {bit_depth}")
    path = _prepare_output(path, (".png",))
    rgb = encode_normal_map(normal_map, valid)
    top = 255 if bit_depth == 8 else PNG16_MAX
    pixels = np.round(np.clip(rgb, 0.0, 1.0) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
    _write_rgb_png(path, pixels)
    return path


def read_normal_map_png(path: str | Path) -> np.ndarray:
    """Inverse of :func:`write_normal_map_png`: (3, S, S) unit normals from an 8/16-bit RGB PNG."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise FileNotFoundError(f"could not read normal map PNG {path}")
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype not in (np.uint8, np.uint16):
        raise ExportError(f"{path} must be an 8/16-bit RGB PNG, got dtype {pixels.dtype} shape {pixels.shape}")
    top = 255.0 if pixels.dtype == np.uint8 else float(PNG16_MAX)
    normals = pixels[..., ::-1].astype(np.float64) / top * 2.0 - 1.0
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    return np.moveaxis(normals, -1, 0)


# ----------------------------------------------------------------------------------------------
# visualisations


def _label_bar(text: str, width: int, height: int) -> np.ndarray:
    bar = np.zeros((height, width, 3), dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 40.0
    thickness = max(1, int(round(height / 20)))
    (text_w, text_h), _ = cv2.getTextSize(text, font, scale, thickness)
    if text_w > width - 4:  # shrink long labels to fit the tile
        scale *= (width - 4) / text_w
        (text_w, text_h), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = (max(2, (width - text_w) // 2), (height + text_h) // 2)
    cv2.putText(bar, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return bar


def make_strip(images: Sequence[Any], labels: Sequence[str] | None = None, height: int = 256) -> np.ndarray:
    """A horizontal strip (uint8 RGB) of the images, each resized to ``height`` rows (aspect kept),
    with a label bar above each (e.g. input | aligned | coarse render | detailed render | shape-only)."""
    if len(images) == 0:
        raise ExportError("make_strip needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ExportError(f"got {len(images)} images but {len(labels)} labels")
    if height <= 0:
        raise ExportError(f"height must be positive, got {height}")
    bar_height = max(16, height // 8)
    tiles = []
    for k, image in enumerate(images):
        rgb = to_uint8_image(image, f"images[{k}]")
        width = max(1, int(round(rgb.shape[1] * height / rgb.shape[0])))
        interpolation = cv2.INTER_AREA if rgb.shape[0] > height else cv2.INTER_LINEAR
        tile = cv2.resize(rgb, (width, height), interpolation=interpolation)
        if labels is not None:
            tile = np.concatenate([_label_bar(str(labels[k]), width, bar_height), tile], axis=0)
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


def write_strip_png(
    path: str | Path, images: Sequence[Any], labels: Sequence[str] | None = None, *, height: int = 256
) -> np.ndarray:
    """Write :func:`make_strip` as PNG; returns the strip (H', W', 3) uint8 RGB.

    Images: (H, W, 3) uint8 or float in [0, 1] (also (H, W) gray, (3, H, W), torch tensors).
    """
    path = _prepare_output(path, (".png",))
    strip = make_strip(images, labels, height)
    _write_rgb_png(path, strip)
    return strip


def write_gif(path: str | Path, frames: Sequence[Any], *, fps: float = 10.0, loop: int = 0) -> Path:
    """Write frames ((H, W, 3) uint8 or float [0, 1], all the same size) as an animated GIF (imageio).

    ``loop=0`` loops forever. GIF stores 256 colours per frame, so colours are quantised.
    """
    import imageio.v3 as iio

    path = _prepare_output(path, (".gif",))
    if len(frames) == 0:
        raise ExportError(f"write_gif({path}) needs at least one frame")
    if fps <= 0 or not math.isfinite(fps):
        raise ExportError(f"fps must be positive, got {fps}")
    rgb_frames = [to_uint8_image(frame, f"frames[{k}]") for k, frame in enumerate(frames)]
    shapes = {frame.shape for frame in rgb_frames}
    if len(shapes) != 1:
        raise ExportError(f"all GIF frames must have the same shape, got {sorted(shapes)}")
    iio.imwrite(path, np.stack(rgb_frames), extension=".gif", duration=1000.0 / fps, loop=loop)
    return path
