"""Photos in, detailed faces out: detection → alignment → estimation → UV maps → detail generator → renders,
exports and expression re-targeting (plain module, no Kedro; used by the CLI, the inference pipeline and the
MLflow pyfunc).

Conventions:

* Face ids are ``<stem>__f<k>`` (``k`` counts the faces of one image left to right), as in ``data_prep``.
* Pixel coordinates are (x right, y down); ``*_aligned`` are in the 224 crop, ``*_original`` in the input photo
  (mapped back with :func:`facedetail.detect.align.aligned_to_original` and the face's ``trans_params``).
* UV maps are channel-first ``(C, S, S)`` with ``S`` the checkpoint's ``uv_size`` (the size the generator was
  trained at); the maps used for the mesh exports are rebuilt at ``export_size`` (256 by default; the ICT eye
  slits close below 256) by upsampling the displacement map (bicubic).
* Geometry for export is in the MODEL frame (``face_model.shape``, y up, model units: ICT cm); renders use the
  fitted camera.
* One bad image among many never raises: it becomes a row of :attr:`FaceFitter.last_report` /
  :attr:`Reconstructor.last_report` (``image``, ``face_id``, ``status``, ``reason``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from facedetail.detect.align import align_face, aligned_to_original
from facedetail.detect.mtcnn import MtcnnFaceDetector, no_face_status
from facedetail.estimate import FaceEstimator
from facedetail.geometry.detail import displace_position_map, normals_from_position_map
from facedetail.geometry.face_model import FaceModel, load_face_model_from_params
from facedetail.geometry.face_uv import fitted_screen_vertices
from facedetail.geometry.mesh import vertex_normals
from facedetail.geometry.uv import expression_map, fill_invalid_texels, unwrap_texture
from facedetail.io.export import (
    to_uint8_image,
    units_from_mm_per_unit,
    write_detail_obj,
    write_displacement_png16,
    write_normal_map_png,
    write_obj_with_uv,
    write_strip_png,
)
from facedetail.io.images import DEFAULT_MAX_PIXELS, ImageReadError, read_image, save_png
from facedetail.models.detail_model import DetailGenerator
from facedetail.training.checkpoint import CheckpointError, load_checkpoint
from facedetail.training.detail_render import DetailRenderer
from facedetail.utils import resolve_device, settings_hash

logger = logging.getLogger(__name__)

#: An input photo: a path, encoded bytes, a uint8 RGB array, or a no-argument callable returning bytes (a lazy
#: loader such as a Kedro partition's ``load``).
ImageInput = Union[str, os.PathLike, bytes, bytearray, np.ndarray, Callable[[], bytes]]
#: Keys of :attr:`FaceReconstruction.renders`.
RENDER_KEYS = ("coarse", "detailed", "shape_coarse", "shape_detailed")
#: UV side of the exported maps/meshes (ICT's eye slits close below 256).
DEFAULT_EXPORT_SIZE = 256
#: Name of the checkpoint file inside a Kedro versioned folder (``data/06_models/detail_generator.pt/<version>/``).
CHECKPOINT_FILE = "detail_generator.pt"
#: ``cache_dir`` value meaning "use ``estimation.cache`` / ``estimation.cache_dir`` of the parameters".
FROM_PARAMS = "from_params"
REPORT_COLUMNS = ["image", "face_id", "status", "reason", "mask_source"]
_REQUIRED_CHECKPOINT_KEYS = ("generator", "model_config", "uv_size")
_PREVIEW_SIDE = 512


# ---------------------------------------------------------------------------------------------- checkpoint


def latest_versioned_file(path: str | os.PathLike) -> Path:
    """Resolve a checkpoint location to one file.

    ``path`` may be the file itself, or a Kedro versioned dataset folder (``.../detail_generator.pt/`` holding
    ``<version>/detail_generator.pt``): the latest version (versions are timestamps that sort as text) wins.

    Raises:
        CheckpointError: nothing there, or a folder without any version file.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a .pt file or a Kedro versioned folder)")
    candidates = sorted(p for p in path.glob(f"*/{path.name}") if p.is_file())
    if not candidates:
        candidates = sorted(p for p in path.glob(f"*/{CHECKPOINT_FILE}") if p.is_file())
    if not candidates:
        raise CheckpointError(
            f"checkpoint folder {path} holds no '<version>/{path.name}' file; train a model first "
            "(kedro run --pipelines=train) or pass --checkpoint PATH"
        )
    return candidates[-1]


