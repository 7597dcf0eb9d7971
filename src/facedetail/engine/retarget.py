"""Expression re-targeting with a trained detail generator: the source face with other faces' expressions, its
details regenerated through DRConv (``generator.displacement_from(source embedding, new expression map)``), an
expression sweep, and the ``facedetail retarget`` outputs (strip, GIF, summary).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from facedetail.detect.align import aligned_to_original
from facedetail.engine.export import displacement_to_rgb, export_face, write_report
from facedetail.engine.fitter import FittedFace, torch_threads
from facedetail.engine.reconstructor import RENDER_KEYS, FaceReconstruction, Reconstructor
from facedetail.geometry.face_uv import fitted_screen_vertices
from facedetail.io.export import make_strip, write_gif
from facedetail.io.images import save_png


class NoFaceError(RuntimeError):
    """No face in the source photo or in any expression photo (the message says why)."""


@dataclass
class RetargetOutcome:
    """What :func:`retarget_photos` produced: the source face, one result per expression photo (see
    :func:`retarget`), the sweep's frame count, the report rows of the expression photos, the summary rows."""

    source: FaceReconstruction
    results: list[dict[str, Any]]
    frames: int
    report: list[dict[str, str]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)


def _retargeted_coefficients(reconstructor: Reconstructor, source: FittedFace, expressions: torch.Tensor) -> torch.Tensor:
    """Source coefficients (identity, pose, lighting) with each row of ``expressions`` as the expression block."""
    base = torch.from_numpy(np.asarray(source.coefficients, np.float32)).to(reconstructor.device)
    coefficients = base[None].repeat(len(expressions), 1)
    coefficients[:, reconstructor.face_model.layout.slices["exp"]] = expressions
    return coefficients


