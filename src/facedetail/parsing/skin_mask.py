"""The open face/skin mask: used when no BiSeNet weights are configured.

``face_mask`` picks its source in this order:

1. ``"bisenet"``: a loaded :class:`facedetail.parsing.bisenet.FaceParser` was given: labels in ``mask_labels``.
2. ``"landmarks+skin_gmm"``: MediaPipe's dense 478 points were given and the image has colour: the face-oval
   polygon minus the eye, brow and outer-lip polygons (each hole grown by ``hole_margin`` x the
   outer-eye-corner distance), intersected with the pixels whose skin posterior under the YCbCr skin /
   non-skin Gaussian mixtures of Deng et al. 2019 (Deep3DFaceRecon, published parameters, prior 0.8 on skin)
   is at least ``skin_threshold``.
3. ``"landmarks"``: the geometric mask alone, on greyscale images (R = G = B up to JPEG noise), or when the
   colour model keeps less than ``min_skin_fraction`` of the geometric mask (strong colour casts, paint).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from facedetail.parsing.bisenet import DEFAULT_MASK_LABELS, FaceParser, labels_to_mask

# Ordered closed polygons over MediaPipe's 478 face-mesh points (same vertex sets as MediaPipe's
# FACE_LANDMARKS_* connections; "right" = the subject's right = image left).
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_BROW = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)  # lower edge out->in, then upper edge in->out
LEFT_BROW = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
HOLES = {
    "right_eye": RIGHT_EYE, "left_eye": LEFT_EYE, "right_brow": RIGHT_BROW, "left_brow": LEFT_BROW, "lips": OUTER_LIPS
}
OUTER_EYE_CORNERS = (33, 263)

# Deng et al. 2019 skin / non-skin GMMs over (Y, Cb, Cr) with RGB in [0, 255] (BT.601, Y in 16..235):
# component weights, means, covariance determinants and inverse covariances, as published.
SKIN_WEIGHTS = np.array([0.24063933, 0.16365987, 0.26034665, 0.33535415])
SKIN_MEANS = np.array(
    [[113.71862, 103.39613, 164.08226], [150.19858, 105.18467, 155.51428],
     [183.92976, 107.62468, 152.71820], [114.90524, 113.59782, 151.38217]]
)
SKIN_COV_DETS = np.array([5692842.5, 5851930.5, 2329131.0, 1585971.0])
SKIN_COV_INVS = np.array(
    [
        [
            [0.0019472069, 0.0020450759, -0.00060243998],
            [0.0020450759, 0.017700525, 0.0051420014],
            [-0.00060243998, 0.0051420014, 0.008130895],
        ],
        [
            [0.0027110141, 0.001103699, 0.0023122299],
            [0.001103699, 0.010707724, 0.010742856],
            [0.0023122299, 0.010742856, 0.017481629],
        ],
        [
            [0.0048026871, 0.00022935172, 0.0077668377],
            [0.00022935172, 0.011729696, 0.0081661865],
            [0.0077668377, 0.0081661865, 0.025374353],
        ],
        [
            [0.0011989699, 0.0022453172, -0.0010748957],
            [0.0022453172, 0.047758564, 0.020332102],
            [-0.0010748957, 0.020332102, 0.024502251],
        ],
    ]
)
NONSKIN_WEIGHTS = np.array([0.12791070, 0.31130761, 0.34245777, 0.21832393])
NONSKIN_MEANS = np.array(
    [[99.200851, 112.07533, 140.20602], [110.91392, 125.52969, 130.19237],
     [129.75864, 129.96107, 126.96808], [112.29587, 128.85121, 129.05431]]
)
NONSKIN_COV_DETS = np.array([458703648.0, 6466488.0, 90611376.0, 133097.63])
NONSKIN_COV_INVS = np.array(
    [
        [
            [0.00085371657, 0.00071197288, 0.00023958916],
            [0.00071197288, 0.002593562, 0.00076557708],
            [0.00023958916, 0.00076557708, 0.0015042332],
        ],
        [
            [0.0002465015, 0.00045542428, 0.00015019422],
            [0.00045542428, 0.026412144, 0.018419769],
            [0.00015019422, 0.018419769, 0.037497383],
        ],
        [
            [0.00037054974, 0.0003814676, 0.00040408765],
            [0.0003814676, 0.0085505722, 0.0079136286],
            [0.00040408765, 0.0079136286, 0.010982352],
        ],
        [
            [0.00013709733, 0.00051228428, 0.0001277743],
            [0.00051228428, 0.28237113, 0.1052837],
            [0.0001277743, 0.1052837, 0.23468947],
        ],
    ]
)
SKIN_PRIOR = 0.8
# BT.601 "studio swing" RGB [0, 255] -> YCbCr: Y in 16..235, Cb/Cr in 16..240 around 128.
_YCBCR_MATRIX = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])

MASK_SOURCES = ("bisenet", "landmarks+skin_gmm", "landmarks")


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """BT.601 YCbCr (..., 3) float64 of RGB values in [0, 255] (..., 3)."""
    return np.asarray(rgb, dtype=np.float64) @ _YCBCR_MATRIX.T + _YCBCR_OFFSET


def _gmm_density(
    x: np.ndarray, weights: np.ndarray, means: np.ndarray, dets: np.ndarray, invs: np.ndarray
) -> np.ndarray:
    """Mixture density at points x (N, 3)."""
    density = np.zeros(len(x))
    for weight, mean, det, inv in zip(weights, means, dets, invs):
        diff = x - mean
        mahalanobis = np.einsum("ni,ij,nj->n", diff, inv, diff)
        density += weight * np.exp(-0.5 * mahalanobis) / ((2.0 * np.pi) ** 1.5 * np.sqrt(det))
    return density


def skin_probability(rgb: np.ndarray) -> np.ndarray:
    """Posterior probability of skin (...,) for RGB colours (..., 3) in [0, 255] under the Deng et al. GMMs."""
    array = np.asarray(rgb, dtype=np.float64)
    if array.shape[-1] != 3:
        raise ValueError(f"skin_probability expects RGB colours (..., 3), got shape {array.shape}")
    flat = rgb_to_ycbcr(array.reshape(-1, 3))
    skin = SKIN_PRIOR * _gmm_density(flat, SKIN_WEIGHTS, SKIN_MEANS, SKIN_COV_DETS, SKIN_COV_INVS)
    other = (1.0 - SKIN_PRIOR) * _gmm_density(
        flat, NONSKIN_WEIGHTS, NONSKIN_MEANS, NONSKIN_COV_DETS, NONSKIN_COV_INVS
    )
    total = skin + other
    posterior = np.divide(skin, total, out=np.zeros_like(skin), where=total > 0)
    return posterior.reshape(array.shape[:-1])


def is_grayscale(image: np.ndarray, tolerance: int = 3, max_fraction: float = 0.01) -> bool:
    """True when R = G = B (channels differ by more than ``tolerance`` on at most ``max_fraction`` of pixels)."""
    array = np.asarray(image)
    if array.ndim == 2 or array.shape[-1] == 1:
        return True
    rgb = array[..., :3].astype(np.int16)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float(np.mean(spread > tolerance)) <= max_fraction


def _check_dense(dense478: np.ndarray) -> np.ndarray:
    """Return the dense points as float64 (478, 2) or raise a clear error."""
    points = np.asarray(dense478, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] != 478 or points.shape[1] < 2:
        raise ValueError(f"dense478 must be MediaPipe's (478, 2) pixel points, got shape {points.shape}")
    if not np.all(np.isfinite(points[:, :2])):
        raise ValueError("dense478 contains NaN/inf (face not found?): pass dense478=None or a found face")
    return points[:, :2]


def _fill(mask: np.ndarray, polygon: np.ndarray, value: int) -> None:
    """Rasterise a closed polygon (pixel centres at integers) into ``mask`` in place, 1/16 px precision."""
    shift = 4
    vertices = np.round(polygon * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [vertices], int(value), lineType=cv2.LINE_8, shift=shift)


def landmark_face_mask(dense478: np.ndarray, image_shape: tuple[int, int], hole_margin: float = 0.03) -> np.ndarray:
    """Geometric mask (H, W) bool: face oval minus eyes, brows and lips (holes grown by ``hole_margin`` x IOD).

    Args:
        dense478: (478, 2) MediaPipe points in pixels of the image (x right, y down).
        image_shape: (H, W) of the mask.
        hole_margin: how far the eye/brow/lip holes are grown, as a fraction of the outer-eye-corner distance.
    """
    points = _check_dense(dense478)
    height, width = int(image_shape[0]), int(image_shape[1])
    mask = np.zeros((height, width), dtype=np.uint8)
    _fill(mask, points[list(FACE_OVAL)], 1)
    holes = np.zeros_like(mask)
    for polygon in HOLES.values():
        _fill(holes, points[list(polygon)], 1)
    interocular = float(np.linalg.norm(points[OUTER_EYE_CORNERS[0]] - points[OUTER_EYE_CORNERS[1]]))
    radius = int(round(hole_margin * interocular))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        holes = cv2.dilate(holes, kernel)
    return (mask > 0) & (holes == 0)


def face_mask(
    image: np.ndarray,
    dense478: np.ndarray | None = None,
    bisenet: FaceParser | None = None,
    *,
    mask_labels: Sequence[int] = DEFAULT_MASK_LABELS,
    skin_threshold: float = 0.5,
    hole_margin: float = 0.03,
    min_skin_fraction: float = 0.2,
) -> tuple[np.ndarray, str]:
    """Photometric face mask of one image and where it came from.

    Args:
        image: uint8 RGB (H, W, 3).
        dense478: MediaPipe's (478, 2) points in ``image`` pixels, or None.
        bisenet: a loaded BiSeNet parser (preferred when given), or None.
        mask_labels: BiSeNet label ids that form the mask (default skin, brows, nose, lips).
        skin_threshold: minimum skin posterior for the colour model.
        hole_margin: eye/brow/lip hole growth, fraction of the outer-eye-corner distance.
        min_skin_fraction: below this share of the geometric mask kept by the colour model, the colour model
            is judged unreliable for this image and the geometric mask is returned alone.

    Returns:
        (mask (H, W) bool, source) with source in :data:`MASK_SOURCES`.
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"face_mask expects a uint8 RGB image (H, W, 3), got {array.dtype} {array.shape}")
    if bisenet is not None:
        return labels_to_mask(bisenet.parse(array[None])[0], mask_labels), "bisenet"
    if dense478 is None:
        raise ValueError("face_mask needs either dense478 (MediaPipe points) or a loaded BiSeNet parser")
    geometric = landmark_face_mask(dense478, array.shape[:2], hole_margin=hole_margin)
    if is_grayscale(array) or not geometric.any():
        return geometric, "landmarks"
    skin = np.zeros_like(geometric)
    skin[geometric] = skin_probability(array[geometric]) >= skin_threshold
    if skin.sum() < min_skin_fraction * geometric.sum():
        return geometric, "landmarks"
    return skin, "landmarks+skin_gmm"