def load_detail_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[DetailGenerator, dict[str, Any]]:
    """Build the trained :class:`DetailGenerator` (eval mode, on ``device``) and return it with the checkpoint's meta.

    Args:
        path_or_dict: a checkpoint file, a Kedro versioned folder (latest version), or the loaded dict
            ``{"generator", "model_config", "uv_size", "face_model_kind", "step", "albedo_blur_sigma"}``.
        device: torch device (or "auto").

    Returns:
        ``(generator, meta)``; ``meta`` holds every key but ``generator`` plus ``source`` (the file or "<dict>"),
        with defaults ``face_model_kind`` None, ``step`` -1, ``albedo_blur_sigma`` 2.0.

    Raises:
        CheckpointError: missing/unreadable file, missing keys, or weights that do not fit the config.
    """
    torch_device = resolve_device(device)
    if isinstance(path_or_dict, Mapping):
        state, source = dict(path_or_dict), "<dict>"
    else:
        file = latest_versioned_file(path_or_dict)
        state, source = load_checkpoint(file, map_location="cpu"), str(file)
    missing = [key for key in _REQUIRED_CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{source} is not a facedetail detail-generator checkpoint: missing {missing} "
            f"(expected keys {list(_REQUIRED_CHECKPOINT_KEYS)} + face_model_kind, step, albedo_blur_sigma)"
        )
    try:
        generator = DetailGenerator.from_config(dict(state["model_config"]))
        generator.load_state_dict(state["generator"], strict=True)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: the generator weights do not match its model_config: {error}") from error
    uv_size = int(state["uv_size"])
    multiple = 2 ** int(generator.config["num_downs"])
    if uv_size <= 0 or uv_size % multiple:
        raise CheckpointError(f"{source}: uv_size {uv_size} is not a positive multiple of 2**num_downs = {multiple}")
    meta = {key: value for key, value in state.items() if key != "generator"}
    meta.update(uv_size=uv_size, source=source)
    meta.setdefault("face_model_kind", None)
    meta.setdefault("step", -1)
    meta.setdefault("albedo_blur_sigma", 2.0)
    return generator.to(torch_device).eval(), meta


# ---------------------------------------------------------------------------------------------- inputs


def _default_name(image: ImageInput, index: int) -> str:
    """File name of a path input, else ``image_<index>``."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return f"image_{index}"


def face_stems(names: Sequence[str]) -> list[str]:
    """File-name-safe, unique stems for face ids.

    Relative names keep their folders (``dir/a.jpg`` -> ``dir__a``); absolute paths (or ones with ``..``) use the
    file name only (``/data/x/a.jpg`` -> ``a``); clashes get the extension (``a.jpg`` + ``a.png`` -> ``a_jpg``,
    ``a_png``), then a number.
    """
    posix = [PurePosixPath(str(name).replace("\\", "/")) for name in names]
    posix = [PurePosixPath(p.name) if p.is_absolute() or ".." in p.parts else p for p in posix]
    stems = [str(p.with_suffix("")).replace("/", "__") or "image" for p in posix]
    counts = Counter(stems)
    out = [f"{stem}_{p.suffix.lstrip('.').lower()}" if counts[stem] > 1 and p.suffix else stem for stem, p in zip(stems, posix)]
    seen: Counter[str] = Counter()
    unique = []
    for stem in out:  # still duplicated (same name twice): number them
        seen[stem] += 1
        unique.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem] - 1}")
    return unique


def load_input_image(image: ImageInput, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An input (path, encoded bytes, an (H, W[, 3|4]) array or a bytes loader) as ``uint8`` RGB (H, W, 3).

    Raises:
        ImageReadError: unreadable file/bytes, or an array that is not an image (the message names ``name``).
    """
    if callable(image) and not isinstance(image, (np.ndarray, bytes, bytearray, str, os.PathLike)):
        try:
            image = image()
        except Exception as error:  # noqa: BLE001 - permissions, broken links, ...
            raise ImageReadError(f"{name}: cannot read ({type(error).__name__}: {error})", status="unreadable") from error
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) == 0:
            raise ImageReadError(f"{name}: expected an (H, W, 3) RGB array, got shape {image.shape}", status="not_an_image")
        return to_uint8_image(array[..., :3], name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return read_image(bytes(image), max_pixels=max_pixels).rgb
        except ImageReadError as error:
            raise ImageReadError(error.reason.replace("<bytes>", name), error.status) from error
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image), max_pixels=max_pixels).rgb
    raise ImageReadError(f"{name}: unsupported input type {type(image).__name__} (expected a path, bytes or an array)",
                         status="not_an_image")


