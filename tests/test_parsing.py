"""Face parsing: BiSeNet checkpoint layout/loading/errors, skin GMM, landmark+skin mask on a real photo."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facedetail.parsing import bisenet as bisenet_module
from facedetail.parsing.bisenet import (
    BiSeNet,
    BiSeNetCheckpointError,
    DEFAULT_MASK_LABELS,
    labels_to_mask,
    load_bisenet,
)
from facedetail.parsing.skin_mask import (
    FACE_OVAL,
    HOLES,
    LEFT_BROW,
    LEFT_EYE,
    OUTER_LIPS,
    RIGHT_BROW,
    RIGHT_EYE,
    face_mask,
    is_grayscale,
    landmark_face_mask,
    rgb_to_ycbcr,
    skin_probability,
)
from tests.conftest import FACES

# MTCNN's five points for obama.jpg (left eye, right eye, nose, mouth left, mouth right; rounded).
OBAMA_POINTS5 = np.array([[443.4, 215.3], [551.4, 212.9], [495.6, 280.0], [435.7, 322.3], [556.7, 319.7]])


def _random_bisenet(seed: int = 0) -> BiSeNet:
    """A BiSeNet with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    net = BiSeNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, BiSeNet]:
    """A same-layout state dict saved like 79999_iter.pth (plain dict of tensors), and the net it came from."""
    net = _random_bisenet()
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="module")
def obama_crop_and_dense() -> tuple[np.ndarray, np.ndarray]:
    """The aligned 224 crop of obama.jpg and MediaPipe's 478 points on it."""
    from facedetail.detect.align import align_face
    from facedetail.detect.landmarks import LandmarkDetector

    path = FACES / "portraits" / "obama.jpg"
    if not path.is_file():
        pytest.skip(f"real photo missing: {path} (shared assets not available)")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()
    crop = align_face(image, OBAMA_POINTS5).image
    with LandmarkDetector("mediapipe") as detector:
        result = detector.detect(crop[None])
    assert result.found[0]
    return crop, result.dense[0].astype(np.float64)


