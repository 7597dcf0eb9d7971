"""Masked pixel-wise (photometric) loss between a rendered and a real image (paper section 2.5.1).

Images are channel-first ``(B, C, H, W)``; the mask is ``(B, 1, H, W)`` or ``(B, H, W)`` with values in
[0, 1] (the face/skin mask from the estimation stage times the render's coverage). The loss is normalised
by the mask area of the whole batch: ``sum_{b,p} mask * e(p) / sum_{b,p} mask``, where ``e(p)`` is

* ``"l2_norm"`` (default, Deng et al. 2019): the Euclidean norm of the RGB difference at the pixel,
  ``||render(p) - target(p)||_2`` (not squared);
* ``"mse"``: the squared difference averaged over the channels;
* ``"l1"``: the absolute difference averaged over the channels.

An empty mask (area 0) gives exactly 0, still connected to ``render`` in the graph (zero gradient, no NaN).
"""
from __future__ import annotations

import torch

PHOTOMETRIC_KINDS = ("l2_norm", "mse", "l1")
_AREA_EPS = 1e-8


def _mask_as_b1hw(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = image.shape
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.shape != (batch, 1, height, width):
        raise ValueError(f"mask must be (B={batch}, 1, H={height}, W={width}) or (B, H, W), got {tuple(mask.shape)}")
    return mask.to(image.dtype)


def masked_photometric_loss(
    render: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l2_norm"
) -> torch.Tensor:
    """Scalar masked pixel loss between ``render`` and ``target`` ``(B, C, H, W)`` (see module docstring)."""
    if kind not in PHOTOMETRIC_KINDS:
        raise ValueError(f"kind must be one of {PHOTOMETRIC_KINDS}, got {kind!r}")
    if render.dim() != 4 or render.shape != target.shape:
        raise ValueError(f"render and target must both be (B, C, H, W) with equal shapes, got {tuple(render.shape)} and {tuple(target.shape)}")
    weights = _mask_as_b1hw(mask, render)
    difference = render - target
    if kind == "l2_norm":
        per_pixel = torch.linalg.vector_norm(difference, dim=1, keepdim=True)
    elif kind == "mse":
        per_pixel = difference.square().mean(dim=1, keepdim=True)
    else:
        per_pixel = difference.abs().mean(dim=1, keepdim=True)
    area = weights.sum()
    return (per_pixel * weights).sum() / area.clamp_min(_AREA_EPS)


def masked_gradient_photometric_loss(render: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shading-gradient (high-pass) photometric loss: the image gradients of ``render`` and ``target`` compared.

    Forward differences along x and y, ``g = I[p + e] - I[p]``; a difference counts where both of its pixels are
    in the mask, with weight ``mask[p] * mask[p + e]``. The loss is ``sum w * ||g_render - g_target||_2 (RGB) /
    sum w`` over both directions and the batch. A smooth (low-frequency) mismatch of albedo or lighting barely
    changes gradients, so this term sees the fine shading (wrinkles) that the plain photometric loss drowns in
    that residual. An empty mask (or one without neighbouring pixels) gives exactly 0, still connected to the graph.
    """
    if render.dim() != 4 or render.shape != target.shape:
        raise ValueError(f"render and target must both be (B, C, H, W) with equal shapes, got {tuple(render.shape)} and {tuple(target.shape)}")
    weights = _mask_as_b1hw(mask, render)
    difference = render - target
    total = difference.new_zeros(())
    area = difference.new_zeros(())
    for dim in (2, 3):
        size = difference.shape[dim]
        grad = difference.narrow(dim, 1, size - 1) - difference.narrow(dim, 0, size - 1)
        pair = weights.narrow(dim, 1, size - 1) * weights.narrow(dim, 0, size - 1)
        total = total + (torch.linalg.vector_norm(grad, dim=1, keepdim=True) * pair).sum()
        area = area + pair.sum()
    return total / area.clamp_min(_AREA_EPS)
