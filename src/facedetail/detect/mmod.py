"""dlib's CNN face detector (MMOD, ``mmod_human_face_detector.dat``) as the second opinion on proposed face boxes.

The model ships inside the ``face-recognition-models`` wheel (with the 68-point predictor the landmark stage
uses) and runs on ``dlib-bin``. On the whole image it is slow on a CPU (4-6 s for a 1000 px photo), so it only
checks the crop around a box another detector proposed and MTCNN did not confirm: the face is scaled to
``face_size`` pixels (MMOD's window is 80 px) and the proposal is confirmed when MMOD finds a face there whose box
overlaps it. Measured (``benchmarks/detection.py``): no MMOD face on any of the 335 boxes YuNet and MediaPipe
propose on skimage's face-free images and their variants, while it confirms the grayscale speaker MTCNN misses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from facedetail.detect.mtcnn import box_iou, crop_around_box
from facedetail.utils import required_packaged_file

MMOD_MODEL = "mmod_human_face_detector.dat"


def default_mmod_path() -> Path:
    """``mmod_human_face_detector.dat`` inside the installed ``face-recognition-models`` wheel (clear error if missing)."""
    return required_packaged_file("face_recognition_models", f"models/{MMOD_MODEL}", "pip install face-recognition-models==0.3.0 (or set data_prep.detection.mmod_model, or confirmer: none)")


class MmodFaceConfirmer:
    """Does dlib's MMOD detector see a face where another detector proposed one?

    Args:
        model_path: ``mmod_human_face_detector.dat`` (default: :func:`default_mmod_path`).
        face_size: the proposal is scaled so that its longer side is this many pixels (MMOD's window: 80).
        min_overlap: IoU between MMOD's box and the proposal above which they are the same face.
    """

    def __init__(self, model_path: str | Path | None = None, face_size: float = 100.0, min_overlap: float = 0.3) -> None:
        import dlib

        path = Path(model_path) if model_path else default_mmod_path()
        if not path.is_file():
            raise FileNotFoundError(f"MMOD model not found: {path}")
        try:
            self._detector = dlib.cnn_face_detection_model_v1(str(path))
        except RuntimeError as error:
            raise ValueError(f"{path} is not a dlib MMOD detector: {str(error).strip().splitlines()[0]}") from None
        self.face_size = float(face_size)
        self.min_overlap = float(min_overlap)

    def confidence(self, image: np.ndarray, box: np.ndarray) -> float:
        """MMOD's confidence for the face overlapping ``box`` (``[x0, y0, x1, y1]`` pixels of the uint8 RGB
        ``image``) in a crop twice the box's size; 0.0 when MMOD finds none there."""
        box = np.asarray(box, float)
        cropped = crop_around_box(image, box, self.face_size)
        if cropped is None or min(cropped[0].shape[:2]) < 2:
            return 0.0
        crop, factors, offset = cropped
        scale, shift = np.tile(np.asarray(factors), 2), np.tile(np.asarray(offset), 2)
        best = 0.0
        for found in self._detector(crop, 0):
            r = found.rect
            found_box = np.array([r.left(), r.top(), r.right(), r.bottom()], float) / scale + shift
            if box_iou(found_box, box) > self.min_overlap:
                best = max(best, float(found.confidence))
        return best

    def confirms(self, image: np.ndarray, box: np.ndarray) -> bool:
        """True when MMOD finds a face overlapping ``box`` (its own decision threshold, confidence > 0)."""
        return self.confidence(image, box) > 0.0
