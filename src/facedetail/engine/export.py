"""File exports of the inference engine: ``facedetail fit`` (JSON + overlay) and ``facedetail reconstruct`` (meshes,
maps, coefficients, strip, JSON) per face. The low-level writers (OBJ, PNG16, strips, GIF) are in
:mod:`facedetail.io.export`.

Meshes are in the MODEL frame (``face_model.shape``, y up); OBJ files in ``inference.export_units`` (default cm,
the ICT model's unit), the GLB in metres; landmarks in the JSON are in original-image pixels (x right, y down).
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
from facedetail.geometry.tangents import object_to_tangent_normal_map, split_uv_vertices, vertex_tangents
from facedetail.io.export import (
    encode_normal_map,
    safe_file_name,
    to_uint8_image,
    unit_scale,
    write_detail_obj,
    write_displacement_png16,
    write_normal_map_png,
    write_obj_with_uv,
    write_strip_png,
)
from facedetail.io.gltf import write_glb
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
    face_id = safe_file_name(face.face_id)
    overlay = save_png(face.overlay, out / f"{face_id}_overlay.png")
    data = face_json(face, face_model)
    data["files"] = {"overlay": overlay.name}
    json_path = out / f"{face_id}.json"
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return {"json": str(json_path), "overlay": str(overlay)}


#: Default unit of the OBJ/displacement exports (``inference.export_units``); the GLB is always in metres.
DEFAULT_EXPORT_UNITS = "cm"


def tangent_space_export(rec: FaceReconstruction, face_model: FaceModel) -> dict[str, np.ndarray]:
    """The coarse mesh split at UV seams with per-vertex tangents, and the detailed normals in its tangent space.

    Returns:
        ``vertices`` (V', 3, model units), ``faces`` (F, 3), ``uv`` (V', 2, OBJ), ``normals`` (V', 3),
        ``tangents`` (V', 4) and ``tangent_normals`` (3, E, E) (OpenGL convention, see
        :mod:`facedetail.geometry.tangents`), ``tangent_valid`` (E, E).
    """
    position_index, uv_index, faces = split_uv_vertices(np.asarray(face_model.triangles), np.asarray(face_model.tri_uv_idx))
    vertices = np.asarray(rec.coarse_vertices, np.float64)[position_index]
    normals = np.asarray(rec.coarse_normals, np.float64)[position_index]
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    uv = np.asarray(face_model.uv, np.float64)[uv_index]
    tangents = vertex_tangents(vertices, faces, uv, normals)
    tangent_normals, covered = object_to_tangent_normal_map(rec.detailed_normals, rec.export_valid, vertices, normals,
                                                            tangents, faces, uv)
    return {"vertices": vertices, "faces": faces, "uv": uv, "normals": normals, "tangents": tangents,
            "tangent_normals": tangent_normals, "tangent_valid": covered}


def export_face(rec: FaceReconstruction, out_dir: str | os.PathLike, face_model: FaceModel, *,
                units: str | None = None) -> dict[str, str]:
    """Write every per-face file of ``facedetail reconstruct`` into ``out_dir``.

    Files (``<id>`` = ``rec.face_id`` made file-name safe by :func:`~facedetail.io.export.safe_file_name`):

    * ``<id>_coarse.glb``: glTF 2.0 binary, **metres, +Y up**, coarse mesh with normals, UVs, tangents,
      base-colour texture and the tangent-space normal map (OpenGL convention, what glTF specifies);
    * ``<id>_coarse.obj`` + ``.mtl`` (``map_Kd`` texture, ``norm``/``map_Bump`` tangent normal map, ``disp``
      displacement) + ``<id>_texture.png``;
    * ``<id>_detail.obj`` (+ ``.mtl``, ``map_Kd``): dense UV-grid mesh with UVs, displacement along the normals;
    * ``<id>_displacement.png`` (16-bit, at the export size like the normal maps and the dense mesh) +
      ``<id>_displacement.png.json`` (scale/offset in ``units``);
    * ``<id>_normal_object.png``: detailed normals in object space (model frame x right, y up, z out of the
      face), ``n * 0.5 + 0.5``;
    * ``<id>_normal_tangent_opengl.png``: the same normals in the coarse mesh's tangent space, OpenGL
      convention (+X = +u, +Y = +v green up, +Z out; DirectX/Unreal: invert green);
    * ``<id>_coefficients.npz``, ``<id>_strip.png`` (input | aligned | coarse | detailed | shape-only), ``<id>.json``.

    Args:
        units: ``mm``, ``cm`` (default, the ICT model's own unit) or ``m`` for the OBJ files and the displacement
            sidecar (stated in the OBJ header and ``<id>.json``). Meshes are in the model frame (y up).

    Returns:
        name -> path of every written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    face_id = safe_file_name(rec.face_id)
    units = units or DEFAULT_EXPORT_UNITS
    scale = unit_scale(face_model.mm_per_unit, units)
    texture_name = f"{face_id}_texture.png"
    written: dict[str, str] = {}
    # the export-size map (what the detail OBJ and normal maps are built from); the model-size one for older records
    full_size = getattr(rec, "export_displacement", None) is not None
    displacement = write_displacement_png16(out / f"{face_id}_displacement.png",
                                            np.asarray(rec.export_displacement if full_size else rec.displacement) * scale,
                                            rec.export_valid if full_size else rec.uv_valid, units=units)
    written.update(displacement_png=displacement["png"], displacement_json=displacement["json"])
    written["normal_object_png"] = str(write_normal_map_png(out / f"{face_id}_normal_object.png", rec.detailed_normals,
                                                            rec.export_valid))
    frame = tangent_space_export(rec, face_model)
    tangent_png = write_normal_map_png(out / f"{face_id}_normal_tangent_opengl.png", frame["tangent_normals"],
                                       frame["tangent_valid"])
    written["normal_tangent_png"] = str(tangent_png)
    coarse = write_obj_with_uv(
        out / f"{face_id}_coarse.obj", np.asarray(rec.coarse_vertices) * scale, face_model.triangles, face_model.uv,
        face_model.tri_uv_idx, normals=rec.coarse_normals, texture_png=rec.export_texture, material_name="face_coarse",
        units=units, texture_filename=texture_name, comments=(f"coarse {face_model.kind} mesh of {face_id}",),
        normal_map_filename=tangent_png.name, displacement_filename=Path(displacement["png"]).name,
        mtl_comments=("norm/map_Bump: tangent-space normal map, OpenGL convention (+Y green up)",
                      f"disp: 16-bit displacement along the normal, {units}; decode with {Path(displacement['json']).name}"),
    )
    written.update(coarse_obj=str(coarse["obj"]), coarse_mtl=str(coarse["mtl"]), texture=str(coarse["texture"]))
    detail = write_detail_obj(
        out / f"{face_id}_detail.obj", np.asarray(rec.detailed_positions) * scale, rec.export_valid, rec.detailed_normals,
        texture=rec.export_texture, units=units, texture_filename=texture_name,
    )
    written.update(detail_obj=str(detail["obj"]), detail_mtl=str(detail["mtl"]))
    to_metres = unit_scale(face_model.mm_per_unit, "m")
    written["glb"] = str(write_glb(
        out / f"{face_id}_coarse.glb", frame["vertices"] * to_metres, frame["faces"], frame["uv"], frame["normals"],
        tangents=frame["tangents"], base_color=to_uint8_image(rec.export_texture), name=face_id,
        normal_texture=to_uint8_image(encode_normal_map(frame["tangent_normals"], frame["tangent_valid"])),
        extras={"face_id": rec.face_id, "face_model": face_model.kind},
    ))
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
    data["glb_units"] = "m"
    data["normal_maps"] = {"normal_object_png": "object space, model frame (x right, y up, z out of the face)",
                           "normal_tangent_png": "tangent space of the coarse mesh, OpenGL convention (+Y green up), "
                                                 "as glTF 2.0 specifies; DirectX/Unreal: invert green"}
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
