"""File exports of the inference engine: ``facedetail fit`` (JSON + overlay) and ``facedetail reconstruct`` (meshes,
maps, coefficients, strip, JSON) per face. The low-level writers (OBJ, PNG16, strips, GIF) are in
:mod:`facedetail.io.export`.

Meshes are in the MODEL frame (``face_model.shape``, y up) and the model's units (ICT: cm); landmarks in the JSON are
in original-image pixels (x right, y down).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from facedetail.detect.align import aligned_to_original
from facedetail.engine.fitter import REPORT_COLUMNS, FittedFace
from facedetail.engine.reconstructor import FaceReconstruction
from facedetail.geometry.face_model import FaceModel
from facedetail.io.export import (
    units_from_mm_per_unit,
    write_detail_obj,
    write_displacement_png16,
    write_normal_map_png,
    write_obj_with_uv,
    write_strip_png,
)
from facedetail.io.images import save_png


def displacement_to_rgb(displacement: np.ndarray, scale: float | None = None, size: int | None = None) -> np.ndarray:
    """(S, S) signed displacement -> uint8 RGB: blue (inwards) / white (0) / red (outwards).

    ``scale``: the displacement shown at full colour (default: the map's max |d|; pass one value to compare maps).
    """
    values = np.asarray(displacement, np.float64)
    scale = float(scale) if scale is not None else float(np.abs(values).max())
    x = np.clip(values / max(scale, 1e-12), -1.0, 1.0)
    rgb = np.stack([np.where(x > 0, 1.0, 1.0 + x), 1.0 - np.abs(x), np.where(x < 0, 1.0, 1.0 - x)], axis=-1)
    image = np.round(rgb * 255).astype(np.uint8)
    if size is not None and image.shape[0] != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST))
    return image


def face_json(face: FittedFace, face_model: FaceModel) -> dict[str, Any]:
    """The per-face JSON: image, face_id, landmarks68 (original px), coefficients by block, mask_source, ..."""
    blocks = face_model.layout.split(torch.as_tensor(np.asarray(face.coefficients, np.float32))[None])
    return {
        "image": face.image,
        "face_id": face.face_id,
        "landmarks68": np.round(np.asarray(face.landmarks68_original, np.float64), 3).tolist(),
        "landmarks68_frame": "original image pixels, x right, y down (the fitted mesh's 68 landmarks)",
        "landmarks68_detected": np.round(aligned_to_original(np.asarray(face.landmarks68_detected, np.float64),
                                                             face.trans_params), 3).tolist(),
        "coefficients": {name: [float(v) for v in block[0].tolist()] for name, block in blocks.items()},
        "face_model": face_model.kind,
        "mask_source": face.mask_source,
        "trans_params": [float(v) for v in np.asarray(face.trans_params).reshape(-1)],
        "bbox": [float(v) for v in np.asarray(face.bbox).reshape(-1)],
        "detection_score": float(face.detection_score),
        "landmark_nme": None if not np.isfinite(face.landmark_nme) else float(face.landmark_nme),
        **face.metadata,
    }


def export_fit(face: FittedFace, out_dir: str | os.PathLike, face_model: FaceModel) -> dict[str, str]:
    """Write ``<face_id>.json`` and ``<face_id>_overlay.png`` (the ``facedetail fit`` outputs); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overlay = save_png(face.overlay, out / f"{face.face_id}_overlay.png")
    data = face_json(face, face_model)
    data["files"] = {"overlay": overlay.name}
    json_path = out / f"{face.face_id}.json"
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return {"json": str(json_path), "overlay": str(overlay)}


def export_face(rec: FaceReconstruction, out_dir: str | os.PathLike, face_model: FaceModel) -> dict[str, str]:
    """Write every per-face file of ``facedetail reconstruct`` into ``out_dir``.

    Files (``<id>`` = ``rec.face_id``): ``<id>_coarse.obj`` (+ ``.mtl``, ``<id>_texture.png``), ``<id>_detail.obj``
    (+ ``.mtl``; dense UV-grid mesh with UVs, displacement along the normals), ``<id>_displacement.png`` (16-bit, at the
    export size like the normal map and the dense mesh) + ``<id>_displacement.png.json``, ``<id>_normals.png`` (detailed model-frame normals, n·0.5+0.5),
    ``<id>_coefficients.npz``, ``<id>_strip.png`` (input | aligned | coarse | detailed | shape-only) and
    ``<id>.json``. Meshes are in the model frame (y up) and the model's units.

    Returns:
        name -> path of every written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    face_id = rec.face_id
    units = units_from_mm_per_unit(face_model.mm_per_unit)
    texture_name = f"{face_id}_texture.png"
    written: dict[str, str] = {}
    coarse = write_obj_with_uv(
        out / f"{face_id}_coarse.obj", rec.coarse_vertices, face_model.triangles, face_model.uv, face_model.tri_uv_idx,
        normals=rec.coarse_normals, texture_png=rec.export_texture, material_name="face_coarse", units=units,
        texture_filename=texture_name, comments=(f"coarse {face_model.kind} mesh of {face_id}",),
    )
    written.update(coarse_obj=str(coarse["obj"]), coarse_mtl=str(coarse["mtl"]), texture=str(coarse["texture"]))
    detail = write_detail_obj(
        out / f"{face_id}_detail.obj", rec.detailed_positions, rec.export_valid, rec.detailed_normals,
        texture=rec.export_texture, units=units, texture_filename=texture_name,
    )
    written.update(detail_obj=str(detail["obj"]), detail_mtl=str(detail["mtl"]))
    # the export-size map (what the detail OBJ and normal map were built from); the model-size one for older records
    full_size = rec.export_displacement is not None
    displacement = write_displacement_png16(out / f"{face_id}_displacement.png", rec.export_displacement if full_size else rec.displacement,
                                            rec.export_valid if full_size else rec.uv_valid, units=units)
    written.update(displacement_png=displacement["png"], displacement_json=displacement["json"])
    written["normals_png"] = str(write_normal_map_png(out / f"{face_id}_normals.png", rec.detailed_normals, rec.export_valid))
    blocks = face_model.layout.split(torch.as_tensor(np.asarray(rec.coefficients, np.float32))[None])
    npz_path = out / f"{face_id}_coefficients.npz"
    np.savez(
        npz_path, coefficients=np.asarray(rec.coefficients, np.float32), trans_params=np.asarray(rec.trans_params, np.float32),
        landmarks68_original=np.asarray(rec.landmarks68_original, np.float32), bbox=np.asarray(rec.bbox, np.float32),
        face_model_kind=np.asarray(face_model.kind), exp_names=np.asarray(face_model.exp_names, dtype=str),
        **{f"{name}": block[0].numpy() for name, block in blocks.items()},
    )
    written["coefficients_npz"] = str(npz_path)
    strip_path = out / f"{face_id}_strip.png"
    write_strip_png(
        strip_path,
        [rec.input_preview, rec.aligned, rec.renders["coarse"], rec.renders["detailed"], rec.renders["shape_detailed"]],
        ["input", "aligned", "coarse render", "detailed render", "shape only"],
    )
    written["strip_png"] = str(strip_path)
    data = face_json(rec, face_model)
    data["uv_size"] = int(np.asarray(rec.displacement).shape[-1])
    data["export_size"] = int(np.asarray(rec.detailed_positions).shape[-1])
    data["units"] = units
    json_path = out / f"{face_id}.json"
    written["json"] = str(json_path)
    data["files"] = {key: Path(path).name for key, path in written.items()}
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return written


def write_report(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write report rows as CSV: :data:`~facedetail.engine.fitter.REPORT_COLUMNS` first, then any other column."""
    frame = pd.DataFrame(rows)
    columns = REPORT_COLUMNS + [c for c in frame.columns if c not in REPORT_COLUMNS]
    frame.reindex(columns=columns).to_csv(path, index=False)
    return Path(path)
