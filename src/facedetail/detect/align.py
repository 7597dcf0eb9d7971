"""Five-point face alignment of Deng et al. 2019 (Deep3DFaceRecon), written from its description.

Convention (identical to Deep3DFaceRecon so that ``trans_params`` can be exchanged with it):

1. The 5 detected points (left eye, right eye, nose tip, left mouth corner, right mouth corner; "left" =
   smaller image x) are moved to a y-up frame: ``y_up = h0 - 1 - y``.
2. A least-squares fit of an affine camera ``p = P @ X + t`` (P: 2x3, t: 2) maps the standard 3D
   landmarks ``X`` (:data:`STANDARD_LANDMARKS_3D`, BFM frame, y up) onto those points; the fitted scale
   is ``s_fit = (|P[0]| + |P[1]|) / 2`` and the translation is ``t = (tx, ty)`` (y-up image pixels).
3. The image is rescaled by ``s = rescale_factor / s_fit`` (102 by default) to ``w = int(w0 * s)``,
   ``h = int(h0 * s)`` and a ``crop_size`` square (224) is cut around the scaled translation.
4. ``trans_params = [w0, h0, s, tx, ty]`` (float32) records everything needed to map back.

Points in the aligned crop are, like the detector's points, image pixels (x right, y down, pixel
centres at integer coordinates). A point ``(x, y)`` of the original image maps to
``(s * x + cx, s * y + cy)`` with

    cx = (w0 / 2 - tx) * s - w / 2 + T / 2
    cy = T / 2 - 1 + h / 2 - (1.5 * h0 - 1 - ty) * s          (T = crop_size)

which is Deep3DFaceRecon's landmark mapping (``resize_n_crop_img``) followed by its ``T - 1 - y`` flip.
The crop is resampled with exactly this mapping (bicubic, area pre-filter when shrinking, black outside
the image), so aligned points and aligned pixels agree to sub-pixel precision (Deep3DFaceRecon's own
crop truncates its corner to an integer and can be off by up to one pixel). :func:`aligned_to_original`
is the exact inverse of :func:`original_to_aligned`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Standard 3D positions (BFM frame, y up, x to the image's right) of the five landmarks used by
# Deep3DFaceRecon, in the order left eye centre, right eye centre, nose tip, left mouth corner, right mouth
# corner. They are the 5-point reduction of BFM's 68 standard landmarks (eye centres = mean of two corners).
STANDARD_LANDMARKS_3D = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.00325350, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.24846620, -0.38128236, 0.22235769],
    ],
    dtype=np.float64,
)
LANDMARK5_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
DEFAULT_CROP_SIZE = 224
DEFAULT_RESCALE_FACTOR = 102.0


@dataclass(frozen=True)
class AlignedFace:
    """One aligned face.

    Attributes:
        image: ``uint8`` (T, T, 3) crop.
        landmarks5: (5, 2) float32, the 5 points in crop pixels (x right, y down).
        trans_params: (5,) float32 ``[w0, h0, s, tx, ty]`` (Deep3DFaceRecon convention).
    """

    image: np.ndarray
    landmarks5: np.ndarray
    trans_params: np.ndarray


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    """Return ``points`` as float64 (N, 2) or raise a clear error."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) (x, y pixels), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values: {array.tolist()}")
    return array


