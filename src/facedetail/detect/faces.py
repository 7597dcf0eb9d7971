"""THE detect-and-align step (MTCNN → 5 points → Deng et al. 224 crop), shared by ``data_prep`` and the engine.

One photo in, its faces out (left to right, face ``k`` = the ``k``-th), each with its detection (original pixels)
and its aligned crop; or, when no face passed the thresholds, why not (``status``/``reason`` as in
:func:`facedetail.detect.mtcnn.no_face_status`). Callers turn failures into report rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from facedetail.detect.align import AlignedFace, align_face
from facedetail.detect.mtcnn import FaceDetection, MtcnnFaceDetector, describe_rejections, no_face_status


@dataclass(frozen=True)
class DetectedFace:
    """One face of a photo: ``index`` (left to right), its MTCNN ``detection`` (bbox, score, 5 points in original
    pixels) and its ``aligned`` crop (image, 5 points in crop pixels, ``trans_params`` [w0, h0, s, tx, ty])."""

    index: int
    detection: FaceDetection
    aligned: AlignedFace

    @property
    def detection_status(self) -> str:
        """``ok``, or ``low_confidence`` when no candidate passed ``min_probability`` and this best one was kept."""
        return "low_confidence" if self.detection.low_confidence else "ok"

    @property
    def detection_source(self) -> str:
        """Which detector found it (:attr:`facedetail.detect.mtcnn.FaceDetection.source`)."""
        return self.detection.source

    def describe(self, min_probability: float) -> str:
        """A short note for report rows: empty for a confident MTCNN face, else the source and/or low confidence."""
        notes = []
        if self.detection.low_confidence:
            notes.append(f"low_confidence: score {self.detection.score:.3f} < min_probability {min_probability}")
        if self.detection.source != "mtcnn":
            notes.append(f"found by {self.detection.source}")
        return f" ({'; '.join(notes)})" if notes else ""


@dataclass(frozen=True)
class PhotoFaces:
    """What :func:`detect_and_align` found in one photo.

    Attributes:
        faces: the accepted faces, left to right (empty when none).
        status: ``"ok"`` when there is a face, else the no-face status (``no_face``, ``too_small``, ...).
        reason: ``""`` when there is a face, else why not.
        detection_scale: the detector's downscale of the photo (1.0 = full size).
        rejections: one sentence about detections that failed a threshold (``""`` when none did).
    """

    faces: list[DetectedFace]
    status: str
    reason: str
    detection_scale: float
    rejections: str


def detector_from_params(data_prep_params: Mapping[str, Any], device: str | torch.device = "auto") -> MtcnnFaceDetector:
    """The MTCNN detector of the ``data_prep.detection`` parameters (defaults for missing keys)."""
    detection = data_prep_params.get("detection", {}) or {}
    return MtcnnFaceDetector(
        device,
        min_face_size=float(detection.get("min_face_size", 40)),
        min_probability=float(detection.get("min_probability", 0.95)),
        max_detection_side=int(detection.get("max_detection_side", 1600)),
        stage_thresholds=tuple(detection.get("stage_thresholds", (0.6, 0.7, 0.7))),
        low_confidence_floor=float(detection.get("low_confidence_floor", 1.0)),
        retry_window_factors=tuple(detection.get("retry_window_factors", ()) or ()),
        fallback=str(detection.get("fallback", "none")),
        extra_detector=str(detection.get("extra_detector", "none")),
        extra_min_score=float(detection.get("extra_min_score", 0.3)),
        confirmer=str(detection.get("confirmer", "none")),
        yunet_model=detection.get("yunet_model") or None,
        mmod_model=detection.get("mmod_model") or None,
    )


def detect_and_align(
    rgb: np.ndarray, detector: MtcnnFaceDetector, crop_size: int = 224, rescale_factor: float = 102.0
) -> PhotoFaces:
    """Detect every face of a uint8 RGB photo (H, W, 3) and align each the Deng et al. way.

    Raises whatever the detector or the alignment raises (callers report it as an ``error`` row).
    """
    result = detector.detect(rgb)
    if not result.faces:
        status, reason = no_face_status(result, rgb.shape[1], rgb.shape[0], detector.min_face_size)
        return PhotoFaces([], status, reason, float(result.detection_scale), describe_rejections(result))
    faces = [
        DetectedFace(index, face, align_face(rgb, face.landmarks5, crop_size=int(crop_size), rescale_factor=float(rescale_factor)))
        for index, face in enumerate(result.faces)
    ]
    return PhotoFaces(faces, "ok", "", float(result.detection_scale), describe_rejections(result))
