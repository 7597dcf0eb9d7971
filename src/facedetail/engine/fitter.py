"""Photos in, fitted faces out: detect + align (:mod:`facedetail.detect.faces`) → :class:`FaceEstimator` (68 landmarks,
mask, 3DMM coefficients), for ``facedetail fit`` and the :class:`~facedetail.engine.reconstructor.Reconstructor`.

Conventions:

* Face ids are ``<stem>__f<k>`` (:mod:`facedetail.io.face_ids`, the rule ``data_prep`` uses too).
* Pixel coordinates are (x right, y down); ``*_aligned`` are in the 224 crop, ``*_original`` in the input photo
  (mapped back with :func:`facedetail.detect.align.aligned_to_original` and the face's ``trans_params``).
* One bad image among many never raises: it becomes a row of :attr:`FaceFitter.last_report` (``image``,
  ``face_id``, ``status``, ``reason``, ``mask_source``).
"""
from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from facedetail.detect.align import aligned_to_original
from facedetail.detect.faces import detect_and_align, detector_from_params
from facedetail.detect.mtcnn import MtcnnFaceDetector
from facedetail.engine.inputs import ImageInput, default_name, load_input_frames
from facedetail.data.face_stages import FaceEstimator
from facedetail.geometry.face_model import FaceModel, load_face_model_from_params
from facedetail.io.face_ids import image_stems, make_face_id
from facedetail.io.images import DEFAULT_MAX_PIXELS, ImageReadError
from facedetail.utils import resolve_device

logger = logging.getLogger(__name__)

#: ``cache_dir`` value meaning "use ``estimation.cache`` / ``estimation.cache_dir`` of the parameters".
FROM_PARAMS = "from_params"
#: Columns of a ``last_report`` row (fit, reconstruct, inference pipeline).
REPORT_COLUMNS = ["image", "face_id", "status", "reason", "mask_source", "score", "detection_status",
                  "detection_source", "frames"]
_PREVIEW_SIDE = 512


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


def report_row(
    image: str, face_id: str, status: str, reason: str, mask_source: str = "", *, score: float | str = "",
    detection_status: str = "", detection_source: str = "", frames: int | str = "",
) -> dict[str, Any]:
    """One row of a ``last_report`` (columns :data:`REPORT_COLUMNS`).

    ``score``/``detection_status`` (``ok`` or ``low_confidence``)/``detection_source`` describe the face's
    detection (empty for rows without a face); ``frames`` the input's frame/page count (its first was used).
    """
    return {"image": image, "face_id": face_id, "status": status, "reason": reason, "mask_source": mask_source,
            "score": score, "detection_status": detection_status, "detection_source": detection_source, "frames": frames}


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
    detection_status: str = "ok"
    detection_source: str = "mtcnn"
    frames: int = 1
    note: str = ""  # low confidence / fallback source / first frame, for the report row's reason

    def row(self, status: str, reason: str, mask_source: str = "") -> dict[str, Any]:
        """This face's report row."""
        return report_row(self.image, self.face_id, status, (reason + self.note).strip(), mask_source,
                          score=round(self.score, 4), detection_status=self.detection_status,
                          detection_source=self.detection_source, frames=self.frames)


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
        detector = detector_from_params(prep, torch_device)
        estimation = dict(params["estimation"])
        if cache_dir == FROM_PARAMS:
            cache_dir = estimation.get("cache_dir") if estimation.get("cache", True) else None
        estimator = FaceEstimator(face_model, params["face_model"], torch_device, estimation, params.get("weights", {}),
                                  cache_root=cache_dir)
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
            rgb, frames = load_input_frames(image, name, self.max_image_pixels)
        except ImageReadError as error:
            return [], [report_row(name, "", error.status, error.reason)]
        frames_note = f" ({name}: first of {frames} frames used)" if frames > 1 else ""
        try:
            found = detect_and_align(rgb, self.detector, self.crop_size, self.rescale_factor)
            if not found.faces:
                return [], [report_row(name, "", found.status, found.reason + frames_note, frames=frames)]
            return [
                _AlignedRecord(make_face_id(stem, face.index), name, face.index, face.detection.bbox.astype(np.float64),
                               float(face.detection.score), face.aligned.trans_params.astype(np.float64), face.aligned.image, rgb,
                               face.detection_status, face.detection_source, frames,
                               face.describe(self.detector.min_probability) + frames_note)
                for face in found.faces
            ], []
        except Exception as error:  # noqa: BLE001 - one bad image must not stop the others
            logger.exception("detection/alignment failed on %s", name)
            return [], [report_row(name, "", "error", f"{name}: {type(error).__name__}: {error}", frames=frames)]

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
            stems: face-id stems (default :func:`facedetail.io.face_ids.image_stems` of ``names``); pass them to keep ids unique when a long
                list is processed in chunks.
            progress: show a tqdm bar over the images.

        Returns:
            The faces that were estimated, image by image, left to right. :attr:`last_report` then holds one row
            per face (``ok`` or why not) and one per image without a face.
        """
        names = list(names) if names is not None else [default_name(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        stems = list(stems) if stems is not None else image_stems(names)
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
                self.last_report.append(record.row(row["status"] or "error", row["reason"]))
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
                    metadata={"detection_status": record.detection_status, "detection_source": record.detection_source,
                              "frames": record.frames},
                )
            )
            self.last_report.append(record.row("ok", "", faces[-1].mask_source))
        return faces