def fit_scale_translation(points_y_up: np.ndarray, template_3d: np.ndarray = STANDARD_LANDMARKS_3D) -> tuple[float, np.ndarray]:
    """Least-squares affine-camera fit of ``template_3d`` (N, 3) to ``points_y_up`` (N, 2).

    Solves ``points ~= template @ P.T + t`` for ``P`` (2x3) and ``t`` (2,) and returns
    ``(s_fit, t)`` with ``s_fit = (|P[0]| + |P[1]|) / 2``.
    """
    image_points = _check_points(points_y_up, "points_y_up")
    template = np.asarray(template_3d, dtype=np.float64)
    if template.shape != (image_points.shape[0], 3):
        raise ValueError(f"template_3d must have shape ({image_points.shape[0]}, 3), got {template.shape}")
    count = image_points.shape[0]
    design = np.zeros((2 * count, 8))
    design[0::2, 0:3] = template
    design[0::2, 3] = 1.0
    design[1::2, 4:7] = template
    design[1::2, 7] = 1.0
    target = image_points.reshape(-1)  # x0, y0, x1, y1, ...
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    scale = 0.5 * (np.linalg.norm(solution[0:3]) + np.linalg.norm(solution[4:7]))
    if not np.isfinite(scale) or scale <= 1e-9:
        raise ValueError(f"degenerate landmarks: fitted scale {scale} from points {image_points.tolist()}")
    return float(scale), np.array([solution[3], solution[7]])


def compute_trans_params(
    landmarks5: np.ndarray,
    image_size: tuple[int, int],
    *,
    rescale_factor: float = DEFAULT_RESCALE_FACTOR,
    template_3d: np.ndarray = STANDARD_LANDMARKS_3D,
) -> np.ndarray:
    """Compute ``[w0, h0, s, tx, ty]`` (float64) from the 5 points (x right, y down) of a ``(w0, h0)`` image."""
    width, height = int(image_size[0]), int(image_size[1])
    points = _check_points(landmarks5, "landmarks5")
    points_y_up = np.stack([points[:, 0], height - 1 - points[:, 1]], axis=1)
    fitted_scale, translation = fit_scale_translation(points_y_up, template_3d)
    return np.array([width, height, rescale_factor / fitted_scale, translation[0], translation[1]], dtype=np.float64)


def _affine_coefficients(trans_params: np.ndarray, crop_size: int) -> tuple[float, float, float]:
    """Return ``(s, cx, cy)`` such that aligned = s * original + (cx, cy)."""
    params = np.asarray(trans_params, dtype=np.float64).reshape(-1)
    if params.shape != (5,):
        raise ValueError(f"trans_params must be [w0, h0, s, tx, ty], got shape {params.shape}")
    width0, height0, scale, tx, ty = params
    if not scale > 0:
        raise ValueError(f"trans_params scale must be positive, got {scale}")
    scaled_width = float(np.int64(width0 * scale))  # Deep3DFaceRecon truncates the resized size
    scaled_height = float(np.int64(height0 * scale))
    half = crop_size / 2.0
    offset_x = (width0 / 2.0 - tx) * scale - scaled_width / 2.0 + half
    offset_y = half - 1.0 + scaled_height / 2.0 - (1.5 * height0 - 1.0 - ty) * scale
    return float(scale), float(offset_x), float(offset_y)