def _source_tensors(reconstructor: Reconstructor, source: FaceReconstruction, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    texture = torch.from_numpy(np.asarray(source.uv_texture, np.float32)).to(reconstructor.device)[None].repeat(count, 1, 1, 1)
    valid = torch.from_numpy(np.asarray(source.texture_valid, np.float32)).to(reconstructor.device)[None, None].repeat(count, 1, 1, 1)
    embedding = torch.from_numpy(np.asarray(source.embedding, np.float32)).to(reconstructor.device)[None].repeat(count, 1, 1, 1)
    return texture, valid, embedding


def retarget(reconstructor: Reconstructor, source: FaceReconstruction, targets: Sequence[FittedFace]) -> list[dict[str, Any]]:
    """Give the source face each target's expression; regenerate its details through DRConv.

    Keeps the source's identity, pose, lighting, texture and attribute embedding; takes each target's
    expression coefficients, rebuilds the expression map and calls
    ``generator.displacement_from(source_embedding, new_expression_map)``.

    Returns:
        One dict per target: ``source_face_id``, ``target_face_id``, ``target_image``, ``expression`` (K_exp,),
        ``expression_map`` (3, S, S), ``displacement`` (S, S), ``renders`` (as :class:`FaceReconstruction`),
        ``target_aligned`` (224, 224, 3) and ``reconstruction`` (a :class:`FaceReconstruction` of the
        retargeted face, id ``<source>__as__<target>``, ready for :func:`export_face`).
    """
    results: list[dict[str, Any]] = []
    exp_slice = reconstructor.face_model.layout.slices["exp"]
    for start in range(0, len(targets), reconstructor.batch_size):
        batch = list(targets[start : start + reconstructor.batch_size])
        expressions = torch.from_numpy(np.stack([np.asarray(t.coefficients, np.float32)[exp_slice] for t in batch])).to(reconstructor.device)
        coefficients = _retargeted_coefficients(reconstructor, source, expressions)
        texture, valid, embedding = _source_tensors(reconstructor, source, len(batch))
        with torch_threads(reconstructor.cpu_threads):
            out = reconstructor.synthesize(coefficients, texture, valid, embedding)
        screen = fitted_screen_vertices(reconstructor.face_model, coefficients, 224)[:, reconstructor.face_model.lmk68, :2].cpu().numpy()
        for i, target in enumerate(batch):
            aligned_lmk = screen[i].astype(np.float64)
            original = aligned_to_original(aligned_lmk, source.trans_params)
            fields = {name: getattr(source, name) for name in FaceReconstruction.__dataclass_fields__}
            fields.update(
                face_id=f"{source.face_id}__as__{target.face_id}",
                coefficients=coefficients[i].cpu().numpy(), landmarks68_aligned=aligned_lmk, landmarks68_original=original,
                input_preview=target.input_preview, aligned=target.aligned,
                expression_map=out["expression_maps"][i], displacement=out["displacement"][i],
                renders={key: out["renders"][key][i] for key in RENDER_KEYS},
                coarse_vertices=out["coarse_vertices"][i], coarse_normals=out["coarse_normals"][i],
                detailed_positions=out["detailed_positions"][i], detailed_normals=out["detailed_normals"][i],
                export_displacement=out["export_displacement"][i],
                metadata={**source.metadata, "retarget": {"source_face_id": source.face_id, "source_image": source.image,
                                                          "expression_from": target.face_id, "expression_image": target.image}},
            )
            reconstruction = FaceReconstruction(**fields)
            results.append({
                "source_face_id": source.face_id, "target_face_id": target.face_id, "target_image": target.image,
                "expression": expressions[i].cpu().numpy(), "expression_map": out["expression_maps"][i],
                "displacement": out["displacement"][i], "renders": reconstruction.renders,
                "target_aligned": target.aligned, "reconstruction": reconstruction,
            })
    return results


def expression_sweep(
    reconstructor: Reconstructor,
    source: FaceReconstruction,
    target: FittedFace,
    n_frames: int = 24,
    *,
    start: FittedFace | None = None,
    displacement_scale: float | None = None,
) -> list[np.ndarray]:
    """Frames interpolating the expression coefficients from the source's (or ``start``'s) to the target's, with
    the source's identity, pose, lighting, texture and attribute embedding.

    Each frame is uint8 (224, 672, 3): detailed render | shape-only detailed render | displacement
    (blue in / red out, one colour scale over all frames, or ``displacement_scale``).
    """
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    exp_slice = reconstructor.face_model.layout.slices["exp"]
    first = torch.from_numpy(np.asarray((start or source).coefficients, np.float32)[exp_slice]).to(reconstructor.device)
    last = torch.from_numpy(np.asarray(target.coefficients, np.float32)[exp_slice]).to(reconstructor.device)
    weights = torch.linspace(0.0, 1.0, n_frames, device=reconstructor.device)[:, None]
    expressions = (1 - weights) * first + weights * last
    renders, shapes, displacements = [], [], []
    for b in range(0, n_frames, reconstructor.batch_size):
        chunk = expressions[b : b + reconstructor.batch_size]
        texture, valid, embedding = _source_tensors(reconstructor, source, len(chunk))
        with torch_threads(reconstructor.cpu_threads):
            out = reconstructor.synthesize(_retargeted_coefficients(reconstructor, source, chunk), texture, valid, embedding, with_export=False)
        renders.extend(out["renders"]["detailed"])
        shapes.extend(out["renders"]["shape_detailed"])
        displacements.extend(out["displacement"])
    scale = displacement_scale if displacement_scale is not None else max(float(np.abs(d).max()) for d in displacements)
    return [
        np.concatenate([render, shape, displacement_to_rgb(d, scale, size=render.shape[0])], axis=1)
        for render, shape, d in zip(renders, shapes, displacements)
    ]


def _pad_to_width(rows: list[np.ndarray], width: int) -> list[np.ndarray]:
    return [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]


def retarget_photos(
    reconstructor: Reconstructor,
    source_path: str | os.PathLike,
    expression_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    source_face: int = 0,
    frames: int = 12,
    fps: float = 12.0,
    units: str | None = None,
) -> RetargetOutcome:
    """``facedetail retarget``: the ``source_face``-th face of the source photo with the expression of the first
    (leftmost) face of each expression photo.

    Writes into ``out_dir``: the source's and each retargeted face's :func:`export_face` files,
    ``retarget_strip.png`` (source row, then one row per expression: photo | detailed render | displacement, one
    colour scale), ``expression_sweep.gif`` (``frames`` per expression, source → each expression in turn),
    ``retarget_summary.csv`` and ``retarget_report.csv``; ``units``: the OBJ units of :func:`export_face`.

    Raises:
        NoFaceError: no face in the source photo or in any expression photo.
        ValueError: ``source_face`` beyond the source photo's faces.
    """
    source_path, out = Path(source_path), Path(out_dir)
    expression_files = [Path(p) for p in expression_files]
    sources = reconstructor.reconstruct_images([source_path], [source_path.name])
    if not sources:
        reason = "; ".join(row["reason"] for row in reconstructor.last_report) or "no face"
        raise NoFaceError(f"no face reconstructed in the source image {source_path}: {reason}")
    if source_face >= len(sources):
        raise ValueError(f"--source-face {source_face}: the source image has {len(sources)} face(s)")
    source = sources[source_face]
    with torch_threads(reconstructor.cpu_threads):
        fitted = reconstructor.fitter.fit_images(expression_files, [p.name for p in expression_files])
    report = list(reconstructor.fitter.last_report)
    targets = [face for face in fitted if face.face_index == 0]  # the first (leftmost) face of each photo
    if not targets:
        raise NoFaceError("no face found in any expression image: " + "; ".join(f"{r['image']}: {r['reason']}" for r in report))
    results = retarget(reconstructor, source, targets)
    export_face(source, out, reconstructor.face_model, units=units)
    scale = max(float(np.abs(r["displacement"]).max()) for r in results)
    scale = max(scale, float(np.abs(source.displacement).max()), 1e-9)
    summary, strip_rows = [], []
    strip_rows.append(make_strip([source.aligned, source.renders["detailed"], displacement_to_rgb(source.displacement, scale, 224)],
                                 ["source photo", "source detailed render", "source displacement"], height=224))
    for result in results:
        rec = result["reconstruction"]
        written = export_face(rec, out, reconstructor.face_model, units=units)
        strip_rows.append(make_strip(
            [result["target_aligned"], result["renders"]["detailed"], displacement_to_rgb(result["displacement"], scale, 224)],
            [f"target {result['target_image']}", "detailed, source identity", "displacement"], height=224))
        difference = np.abs(result["displacement"] - source.displacement)[source.uv_valid]
        summary.append({"target_image": result["target_image"], "target_face_id": result["target_face_id"],
                        "face_id": rec.face_id, "mean_abs_displacement": float(np.abs(result["displacement"]).mean()),
                        "mean_abs_difference_from_source": float(difference.mean()),
                        "obj": Path(written["detail_obj"]).name, "displacement_png": Path(written["displacement_png"]).name})
    width = max(row.shape[1] for row in strip_rows)
    save_png(np.concatenate(_pad_to_width(strip_rows, width), axis=0), out / "retarget_strip.png")
    sweep: list[np.ndarray] = []
    chain = [source, *targets]
    for index, (start_face, end_face) in enumerate(zip(chain[:-1], chain[1:])):
        segment = expression_sweep(reconstructor, source, end_face, frames, start=start_face, displacement_scale=scale)
        sweep.extend(segment if index == 0 else segment[1:])  # a segment starts where the previous one ended
    write_gif(out / "expression_sweep.gif", sweep, fps=fps)
    pd.DataFrame(summary).to_csv(out / "retarget_summary.csv", index=False)
    write_report(report, out / "retarget_report.csv")
    return RetargetOutcome(source, results, len(sweep), report, summary)