def _preview(image: np.ndarray, bbox: np.ndarray | None, points: np.ndarray | None) -> np.ndarray:
    """The input photo shrunk to at most 512 px with the face box (green) and 68 landmarks (red) drawn."""
    height, width = image.shape[:2]
    scale = min(1.0, _PREVIEW_SIDE / max(height, width))
    canvas = Image.fromarray(image)
    if scale < 1.0:
        canvas = canvas.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    drawer = ImageDraw.Draw(canvas)
    if bbox is not None:
        drawer.rectangle([float(v) * scale for v in bbox], outline=(0, 255, 0), width=2)
    if points is not None:
        for x, y in np.asarray(points, dtype=float).reshape(-1, 2) * scale:
            drawer.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(255, 0, 0))
    return np.asarray(canvas)


def _report_row(image: str, face_id: str, status: str, reason: str, mask_source: str = "") -> dict[str, str]:
    return {"image": image, "face_id": face_id, "status": status, "reason": reason, "mask_source": mask_source}


# ---------------------------------------------------------------------------------------------- fitting


@dataclass(kw_only=True)
class FittedFace:
    """One detected, aligned and estimated face (the ``facedetail fit`` result).

    Attributes:
        face_id: ``<stem>__f<k>``.
        image: the input's name (file name or the given name).
        face_index: ``k``.
        bbox: (4,) MTCNN box ``[x0, y0, x1, y1]``, original pixels.
        detection_score: MTCNN probability.
        trans_params: (5,) ``[w0, h0, s, tx, ty]`` alignment (Deng et al. convention).
        aligned: (224, 224, 3) uint8 crop.
        landmarks68_aligned: (68, 2) the FITTED mesh's landmarks, crop pixels.
        landmarks68_original: (68, 2) the same in original-image pixels.
        landmarks68_detected: (68, 2) the landmark detector's points, crop pixels.
        coefficients: (K,) in ``face_model.layout``.
        mask_source: which mask was used ("bisenet", "landmarks+skin_gmm", ...).
        mask: (224, 224) bool photometric mask.
        overlay: (224, 224, 3) uint8 fit overlay (shaded mesh, fitted landmarks green, detected red).
        input_preview: the input photo (<= 512 px) with the face box and the fitted landmarks drawn.
        landmark_nme, fit_loss: fit quality numbers from the estimator.
        metadata: extra JSON-able facts (written into the face's JSON).
    """

    face_id: str
    image: str
    face_index: int
    bbox: np.ndarray
    detection_score: float
    trans_params: np.ndarray
    aligned: np.ndarray
    landmarks68_aligned: np.ndarray
    landmarks68_original: np.ndarray
    landmarks68_detected: np.ndarray
    coefficients: np.ndarray
    mask_source: str
    mask: np.ndarray
    overlay: np.ndarray
    input_preview: np.ndarray
    landmark_nme: float = float("nan")
    fit_loss: float = float("nan")
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _AlignedRecord:
    face_id: str
    image: str
    face_index: int
    bbox: np.ndarray
    score: float
    trans_params: np.ndarray
    crop: np.ndarray
    source: np.ndarray  # the full photo (kept only until the preview is drawn)