def original_to_aligned(points: np.ndarray, trans_params: np.ndarray, crop_size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """Map (N, 2) original-image pixels (x right, y down) into the aligned crop (same convention)."""
    array = _check_points(points, "points")
    scale, offset_x, offset_y = _affine_coefficients(trans_params, crop_size)
    return array * scale + np.array([offset_x, offset_y])


def aligned_to_original(points: np.ndarray, trans_params: np.ndarray, crop_size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """Map (N, 2) aligned-crop pixels back to the original image; exact inverse of :func:`original_to_aligned`."""
    array = _check_points(points, "points")
    scale, offset_x, offset_y = _affine_coefficients(trans_params, crop_size)
    return (array - np.array([offset_x, offset_y])) / scale


def aligned_template_landmarks(
    crop_size: int = DEFAULT_CROP_SIZE,
    rescale_factor: float = DEFAULT_RESCALE_FACTOR,
    template_3d: np.ndarray = STANDARD_LANDMARKS_3D,
) -> np.ndarray:
    """Where a frontal face's 5 points land in the crop: ``(T/2 + r X, T/2 - 1 - r Y)`` (x right, y down)."""
    template = np.asarray(template_3d, dtype=np.float64)
    half = crop_size / 2.0
    return np.stack([half + rescale_factor * template[:, 0], half - 1.0 - rescale_factor * template[:, 1]], axis=1)


def warp_to_aligned(
    image: np.ndarray,
    trans_params: np.ndarray,
    crop_size: int = DEFAULT_CROP_SIZE,
    interpolation: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """Resample the aligned ``crop_size`` square from the FULL-resolution ``image`` (H, W, C) uint8.

    Equivalent to Deep3DFaceRecon's "resize by s, then crop" but computed directly for the crop's pixels,
    so a huge photo or a large upscale costs no more than the crop itself. When shrinking by 2x or more,
    the needed region is first area-averaged by an integer factor (anti-aliasing, like PIL's resize).
    Pixels outside the photo are black.
    """
    source = np.asarray(image)
    if source.ndim != 3 or source.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, C), got {source.dtype} {source.shape}")
    scale, offset_x, offset_y = _affine_coefficients(trans_params, crop_size)
    height, width = source.shape[:2]
    reduction = int(math.floor(1.0 / scale)) if scale < 0.5 else 1
    origin_x = origin_y = 0
    if reduction > 1:
        # Region of the original that the crop sees, with a margin for the interpolation kernel.
        x_min = (-offset_x) / scale - 3 * reduction
        x_max = (crop_size - 1 - offset_x) / scale + 3 * reduction
        y_min = (-offset_y) / scale - 3 * reduction
        y_max = (crop_size - 1 - offset_y) / scale + 3 * reduction
        origin_x = int(np.clip(math.floor(x_min), 0, width))
        origin_y = int(np.clip(math.floor(y_min), 0, height))
        end_x = int(np.clip(math.ceil(x_max) + 1, 0, width))
        end_y = int(np.clip(math.ceil(y_max) + 1, 0, height))
        region_width = (end_x - origin_x) // reduction * reduction
        region_height = (end_y - origin_y) // reduction * reduction
        if region_width < reduction or region_height < reduction:
            return np.zeros((crop_size, crop_size, source.shape[2]), dtype=np.uint8)
        region = source[origin_y : origin_y + region_height, origin_x : origin_x + region_width]
        source = cv2.resize(
            region, (region_width // reduction, region_height // reduction), interpolation=cv2.INTER_AREA
        )
        if source.ndim == 2:
            source = source[..., None]
    # A reduced pixel r covers original pixels [origin + r k, origin + (r + 1) k): centre origin + r k + (k-1)/2.
    step = scale * reduction
    matrix = np.array(
        [
            [step, 0.0, scale * (origin_x + (reduction - 1) / 2.0) + offset_x],
            [0.0, step, scale * (origin_y + (reduction - 1) / 2.0) + offset_y],
        ]
    )
    warped = cv2.warpAffine(
        source, matrix, (crop_size, crop_size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    if warped.ndim == 2:
        warped = warped[..., None]
    return warped


def align_face(
    image: np.ndarray,
    landmarks5: np.ndarray,
    *,
    crop_size: int = DEFAULT_CROP_SIZE,
    rescale_factor: float = DEFAULT_RESCALE_FACTOR,
    template_3d: np.ndarray = STANDARD_LANDMARKS_3D,
) -> AlignedFace:
    """Align one face of ``image`` (H, W, 3) uint8, full resolution, given its 5 points (x right, y down).

    Returns the ``crop_size`` crop, the 5 points in crop pixels and ``trans_params`` ``[w0, h0, s, tx, ty]``.
    """
    height, width = np.asarray(image).shape[:2]
    # Round to the stored precision first so that the crop is exactly what the saved params describe.
    trans_params = compute_trans_params(
        landmarks5, (width, height), rescale_factor=rescale_factor, template_3d=template_3d
    ).astype(np.float32)
    crop = warp_to_aligned(image, trans_params, crop_size)
    aligned_points = original_to_aligned(landmarks5, trans_params, crop_size)
    return AlignedFace(image=crop, landmarks5=aligned_points.astype(np.float32), trans_params=trans_params)
