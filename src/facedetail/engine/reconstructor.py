"""Detailed reconstruction of photos with a trained detail generator: fitted faces (:mod:`facedetail.engine.fitter`)
→ generator inputs (:func:`facedetail.geometry.face_uv.generator_inputs`, the builder the ``uv_maps`` pipeline
uses) → displacement → renders and model-frame export maps (:class:`facedetail.render.detail.DetailRenderer`).

Conventions:

* UV maps are channel-first ``(C, S, S)`` with ``S`` the checkpoint's ``uv_size`` (the size the generator was
  trained at); the maps used for the mesh exports are rebuilt at ``export_size`` (256 by default; the ICT eye
  slits close below 256) by upsampling the displacement map (bicubic).
* Geometry for export is in the MODEL frame (``face_model.shape``, y up, model units: ICT cm); renders use the
  fitted camera.
* One bad image among many never raises: it becomes a row of :attr:`Reconstructor.last_report`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from facedetail.engine.checkpoint import load_detail_checkpoint
from facedetail.engine.fitter import FROM_PARAMS, FaceFitter, FittedFace, report_row, torch_threads
from facedetail.engine.inputs import ImageInput, default_name
from facedetail.geometry.face_uv import (
    as_generator_tensors,
    expression_uv_maps,
    fitted_screen_vertices,
    generator_inputs,
    quantise_uv_maps,
)
from facedetail.geometry.mesh import vertex_normals
from facedetail.geometry.uv import fill_invalid_texels, unwrap_texture
from facedetail.io.face_ids import image_stems
from facedetail.models.detail_model import DetailGenerator
from facedetail.render.detail import DetailRenderer
from facedetail.training.checkpoint import CheckpointError
from facedetail.utils import resolve_device

logger = logging.getLogger(__name__)

#: Keys of :attr:`FaceReconstruction.renders`.
RENDER_KEYS = ("coarse", "detailed", "shape_coarse", "shape_detailed")
#: UV side of the exported maps/meshes (ICT's eye slits close below 256).
DEFAULT_EXPORT_SIZE = 256


def upsample_displacement(displacement: torch.Tensor, valid: torch.Tensor, export_valid: torch.Tensor) -> torch.Tensor:
    """A displacement map (B, 1, S, S) at the export size of ``export_valid`` (1, 1, E, E): bicubic upsampling of the
    map padded past its UV layout ``valid`` (S, S) (so the chart borders do not pull towards 0), then 0 outside the
    export layout. The same map when E == S."""
    size = export_valid.shape[-1]
    if displacement.shape[-1] != size:
        padded = fill_invalid_texels(displacement, valid, iterations=2)
        displacement = F.interpolate(padded, size=(size, size), mode="bicubic", align_corners=False)
    return displacement * export_valid


@dataclass(kw_only=True)
class FaceReconstruction(FittedFace):
    """A :class:`FittedFace` plus its detail reconstruction.

    Attributes (besides :class:`FittedFace`'s), ``S`` = the checkpoint's uv_size, ``E`` = export size (256):
        expression_map: (3, S, S) float32 ``B·β`` baked into UV, model units (float16-rounded, as trained on).
        uv_texture: (3, S, S) float32 in [0, 1] (the unwrapped photo the generator saw: uint8 / 255, as trained on).
        texture_valid: (S, S) bool (texels the camera saw).
        uv_valid: (S, S) bool (texels inside the UV layout).
        embedding: (E_ch, S, S) float32 attribute embedding.
        displacement: (S, S) float32 along the normals, model units (0 outside the UV layout).
        renders: uint8 (224, 224, 3) ``coarse``, ``detailed``, ``shape_coarse``, ``shape_detailed`` (black outside
            the face region).
        coarse_vertices, coarse_normals: (V, 3) coarse mesh, MODEL frame (y up), model units / unit normals.
        detailed_positions, detailed_normals: (3, E, E) detailed surface and normals, MODEL frame.
        export_valid: (E, E) bool UV-layout texels at the export size.
        export_displacement: (E, E) float32 the displacement at the export size (bicubic upsampling of
            ``displacement``, 0 outside ``export_valid``): exactly what ``detailed_positions`` = coarse + d·n used,
            so the exported displacement PNG, normal map and detail OBJ agree texel for texel.
        export_texture: (E, E, 3) uint8 unwrapped texture for the OBJ files (invalid texels padded/black).
    """

    expression_map: np.ndarray = None  # type: ignore[assignment]
    uv_texture: np.ndarray = None  # type: ignore[assignment]
    texture_valid: np.ndarray = None  # type: ignore[assignment]
    uv_valid: np.ndarray = None  # type: ignore[assignment]
    embedding: np.ndarray = None  # type: ignore[assignment]
    displacement: np.ndarray = None  # type: ignore[assignment]
    renders: dict[str, np.ndarray] = field(default_factory=dict)
    coarse_vertices: np.ndarray = None  # type: ignore[assignment]
    coarse_normals: np.ndarray = None  # type: ignore[assignment]
    detailed_positions: np.ndarray = None  # type: ignore[assignment]
    detailed_normals: np.ndarray = None  # type: ignore[assignment]
    export_valid: np.ndarray = None  # type: ignore[assignment]
    export_displacement: np.ndarray = None  # type: ignore[assignment]
    export_texture: np.ndarray = None  # type: ignore[assignment]


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()



class Reconstructor:
    """Detailed reconstruction of photos with a trained detail generator.

    Args:
        generator: the trained :class:`DetailGenerator` (see :func:`load_detail_checkpoint`).
        meta: the checkpoint's meta (``uv_size``, ``face_model_kind``, ``albedo_blur_sigma``, ...).
        fitter: detection/alignment/estimation (:class:`FaceFitter`).
        device: torch device.
        batch_size: faces per generator/render batch.
        export_size: UV side of the exported maps and dense mesh (256).
        backend: rasterizer backend ("auto", "fast", "pytorch3d").
        cpu_threads: torch CPU threads while reconstructing on the CPU (None: torch's setting); see :func:`torch_threads`.
    """

    def __init__(
        self,
        generator: DetailGenerator,
        meta: Mapping[str, Any],
        fitter: FaceFitter,
        device: str | torch.device = "auto",
        *,
        batch_size: int = 4,
        export_size: int = DEFAULT_EXPORT_SIZE,
        backend: str = "auto",
        cpu_threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.cpu_threads = None if cpu_threads in (None, "", 0) or self.device.type != "cpu" else int(cpu_threads)
        self.generator = generator.to(self.device).eval()
        self.meta = dict(meta)
        self.fitter = fitter
        self.face_model = fitter.face_model
        kind = self.meta.get("face_model_kind")
        if kind is not None and kind != self.face_model.kind:
            raise CheckpointError(
                f"checkpoint {self.meta.get('source', '')} was trained with face model '{kind}' but the parameters load "
                f"'{self.face_model.kind}' (set face_model.kind: {kind})"
            )
        self.uv_size = int(self.meta["uv_size"])
        self.export_size = int(export_size)
        self.batch_size = max(1, int(batch_size))
        self.backend = backend
        sigma = float(self.meta.get("albedo_blur_sigma", 2.0))
        self.renderer = DetailRenderer(self.face_model, self.uv_size, 224, backend, sigma)
        self.export_renderer = (
            self.renderer if self.export_size == self.uv_size else DetailRenderer(self.face_model, self.export_size, 224, backend, sigma)
        )
        self._report: list[dict[str, str]] = []

    @classmethod
    def from_params(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, Any],
        params: Mapping[str, Any],
        device: str | torch.device = "auto",
        *,
        cache_dir: str | os.PathLike | None = FROM_PARAMS,
        batch_size: int | None = None,
        export_size: int | None = None,
    ) -> "Reconstructor":
        """Build from a checkpoint (file, Kedro versioned folder or dict) and the merged Kedro parameters.

        ``params`` keys: ``face_model``, ``weights``, ``data_prep``, ``estimation``, ``uv_maps``, optional
        ``inference`` (``batch_size``, ``export_size``, ``backend``, ``cpu_threads``) and ``device``. ``device`` "auto" defers to ``params["device"]``.
        """
        if str(device) == "auto" and params.get("device"):
            device = params["device"]
        torch_device = resolve_device(device)
        generator, meta = load_detail_checkpoint(checkpoint, torch_device)
        inference = dict(params.get("inference", {}) or {})
        fitter = FaceFitter.from_params(params, torch_device, cache_dir=cache_dir)
        backend = str(inference.get("backend", params.get("uv_maps", {}).get("backend", "auto")))
        return cls(
            generator, meta, fitter, torch_device,
            batch_size=int(batch_size or inference.get("batch_size", params.get("uv_maps", {}).get("batch_size", 4))),
            export_size=int(export_size or inference.get("export_size", DEFAULT_EXPORT_SIZE)),
            backend=backend,
            cpu_threads=inference.get("cpu_threads"),
        )

    @property
    def last_report(self) -> list[dict[str, str]]:
        """One row per face (status ``ok`` or why not) and per image without a face, of the last call."""
        return self._report

    def close(self) -> None:
        self.fitter.close()

    def __enter__(self) -> "Reconstructor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ core
    def _expression_maps(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (B, 3, S, S) expression maps at the generator's UV size, float16-rounded as the uv_maps
        pipeline stores them (:func:`facedetail.geometry.face_uv.quantise_uv_maps`)."""
        maps, _ = expression_uv_maps(self.face_model, self.face_model.layout.split(coefficients)["exp"], self.uv_size)
        return as_generator_tensors(quantise_uv_maps({"expression_maps": maps}), self.device)["expression_maps"]

    @torch.no_grad()
    def synthesize(
        self,
        coefficients: torch.Tensor,
        uv_texture: torch.Tensor,
        texture_valid: torch.Tensor,
        embedding: torch.Tensor | None = None,
        *,
        expression_maps: torch.Tensor | None = None,
        with_export: bool = True,
    ) -> dict[str, Any]:
        """Generator → detailed maps → renders (→ model-frame export maps) for a batch (tensors on self.device).

        ``expression_maps`` default: those of ``coefficients`` (:meth:`_expression_maps`).
        """
        exp_maps = self._expression_maps(coefficients) if expression_maps is None else expression_maps
        if embedding is None:
            embedding = self.generator.embed(uv_texture, texture_valid)
        uv_valid = self.renderer.uv_valid
        displacement = self.generator.displacement_from(embedding, exp_maps).float() * uv_valid
        scene = self.renderer.prepare(coefficients, uv_texture, texture_valid)
        _, detailed_normals = self.renderer.detailed_maps(scene, displacement)
        renders = {
            "coarse": _to_uint8_hwc(self.renderer.render(scene, scene.normal_map)),
            "detailed": _to_uint8_hwc(self.renderer.render(scene, detailed_normals)),
            "shape_coarse": _to_uint8_hwc(self.renderer.render_shape(scene, scene.normal_map)),
            "shape_detailed": _to_uint8_hwc(self.renderer.render_shape(scene, detailed_normals)),
        }
        out: dict[str, Any] = {
            "expression_maps": exp_maps.cpu().numpy().astype(np.float32),
            "embedding": embedding.float().cpu().numpy(),
            "displacement": displacement[:, 0].cpu().numpy().astype(np.float32),
            "renders": renders,
            "uv_valid": uv_valid[0, 0].cpu().numpy() > 0.5,
        }
        if with_export:
            out.update(self._export_maps(coefficients, displacement))
        return out

    def _export_maps(self, coefficients: torch.Tensor, displacement: torch.Tensor) -> dict[str, np.ndarray]:
        """Coarse mesh and detailed position/normal maps in the MODEL frame at the export size."""
        parts = self.face_model.layout.split(coefficients)
        shape = self.face_model.shape(parts["id"], parts["exp"])
        normals = vertex_normals(shape, self.face_model.triangles)
        renderer = self.export_renderer
        surface = renderer.surface(shape, normals)  # model frame (the renders use the camera frame)
        displacement = upsample_displacement(displacement, self.renderer.uv_valid[0, 0], renderer.uv_valid)
        detailed, detailed_normals = renderer.detailed_maps(surface, displacement)
        return {
            "export_displacement": displacement[:, 0].cpu().numpy().astype(np.float32),
            "coarse_vertices": shape.cpu().numpy(),
            "coarse_normals": normals.cpu().numpy(),
            "detailed_positions": detailed.cpu().numpy().astype(np.float32),
            "detailed_normals": detailed_normals.cpu().numpy().astype(np.float32),
            "export_valid": renderer.uv_valid[0, 0].cpu().numpy() > 0.5,
        }

    def _coefficients_and_images(self, faces: Sequence[FittedFace]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) float32 coefficients and (B, 3, 224, 224) uint8 crops of fitted faces, on the device."""
        coefficients = torch.from_numpy(np.stack([f.coefficients for f in faces]).astype(np.float32)).to(self.device)
        images = torch.from_numpy(np.stack([f.aligned for f in faces])).to(self.device).permute(0, 3, 1, 2)
        return coefficients, images

    @torch.no_grad()
    def generator_inputs(self, faces: Sequence[FittedFace]) -> dict[str, np.ndarray]:
        """The generator inputs of fitted faces in their stored dtypes (float16 expression maps, uint8 textures,
        bool validity): :func:`facedetail.geometry.face_uv.generator_inputs`, the builder of the uv_maps pipeline."""
        coefficients, images = self._coefficients_and_images(faces)
        return generator_inputs(self.face_model, coefficients, images, self.uv_size, backend=self.backend)

    @torch.no_grad()
    def _uv_inputs(self, faces: Sequence[FittedFace]) -> dict[str, torch.Tensor]:
        """Coefficients and the generator inputs (:meth:`generator_inputs` as float tensors), plus the export texture."""
        coefficients, images = self._coefficients_and_images(faces)
        stored = generator_inputs(self.face_model, coefficients, images, self.uv_size, backend=self.backend)
        inputs = as_generator_tensors(stored, self.device)
        texture, valid = inputs["uv_textures"], inputs["texture_valid"]
        if self.export_size == self.uv_size:
            export_texture, export_visible = texture, valid
        else:
            screen = fitted_screen_vertices(self.face_model, coefficients, images.shape[-1])
            fm = self.face_model
            export_texture, export_visible = unwrap_texture(images.float() / 255.0, screen, fm.triangles, fm.tri_uv_idx, fm.uv,
                                                            self.export_size, backend=self.backend)
        export_texture = fill_invalid_texels(export_texture * (export_visible > 0.5), export_visible > 0.5, iterations=4)
        return {"coefficients": coefficients, "uv_texture": texture, "texture_valid": valid,
                "expression_maps": inputs["expression_maps"], "export_texture": _to_uint8_hwc(export_texture)}

    def _reconstruct_batch(self, faces: Sequence[FittedFace]) -> list[FaceReconstruction]:
        inputs = self._uv_inputs(faces)
        out = self.synthesize(inputs["coefficients"], inputs["uv_texture"], inputs["texture_valid"],
                               expression_maps=inputs["expression_maps"])
        texture = inputs["uv_texture"].cpu().numpy().astype(np.float32)
        valid = inputs["texture_valid"][:, 0].cpu().numpy() > 0.5
        results = []
        for i, face in enumerate(faces):
            base = {name: getattr(face, name) for name in FittedFace.__dataclass_fields__}
            results.append(
                FaceReconstruction(
                    **base,
                    expression_map=out["expression_maps"][i], uv_texture=texture[i], texture_valid=valid[i],
                    uv_valid=out["uv_valid"], embedding=out["embedding"][i], displacement=out["displacement"][i],
                    renders={key: out["renders"][key][i] for key in RENDER_KEYS},
                    coarse_vertices=out["coarse_vertices"][i], coarse_normals=out["coarse_normals"][i],
                    detailed_positions=out["detailed_positions"][i], detailed_normals=out["detailed_normals"][i],
                    export_valid=out["export_valid"], export_displacement=out["export_displacement"][i],
                    export_texture=inputs["export_texture"][i],
                )
            )
        return results

    # ------------------------------------------------------------------------------------------ public
    def iter_reconstructions(
        self, images: Sequence[ImageInput], names: Sequence[str] | None = None, *, chunk_size: int = 8, progress: bool = True
    ) -> Iterator[FaceReconstruction]:
        """Reconstruct inputs chunk by chunk (bounded memory for big folders), yielding each face when ready.

        :attr:`last_report` grows as chunks finish; a failing batch marks its faces ``error`` and goes on.
        """
        names = list(names) if names is not None else [default_name(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        stems = image_stems(names)
        self._report = []
        bar = tqdm(total=len(images), desc="reconstruct", unit="image", disable=not progress or len(images) < 2)
        try:
            for start in range(0, len(images), max(1, chunk_size)):
                part = slice(start, start + max(1, chunk_size))
                try:
                    with torch_threads(self.cpu_threads):
                        faces = self.fitter.fit_images(list(images[part]), names[part], stems=stems[part], progress=False)
                except Exception as error:  # noqa: BLE001 - e.g. the landmark detector failing on a batch
                    logger.exception("estimation failed for %s", names[part])
                    self._report.extend(report_row(name, "", "error", f"estimation failed: {type(error).__name__}: {error}")
                                        for name in names[part])
                    bar.update(len(names[part]))
                    continue
                rows = {row["face_id"]: row for row in self.fitter.last_report}
                self._report.extend(row for row in self.fitter.last_report if row["status"] != "ok")
                for b in range(0, len(faces), self.batch_size):
                    batch = faces[b : b + self.batch_size]
                    try:
                        with torch_threads(self.cpu_threads):
                            done = self._reconstruct_batch(batch)
                    except Exception as error:  # noqa: BLE001 - a failing batch must not lose the others
                        logger.exception("detail reconstruction failed for %s", [f.face_id for f in batch])
                        for face in batch:
                            self._report.append(report_row(face.image, face.face_id, "error", f"{type(error).__name__}: {error}",
                                                            face.mask_source))
                        continue
                    for rec in done:
                        self._report.append(rows.get(rec.face_id, report_row(rec.image, rec.face_id, "ok", "", rec.mask_source)))
                        yield rec
                bar.update(len(names[part]))
        finally:
            bar.close()

    def reconstruct_images(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> list[FaceReconstruction]:
        """Reconstruct every face of every input (paths, encoded bytes or uint8 RGB arrays); see :attr:`last_report`."""
        return list(self.iter_reconstructions(images, names))
