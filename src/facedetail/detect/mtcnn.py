"""Face detection with facenet-pytorch's MTCNN (weights ship inside the wheel; nothing is downloaded).

Images larger than ``max_detection_side`` are shrunk for detection only; boxes and landmarks are mapped
back to full-resolution pixel coordinates (x right, y down). Every face that passes the probability and
size thresholds is returned, sorted LEFT TO RIGHT by the box centre's x (ties: top to bottom), so the
k-th face of a group photo is stable across runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from facedetail.utils import resolve_device


@dataclass(frozen=True)
class FaceDetection:
    """One detected face in full-resolution image coordinates.

    Attributes:
        bbox: (4,) float64 ``[x0, y0, x1, y1]`` pixels.
        score: detector probability in [0, 1].
        landmarks5: (5, 2) float64 ``(x, y)`` pixels: left eye, right eye, nose, mouth left, mouth right
            ("left" = smaller x in the image).
    """

    bbox: np.ndarray
    score: float
    landmarks5: np.ndarray

    @property
    def size(self) -> float:
        """Face size in pixels: the shorter side of the box."""
        return float(min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))


@dataclass(frozen=True)
class DetectionResult:
    """Accepted faces (left to right) and the detections that failed a threshold, with the reason."""

    faces: list[FaceDetection]
    rejected: list[tuple[FaceDetection, str]] = field(default_factory=list)
    detection_scale: float = 1.0


def describe_rejections(result: DetectionResult) -> str:
    """One sentence about the detections that failed a threshold ("" when none did)."""
    if not result.rejected:
        return ""
    return "; rejected: " + "; ".join(reason for _, reason in result.rejected[:5])


def no_face_status(result: DetectionResult, width: int, height: int, min_face_size: float) -> tuple[str, str]:
    """``(status, reason)`` for an image of ``width`` x ``height`` in which no face passed the thresholds."""
    if min(width, height) < min_face_size:
        return "too_small", f"image {width}x{height} is smaller than min_face_size {min_face_size:.0f} px"
    if any("min_face_size" in reason for _, reason in result.rejected):
        return "too_small", "every detected face is smaller than min_face_size" + describe_rejections(result)
    return "no_face", "no face detected above the thresholds" + describe_rejections(result)


class MtcnnFaceDetector:
    """Multi-face MTCNN detector with thresholds and detection-time downscaling.

    Args:
        device: "auto", "cpu", "cuda", ... (see :func:`facedetail.utils.resolve_device`).
        min_face_size: faces whose shorter box side (full-resolution pixels) is smaller are rejected.
        min_probability: faces with a lower detector probability are rejected.
        max_detection_side: images whose longer side exceeds this are downscaled for detection.
        stage_thresholds: MTCNN's P-, R-, O-net thresholds.
        pyramid_factor: MTCNN's image pyramid scale factor.
    """

    def __init__(
        self,
        device: str | torch.device = "auto",
        *,
        min_face_size: float = 40.0,
        min_probability: float = 0.95,
        max_detection_side: int = 1600,
        stage_thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        pyramid_factor: float = 0.709,
    ) -> None:
        from facenet_pytorch import MTCNN  # imported lazily: loading the three nets takes a moment

        if max_detection_side < 64:
            raise ValueError(f"max_detection_side must be >= 64 pixels, got {max_detection_side}")
        self.device = resolve_device(device)
        self.min_face_size = float(min_face_size)
        self.min_probability = float(min_probability)
        self.max_detection_side = int(max_detection_side)
        self._mtcnn = MTCNN(
            keep_all=True,
            device=self.device,
            thresholds=list(stage_thresholds),
            factor=pyramid_factor,
            min_face_size=20,
            post_process=False,
        )

    def _detection_scale(self, height: int, width: int) -> float:
        """Factor (<= 1) applied to the image before detection."""
        return min(1.0, self.max_detection_side / float(max(height, width)))

    def _smallest_window(self, scale: float) -> int:
        """MTCNN's own minimum face size (detection pixels) for faces of ``min_face_size`` originals."""
        return int(max(12, np.floor(0.8 * self.min_face_size * scale)))

    def _run_mtcnn(self, batch: np.ndarray, scale: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Run MTCNN on a (N, H, W, 3) uint8 batch; returns per image (boxes (K,4), probs (K,), points (K,5,2))."""
        window = self._smallest_window(scale)
        if min(batch.shape[1:3]) < window:  # smaller than the smallest face MTCNN looks for
            return [(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2))) for _ in range(len(batch))]
        self._mtcnn.min_face_size = window  # the image pyramid starts at this window size
        boxes, probs, points = self._mtcnn.detect(batch, landmarks=True)
        results = []
        for image_boxes, image_probs, image_points in zip(boxes, probs, points):
            if image_boxes is None or len(image_boxes) == 0:
                results.append((np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2))))
                continue
            # numpy 2: facenet-pytorch hands back object arrays; make them plain floats.
            results.append(
                (
                    np.asarray(image_boxes, dtype=float).reshape(-1, 4),
                    np.asarray(image_probs, dtype=float).reshape(-1),
                    np.asarray(image_points, dtype=float).reshape(-1, 5, 2),
                )
            )
        return results

    def _to_result(
        self, boxes: np.ndarray, probs: np.ndarray, points: np.ndarray, scale_xy: tuple[float, float]
    ) -> DetectionResult:
        """Map detections back to full resolution, apply the thresholds and sort left to right."""
        factors = np.array(scale_xy, dtype=float)
        accepted: list[FaceDetection] = []
        rejected: list[tuple[FaceDetection, str]] = []
        for box, prob, landmarks in zip(boxes, probs, points):
            face = FaceDetection(
                bbox=box / np.tile(factors, 2),  # box edges scale with the image
                score=float(prob),
                landmarks5=(landmarks + 0.5) / factors - 0.5,  # pixel centres: (i + 0.5) / s - 0.5
            )
            if face.score < self.min_probability:
                rejected.append((face, f"score {face.score:.3f} < min_probability {self.min_probability}"))
            elif face.size < self.min_face_size:
                rejected.append((face, f"face size {face.size:.0f} px < min_face_size {self.min_face_size:.0f} px"))
            else:
                accepted.append(face)
        accepted.sort(key=lambda f: (0.5 * (f.bbox[0] + f.bbox[2]), 0.5 * (f.bbox[1] + f.bbox[3])))
        return DetectionResult(faces=accepted, rejected=rejected, detection_scale=float(factors.mean()))

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """Validate an image; return its detection-size copy and the (x, y) factors applied."""
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"detector expects uint8 RGB (H, W, 3), got {array.dtype} {array.shape}")
        height, width = array.shape[:2]
        scale = self._detection_scale(height, width)
        if scale >= 1.0:
            return np.ascontiguousarray(array), (1.0, 1.0)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        array = cv2.resize(array, size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(array), (size[0] / width, size[1] / height)

    def detect(self, image: np.ndarray) -> DetectionResult:
        """Detect faces in one uint8 RGB image (H, W, 3) at any resolution."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[DetectionResult]:
        """Detect faces in several images; images whose detection size matches run as one MTCNN batch."""
        prepared = [self._prepare(image) for image in images]
        results: list[DetectionResult | None] = [None] * len(prepared)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (array, _) in enumerate(prepared):
            groups.setdefault(array.shape, []).append(index)
        for indices in groups.values():
            mean_scale = float(np.mean([prepared[i][1] for i in indices]))
            batch = np.stack([prepared[index][0] for index in indices])
            for index, (boxes, probs, points) in zip(indices, self._run_mtcnn(batch, mean_scale)):
                results[index] = self._to_result(boxes, probs, points, prepared[index][1])
        return [result for result in results if result is not None]