# ----------------------------------------------------------------------------------------------- BiSeNet
def test_bisenet_key_layout_matches_published_checkpoint():
    state = BiSeNet().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # Key names and shapes of zllrunning/face-parsing.PyTorch's 79999_iter.pth.
    assert shapes["cp.resnet.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["cp.resnet.layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["cp.resnet.layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["cp.arm16.conv.conv.weight"] == (128, 256, 3, 3)
    assert shapes["cp.arm32.conv_atten.weight"] == (128, 128, 1, 1)
    assert shapes["cp.arm32.bn_atten.running_var"] == (128,)
    assert shapes["cp.conv_avg.conv.weight"] == (128, 512, 1, 1)
    assert shapes["cp.conv_head16.bn.weight"] == (128,)
    assert shapes["ffm.convblk.conv.weight"] == (256, 256, 1, 1)
    assert shapes["ffm.conv1.weight"] == (64, 256, 1, 1)
    assert shapes["ffm.conv2.weight"] == (256, 64, 1, 1)
    assert shapes["conv_out.conv.conv.weight"] == (256, 256, 3, 3)
    assert shapes["conv_out.conv_out.weight"] == (19, 256, 1, 1)
    assert shapes["conv_out16.conv_out.weight"] == (19, 64, 1, 1)
    assert shapes["conv_out32.conv.conv.weight"] == (64, 128, 3, 3)
    assert not any(k.startswith(("sp.", "cp.resnet.fc")) for k in shapes)
    # Tensors besides BN step counters: ResNet-18 100 (stem 5, blocks 8 x 10, 3 shortcuts x 5), ARMs 2 x 10,
    # conv_head32/16 + conv_avg 3 x 5, FFM 5 + 2, heads 3 x 6  ->  160.
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 160
    assert sum(p.numel() for p in BiSeNet().parameters()) == 13_300_416


def test_load_checkpoint_and_parse_real_photo_shapes(checkpoint, obama_crop_and_dense):
    path, net = checkpoint
    parser = load_bisenet(path, device="cpu")
    crop, _ = obama_crop_and_dense
    images = np.stack([crop, crop[::-1].copy()])[:, :200, :150]  # non-square, not 512: output at input size
    labels = parser.parse(images)
    assert labels.shape == (2, 200, 150) and labels.dtype == np.uint8 and labels.max() < 19
    # The loaded weights (not a fresh init) produced them: compare with the source net on the same input.
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, (512, 512), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.interpolate(net(x), (200, 150), mode="bilinear", align_corners=False).argmax(1).numpy()
    assert np.mean(labels == expected) > 0.999
    masks = parser.mask(images, labels=(1, 10))
    np.testing.assert_array_equal(masks, np.isin(labels, [1, 10]))


def test_load_accepts_wrapped_checkpoints_without_bn_counters(tmp_path, checkpoint):
    _, net = checkpoint
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    parser = load_bisenet(path, device="cpu")
    torch.testing.assert_close(parser.net.ffm.conv1.weight, net.ffm.conv1.weight)


def test_wrong_or_missing_checkpoint_gives_clear_errors(tmp_path):
    import torchvision

    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    with pytest.raises(BiSeNetCheckpointError) as error:
        load_bisenet(wrong, device="cpu")
    message = str(error.value)
    assert str(wrong) in message and "missing keys" in message and "unexpected keys" in message
    assert "conv_out.conv.conv.weight" in message and "fc.weight" in message

    truncated = BiSeNet().state_dict()
    del truncated["conv_out.conv_out.weight"]
    truncated["ffm.conv1.weight"] = torch.zeros(32, 256, 1, 1)
    partial = tmp_path / "partial.pth"
    torch.save(truncated, partial)
    expected = r"conv_out\.conv_out\.weight.*ffm\.conv1\.weight: \(32, 256, 1, 1\)"
    with pytest.raises(BiSeNetCheckpointError, match=expected):
        load_bisenet(partial, device="cpu")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BiSeNetCheckpointError, match="cannot be read"):
        load_bisenet(garbage, device="cpu")

    with pytest.raises(FileNotFoundError, match="79999_iter.pth"):
        load_bisenet(tmp_path / "absent" / "79999_iter.pth", device="cpu")


def test_labels_to_mask_default_set():
    labels = np.array([[0, 1, 2, 3, 4, 5], [6, 10, 11, 12, 13, 17]], dtype=np.uint8)
    expected = np.array([[0, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0]], dtype=bool)
    assert DEFAULT_MASK_LABELS == (1, 2, 3, 10, 12, 13)
    np.testing.assert_array_equal(labels_to_mask(labels), expected)
    with pytest.raises(ValueError, match="mask labels"):
        labels_to_mask(labels, (1, 19))


# ------------------------------------------------------------------------------------- skin colour model
def test_ycbcr_and_skin_posterior():
    np.testing.assert_allclose(rgb_to_ycbcr([[255, 255, 255], [0, 0, 0]]), [[235, 128, 128], [16, 128, 128]], atol=1e-3)
    skin_tones = np.array([[224, 172, 140], [198, 134, 66], [141, 85, 36], [255, 219, 172]])
    not_skin = np.array([[30, 60, 200], [40, 160, 60], [128, 128, 128], [20, 20, 20]])
    assert np.all(skin_probability(skin_tones) > 0.5), skin_probability(skin_tones)
    assert np.all(skin_probability(not_skin) < 0.5), skin_probability(not_skin)
    assert skin_probability(np.zeros((4, 5, 3))).shape == (4, 5)


def test_is_grayscale():
    gray = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    assert is_grayscale(gray)
    colour = gray.copy()
    colour[..., 0] = 255 - colour[..., 0]
    assert not is_grayscale(colour)


def test_polygons_match_mediapipe_connections():
    from mediapipe.tasks.python.vision import FaceLandmarksConnections as Connections

    def edges(polygon):
        return {frozenset((a, b)) for a, b in zip(polygon, polygon[1:] + polygon[:1])}

    def official(connections):
        return {frozenset((c.start, c.end)) for c in connections}

    assert official(Connections.FACE_LANDMARKS_FACE_OVAL) == edges(FACE_OVAL)
    assert official(Connections.FACE_LANDMARKS_RIGHT_EYE) == edges(RIGHT_EYE)
    assert official(Connections.FACE_LANDMARKS_LEFT_EYE) == edges(LEFT_EYE)
    outer_lip_vertices = set(OUTER_LIPS)
    lips = {e for e in official(Connections.FACE_LANDMARKS_LIPS) if e <= outer_lip_vertices}
    assert lips == edges(OUTER_LIPS)
    # Brow polygons = MediaPipe's two brow polylines closed at both ends.
    brows = ((RIGHT_BROW, Connections.FACE_LANDMARKS_RIGHT_EYEBROW), (LEFT_BROW, Connections.FACE_LANDMARKS_LEFT_EYEBROW))
    for brow, connections in brows:
        assert official(connections) <= edges(brow) and len(edges(brow) - official(connections)) == 2
    assert set(HOLES) == {"right_eye", "left_eye", "right_brow", "left_brow", "lips"}


# -------------------------------------------------------------------------------------------- face_mask
def test_face_mask_on_real_photo_covers_cheeks_and_excludes_eyes(obama_crop_and_dense):
    crop, dense = obama_crop_and_dense
    mask, source = face_mask(crop, dense)
    assert source == "landmarks+skin_gmm" and mask.shape == (224, 224) and mask.dtype == bool

    def at(point):
        x, y = np.round(point).astype(int)
        return bool(mask[y, x])

    from facedetail.detect.landmarks import mediapipe_to_ibug68

    points68 = mediapipe_to_ibug68(dense)
    eye_centres = [points68[36:42].mean(0), points68[42:48].mean(0)]
    mouth_centre = points68[[62, 66]].mean(0)
    cheeks = [0.5 * (points68[31] + points68[2]), 0.5 * (points68[35] + points68[14])]
    assert not any(at(p) for p in eye_centres)
    assert not at(mouth_centre)
    assert all(at(p) for p in cheeks)
    assert at(points68[30])  # nose tip
    assert 0.25 < mask.mean() < 0.6  # the face fills a good part of the aligned crop, background excluded
    assert not mask[:10].any() and not mask[:, :10].any()  # corners of the crop are background

    geometric = landmark_face_mask(dense, crop.shape[:2])
    assert np.all(geometric[mask])  # the colour model only removes pixels
    gray = np.repeat(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    gray_mask, gray_source = face_mask(gray, dense)
    assert gray_source == "landmarks"
    np.testing.assert_array_equal(gray_mask, geometric)


def test_face_mask_falls_back_when_colours_are_not_skin(obama_crop_and_dense):
    crop, dense = obama_crop_and_dense
    blue = crop.copy()
    blue[..., 0] //= 8  # strong blue/green cast: the skin model rejects the face
    mask, source = face_mask(blue, dense)
    assert source == "landmarks"
    np.testing.assert_array_equal(mask, landmark_face_mask(dense, crop.shape[:2]))


def test_face_mask_with_bisenet_and_errors(checkpoint, obama_crop_and_dense):
    crop, dense = obama_crop_and_dense
    parser = load_bisenet(checkpoint[0], device="cpu")
    mask, source = face_mask(crop, dense, bisenet=parser, mask_labels=(1,))
    assert source == "bisenet"
    np.testing.assert_array_equal(mask, parser.parse(crop[None])[0] == 1)
    with pytest.raises(ValueError, match="dense478"):
        face_mask(crop)
    nan_dense = dense.copy()
    nan_dense[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        face_mask(crop, nan_dense)
    with pytest.raises(ValueError, match=r"\(478, 2\)"):
        face_mask(crop, dense[:68])
    with pytest.raises(ValueError, match="uint8"):
        face_mask(crop.astype(np.float32), dense)
    assert bisenet_module.LABEL_NAMES[1] == "skin" and bisenet_module.LABEL_NAMES[17] == "hair"
