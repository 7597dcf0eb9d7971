"""Detail regularisation of the paper's Eq. 2 (section 2.5.4).

``L = (1/N) sum_i ||x_coarse,i - x_refined,i||_2``: the mean Euclidean distance between corresponding points
of the coarse (3DMM) shape and the refined (displaced) shape, in face-model units, averaged over the batch.
(Eq. 2 is printed as ``(1/N) ||x_c - x_r||_2``; we read it, like the issue, as the mean point distance,
i.e. the sum of per-point norms over N, which is the reading that makes "N is number of vertices" a mean.)
The points may be mesh vertices or the texels of a dense UV-grid mesh (see
``facedetail.geometry.detail.displacement_regularization_points``); an optional mask selects points.
"""
from __future__ import annotations

import torch

from facedetail.geometry.detail import masked_blur


def detail_regularization(
    coarse_vertices: torch.Tensor, refined_vertices: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean point distance between ``coarse_vertices`` and ``refined_vertices`` ``(B, N, 3)``.

    Args:
        coarse_vertices: ``(B, N, 3)`` 3DMM points.
        refined_vertices: ``(B, N, 3)`` the same points after adding the details.
        mask: optional ``(N,)`` or ``(B, N)`` weights in [0, 1]; each sample's distances are averaged over
            its mask (an empty mask gives 0 for that sample, no NaN).

    Returns:
        Scalar: ``mean_b sum_i m_bi ||c_bi - r_bi|| / sum_i m_bi`` (``m = 1`` without mask). The gradient at
        zero distance is 0 (subgradient), never NaN.
    """
    if coarse_vertices.dim() != 3 or coarse_vertices.shape[-1] != 3 or coarse_vertices.shape != refined_vertices.shape:
        raise ValueError(
            f"coarse_vertices and refined_vertices must both be (B, N, 3), got {tuple(coarse_vertices.shape)} and {tuple(refined_vertices.shape)}"
        )
    distances = torch.linalg.vector_norm(coarse_vertices - refined_vertices, dim=-1)
    if mask is None:
        return distances.mean()
    batch, n_points = distances.shape
    if mask.dim() == 1 and mask.shape[0] == n_points:
        mask = mask.unsqueeze(0).expand(batch, n_points)
    if mask.shape != (batch, n_points):
        raise ValueError(f"mask must be (N={n_points},) or (B={batch}, N={n_points}), got {tuple(mask.shape)}")
    weights = mask.to(distances.dtype)
    per_sample = (distances * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-8)
    return per_sample.mean()


def displacement_lowpass_regularization(displacement: torch.Tensor, valid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean absolute low-pass of a displacement map: ``sum_valid |blur_sigma(d)| / #valid`` (face-model units).

    Detail is high-frequency (wrinkles and folds oscillate or are narrow); a smooth bulge of the surface is the
    coarse model's job. The masked Gaussian blur (``sigma`` texels, normalised over the valid texels) of a
    zero-mean wrinkle pattern is ~0, so this term costs wrinkles little and smooth blotches their full height.

    Args:
        displacement: ``(B, 1, S, S)``.
        valid: ``(1 or B, 1, S, S)`` texels of the UV layout (0/1).
        sigma: Gaussian sigma in texels (> 0).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 texels, got {sigma}")
    weights = valid.to(displacement.dtype).expand_as(displacement)
    lowpass = masked_blur(displacement, valid, float(sigma))
    return (lowpass.abs() * weights).sum() / weights.sum().clamp_min(1e-8)