class FaceFitter:
    """Detection (MTCNN) → Deng alignment → :class:`FaceEstimator` (landmarks, mask, coefficients) for photos.

    Args:
        face_model: the morphable model.
        detector: the MTCNN detector.
        estimator: the estimator (owns the landmark detector; closed by :meth:`close`).
        crop_size, rescale_factor: alignment settings (``data_prep.alignment``).
        max_image_pixels: decompression-bomb guard (``data_prep.max_image_pixels``).
    """

    def __init__(
        self,
        face_model: FaceModel,
        detector: MtcnnFaceDetector,
        estimator: FaceEstimator,
        *,
        crop_size: int = 224,
        rescale_factor: float = 102.0,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if crop_size != 224:
            raise ValueError(f"the estimator and renderer work on 224 px crops; data_prep.alignment.crop_size is {crop_size}")
        self.face_model = face_model
        self.detector = detector
        self.estimator = estimator
        self.crop_size = int(crop_size)
        self.rescale_factor = float(rescale_factor)
        self.max_image_pixels = int(max_image_pixels)
        self.last_report: list[dict[str, str]] = []

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], device: str | torch.device = "auto", *, cache_dir: str | os.PathLike | None = FROM_PARAMS
    ) -> "FaceFitter":
        """Build from the merged Kedro parameters (``face_model``, ``weights``, ``data_prep``, ``estimation``).

        ``cache_dir``: :data:`FROM_PARAMS` uses ``estimation.cache`` / ``estimation.cache_dir``; None disables the
        per-face estimation cache; a path uses that folder.
        """
        for key in ("face_model", "data_prep", "estimation"):
            if key not in params:
                raise KeyError(f"parameters lack '{key}' (expected the merged conf/ parameters: face_model, weights, "
                               f"data_prep, estimation, uv_maps, device)")
        torch_device = resolve_device(device)
        face_model = load_face_model_from_params(params["face_model"], torch_device)
        prep = params["data_prep"]
        detection = prep.get("detection", {})
        detector = MtcnnFaceDetector(
            torch_device,
            min_face_size=float(detection.get("min_face_size", 40)),
            min_probability=float(detection.get("min_probability", 0.95)),
            max_detection_side=int(detection.get("max_detection_side", 1600)),
            stage_thresholds=tuple(detection.get("stage_thresholds", (0.6, 0.7, 0.7))),
        )
        estimation = dict(params["estimation"])
        if cache_dir == FROM_PARAMS:
            cache_dir = estimation.get("cache_dir") if estimation.get("cache", True) else None
        fm = params["face_model"]
        model_path = fm.get("ict_path") if face_model.kind == "ict" else fm.get("bfm_path")
        estimator = FaceEstimator(
            face_model, torch_device, estimation, params.get("weights", {}), cache_root=cache_dir, embedder=None,
            face_model_id=f"{face_model.kind}:{settings_hash(str(model_path))}",
        )
        alignment = prep.get("alignment", {})
        return cls(
            face_model, detector, estimator,
            crop_size=int(alignment.get("crop_size", 224)),
            rescale_factor=float(alignment.get("rescale_factor", 102.0)),
            max_image_pixels=int(prep.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
        )

    def close(self) -> None:
        """Release the landmark detector (MediaPipe)."""
        self.estimator.close()

    def _detect_and_align(self, image: ImageInput, name: str, stem: str) -> tuple[list[_AlignedRecord], list[dict[str, str]]]:
        """Faces of one input (never raises: failures become report rows)."""
        try:
            rgb = load_input_image(image, name, self.max_image_pixels)
        except ImageReadError as error:
            return [], [_report_row(name, "", error.status, error.reason)]
        try:
            result = self.detector.detect(rgb)
            if not result.faces:
                status, reason = no_face_status(result, rgb.shape[1], rgb.shape[0], self.detector.min_face_size)
                return [], [_report_row(name, "", status, reason)]
            records = []
            for index, face in enumerate(result.faces):
                aligned = align_face(rgb, face.landmarks5, crop_size=self.crop_size, rescale_factor=self.rescale_factor)
                records.append(_AlignedRecord(f"{stem}__f{index}", name, index, face.bbox.astype(np.float64),
                                              float(face.score), aligned.trans_params.astype(np.float64), aligned.image, rgb))
            return records, []
        except Exception as error:  # noqa: BLE001 - one bad image must not stop the others
            logger.exception("detection/alignment failed on %s", name)
            return [], [_report_row(name, "", "error", f"{name}: {type(error).__name__}: {error}")]

    def fit_images(
        self,
        images: Sequence[ImageInput],
        names: Sequence[str] | None = None,
        *,
        stems: Sequence[str] | None = None,
        progress: bool = True,
    ) -> list[FittedFace]:
        """Detect, align and estimate every face of every input; failures go to :attr:`last_report`.

        Args:
            images: file paths, encoded bytes, or uint8 RGB arrays.
            names: one name per input (file names / relative paths; face ids use their stems). Default: the
                path's file name, else ``image_<i>``.
            stems: face-id stems (default :func:`face_stems` of ``names``); pass them to keep ids unique when a long
                list is processed in chunks.
            progress: show a tqdm bar over the images.

        Returns:
            The faces that were estimated, image by image, left to right. :attr:`last_report` then holds one row
            per face (``ok`` or why not) and one per image without a face.
        """
        names = list(names) if names is not None else [_default_name(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        stems = list(stems) if stems is not None else face_stems(names)
        if len(stems) != len(images):
            raise ValueError(f"got {len(images)} images but {len(stems)} stems")
        records: list[_AlignedRecord] = []
        self.last_report = []
        for image, name, stem in tqdm(list(zip(images, names, stems)), desc="detect + align", unit="image",
                                      disable=not progress or len(images) < 2):
            found, rows = self._detect_and_align(image, name, stem)
            records.extend(found)
            self.last_report.extend(rows)
        if not records:
            return []
        crops = np.stack([r.crop for r in records])
        shas = [hashlib.sha256(crop.tobytes()).hexdigest() for crop in crops]
        result = self.estimator.estimate(crops, [r.face_id for r in records], shas)
        arrays = result.arrays
        row_of = {str(face_id): k for k, face_id in enumerate(arrays["face_ids"].tolist())}
        status_of = {row["face_id"]: row for row in result.report}
        faces = []
        for record in records:
            if record.face_id not in row_of:
                row = status_of.get(record.face_id, {"status": "error", "reason": "estimation returned nothing"})
                self.last_report.append(_report_row(record.image, record.face_id, row["status"] or "error", row["reason"]))
                continue
            k = row_of[record.face_id]
            fitted_aligned = np.asarray(arrays["fitted_landmarks68"][k], np.float64)
            original = aligned_to_original(fitted_aligned, record.trans_params, self.crop_size)
            faces.append(
                FittedFace(
                    face_id=record.face_id, image=record.image, face_index=record.face_index, bbox=record.bbox,
                    detection_score=record.score, trans_params=record.trans_params, aligned=record.crop,
                    landmarks68_aligned=fitted_aligned, landmarks68_original=original,
                    landmarks68_detected=np.asarray(arrays["landmarks68"][k], np.float64),
                    coefficients=np.asarray(arrays["coefficients"][k], np.float32),
                    mask_source=str(arrays["mask_source"][k]), mask=np.asarray(arrays["masks"][k], bool),
                    overlay=np.asarray(arrays["overlays"][k], np.uint8),
                    input_preview=_preview(record.source, record.bbox, original),
                    landmark_nme=float(arrays["landmark_nme"][k]), fit_loss=float(arrays["fit_loss"][k]),
                )
            )
            self.last_report.append(_report_row(record.image, record.face_id, "ok", "", faces[-1].mask_source))
        return faces


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


# ---------------------------------------------------------------------------------------------- reconstruction


@dataclass(kw_only=True)
class FaceReconstruction(FittedFace):
    """A :class:`FittedFace` plus its detail reconstruction.

    Attributes (besides :class:`FittedFace`'s), ``S`` = the checkpoint's uv_size, ``E`` = export size (256):
        expression_map: (3, S, S) float32 ``B·β`` baked into UV, model units.
        uv_texture: (3, S, S) float32 in [0, 1] (the unwrapped photo the generator saw).
        texture_valid: (S, S) bool (texels the camera saw).
        uv_valid: (S, S) bool (texels inside the UV layout).
        embedding: (E_ch, S, S) float32 attribute embedding.
        displacement: (S, S) float32 along the normals, model units (0 outside the UV layout).
        renders: uint8 (224, 224, 3) ``coarse``, ``detailed``, ``shape_coarse``, ``shape_detailed`` (black outside
            the face region).
        coarse_vertices, coarse_normals: (V, 3) coarse mesh, MODEL frame (y up), model units / unit normals.
        detailed_positions, detailed_normals: (3, E, E) detailed surface and normals, MODEL frame.
        export_valid: (E, E) bool UV-layout texels at the export size.
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
    export_texture: np.ndarray = None  # type: ignore[assignment]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (restored afterwards); None leaves torch's setting.

    Measured on a shared 2-core machine: a cached face took 0.31 s every time with 1 thread and 0.47-4.9 s
    with 2 (OpenMP threads waiting for each other while other processes hold the cores).
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()


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
    def _expression_maps(self, exp: torch.Tensor) -> torch.Tensor:
        """(B, K_exp) -> (B, 3, S, S) expression maps at the generator's UV size."""
        offsets = self.face_model.expression_offsets(exp)
        maps, _ = expression_map(offsets, self.face_model.triangles, self.face_model.tri_uv_idx, self.face_model.uv, self.uv_size)
        return maps

    @torch.no_grad()
    def _synthesize(
        self,
        coefficients: torch.Tensor,
        uv_texture: torch.Tensor,
        texture_valid: torch.Tensor,
        embedding: torch.Tensor | None = None,
        *,
        with_export: bool = True,
    ) -> dict[str, Any]:
        """Generator → detailed maps → renders (→ model-frame export maps) for a batch (tensors on self.device)."""
        exp = self.face_model.layout.split(coefficients)["exp"]
        exp_maps = self._expression_maps(exp)
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
        valid = renderer.uv_valid[0, 0]
        positions = fill_invalid_texels(renderer.bake(shape), valid, iterations=3)
        normal_map = F.normalize(fill_invalid_texels(renderer.bake(normals), valid, iterations=3), dim=1, eps=1e-8)
        if displacement.shape[-1] != self.export_size:
            padded = fill_invalid_texels(displacement, self.renderer.uv_valid[0, 0], iterations=2)
            displacement = F.interpolate(padded, size=(self.export_size, self.export_size), mode="bicubic", align_corners=False)
        displacement = displacement * renderer.uv_valid
        detailed = displace_position_map(positions, normal_map, displacement)
        # as DetailRenderer.detailed_maps: smooth coarse normal + the change the displacement makes to the grid
        # normal (zero displacement gives the coarse normals exactly)
        grid_valid = renderer.uv_valid.bool()
        grid_change = normals_from_position_map(detailed, grid_valid, normal_map) - normals_from_position_map(positions, grid_valid, normal_map)
        detailed_normals = F.normalize(normal_map + grid_change, dim=1, eps=1e-8)
        return {
            "coarse_vertices": shape.cpu().numpy(),
            "coarse_normals": normals.cpu().numpy(),
            "detailed_positions": detailed.cpu().numpy().astype(np.float32),
            "detailed_normals": detailed_normals.cpu().numpy().astype(np.float32),
            "export_valid": valid.cpu().numpy() > 0.5,
        }

    @torch.no_grad()
    def _uv_inputs(self, faces: Sequence[FittedFace]) -> dict[str, torch.Tensor]:
        """Coefficients, UV texture (quantised to 8 bits like the uv_maps pipeline) and validity at the model's UV size,
        plus the export texture."""
        coefficients = torch.from_numpy(np.stack([f.coefficients for f in faces]).astype(np.float32)).to(self.device)
        images = torch.from_numpy(np.stack([f.aligned for f in faces])).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        screen = fitted_screen_vertices(self.face_model, coefficients, images.shape[-1])
        fm = self.face_model
        texture, visible = unwrap_texture(images, screen, fm.triangles, fm.tri_uv_idx, fm.uv, self.uv_size, backend=self.backend)
        texture = torch.round(texture.clamp(0, 1) * 255) / 255  # what training saw (uv_maps stores uint8)
        valid = (visible > 0.5).to(texture.dtype)
        if self.export_size == self.uv_size:
            export_texture, export_visible = texture, valid
        else:
            export_texture, export_visible = unwrap_texture(images, screen, fm.triangles, fm.tri_uv_idx, fm.uv, self.export_size,
                                                            backend=self.backend)
        export_texture = fill_invalid_texels(export_texture * (export_visible > 0.5), export_visible > 0.5, iterations=4)
        return {"coefficients": coefficients, "uv_texture": texture, "texture_valid": valid,
                "export_texture": _to_uint8_hwc(export_texture)}

    def _reconstruct_batch(self, faces: Sequence[FittedFace]) -> list[FaceReconstruction]:
        inputs = self._uv_inputs(faces)
        out = self._synthesize(inputs["coefficients"], inputs["uv_texture"], inputs["texture_valid"])
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
                    export_valid=out["export_valid"], export_texture=inputs["export_texture"][i],
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
        names = list(names) if names is not None else [_default_name(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        stems = face_stems(names)
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
                    self._report.extend(_report_row(name, "", "error", f"estimation failed: {type(error).__name__}: {error}")
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
                            self._report.append(_report_row(face.image, face.face_id, "error", f"{type(error).__name__}: {error}",
                                                            face.mask_source))
                        continue
                    for rec in done:
                        self._report.append(rows.get(rec.face_id, _report_row(rec.image, rec.face_id, "ok", "", rec.mask_source)))
                        yield rec
                bar.update(len(names[part]))
        finally:
            bar.close()

    def reconstruct_images(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> list[FaceReconstruction]:
        """Reconstruct every face of every input (paths, encoded bytes or uint8 RGB arrays); see :attr:`last_report`."""
        return list(self.iter_reconstructions(images, names))

    def _retargeted_coefficients(self, source: FittedFace, expressions: torch.Tensor) -> torch.Tensor:
        """Source coefficients (identity, pose, lighting) with each row of ``expressions`` as the expression block."""
        base = torch.from_numpy(np.asarray(source.coefficients, np.float32)).to(self.device)
        coefficients = base[None].repeat(len(expressions), 1)
        coefficients[:, self.face_model.layout.slices["exp"]] = expressions
        return coefficients

    def _source_tensors(self, source: FaceReconstruction, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        texture = torch.from_numpy(np.asarray(source.uv_texture, np.float32)).to(self.device)[None].repeat(count, 1, 1, 1)
        valid = torch.from_numpy(np.asarray(source.texture_valid, np.float32)).to(self.device)[None, None].repeat(count, 1, 1, 1)
        embedding = torch.from_numpy(np.asarray(source.embedding, np.float32)).to(self.device)[None].repeat(count, 1, 1, 1)
        return texture, valid, embedding

    def retarget(self, source: FaceReconstruction, targets: Sequence[FittedFace]) -> list[dict[str, Any]]:
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
        exp_slice = self.face_model.layout.slices["exp"]
        for start in range(0, len(targets), self.batch_size):
            batch = list(targets[start : start + self.batch_size])
            expressions = torch.from_numpy(np.stack([np.asarray(t.coefficients, np.float32)[exp_slice] for t in batch])).to(self.device)
            coefficients = self._retargeted_coefficients(source, expressions)
            texture, valid, embedding = self._source_tensors(source, len(batch))
            with torch_threads(self.cpu_threads):
                out = self._synthesize(coefficients, texture, valid, embedding)
            screen = fitted_screen_vertices(self.face_model, coefficients, 224)[:, self.face_model.lmk68, :2].cpu().numpy()
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
        self,
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
        exp_slice = self.face_model.layout.slices["exp"]
        first = torch.from_numpy(np.asarray((start or source).coefficients, np.float32)[exp_slice]).to(self.device)
        last = torch.from_numpy(np.asarray(target.coefficients, np.float32)[exp_slice]).to(self.device)
        weights = torch.linspace(0.0, 1.0, n_frames, device=self.device)[:, None]
        expressions = (1 - weights) * first + weights * last
        renders, shapes, displacements = [], [], []
        for b in range(0, n_frames, self.batch_size):
            chunk = expressions[b : b + self.batch_size]
            texture, valid, embedding = self._source_tensors(source, len(chunk))
            with torch_threads(self.cpu_threads):
                out = self._synthesize(self._retargeted_coefficients(source, chunk), texture, valid, embedding, with_export=False)
            renders.extend(out["renders"]["detailed"])
            shapes.extend(out["renders"]["shape_detailed"])
            displacements.extend(out["displacement"])
        scale = displacement_scale if displacement_scale is not None else max(float(np.abs(d).max()) for d in displacements)
        return [
            np.concatenate([render, shape, displacement_to_rgb(d, scale, size=render.shape[0])], axis=1)
            for render, shape, d in zip(renders, shapes, displacements)
        ]


# ---------------------------------------------------------------------------------------------- export


def export_face(rec: FaceReconstruction, out_dir: str | os.PathLike, face_model: FaceModel) -> dict[str, str]:
    """Write every per-face file of ``facedetail reconstruct`` into ``out_dir``.

    Files (``<id>`` = ``rec.face_id``): ``<id>_coarse.obj`` (+ ``.mtl``, ``<id>_texture.png``), ``<id>_detail.obj``
    (+ ``.mtl``; dense UV-grid mesh with UVs, displacement along the normals), ``<id>_displacement.png`` (16-bit)
    + ``<id>_displacement.png.json``, ``<id>_normals.png`` (detailed model-frame normals, n·0.5+0.5),
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
    displacement = write_displacement_png16(out / f"{face_id}_displacement.png", rec.displacement, rec.uv_valid, units=units)
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
    data["units"] = units
    json_path = out / f"{face_id}.json"
    written["json"] = str(json_path)
    data["files"] = {key: Path(path).name for key, path in written.items()}
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return written
