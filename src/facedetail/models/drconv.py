"""Dynamic Region-Aware Convolution (DRConv; Chen et al. 2020, arXiv:2003.12243), written from the paper.

As used by the detail generator (paper section 2.2) the layer has **two inputs**:

* ``guide_features`` ``(B, E, H, W)``: the attribute embedding. It drives both branches:

  - **guide branch**: ``Conv2d(E -> R)`` gives region logits; the region of each pixel is the argmax
    over the ``R`` channels. The masks are exactly one-hot in the forward pass; in the backward pass the
    gradient flows through the softmax of the logits (straight-through estimator, equivalent to
    ``onehot + softmax - softmax.detach()`` but without its floating-point rounding of the one-hot).
  - **filter branch**: adaptive average pooling of the embedding to a ``filter_pool x filter_pool``
    grid, a 1x1 conv + ReLU, flatten, and a linear layer regress, per sample, ``R`` filter banks of
    shape ``(C_out, C_in, k, k)`` and (optionally) ``R`` biases of shape ``(C_out,)``.

* ``x`` ``(B, C_in, H, W)``: the map being convolved (the expression map, 3 channels).

Every sample's ``R`` filter banks are applied to its ``x`` with one grouped convolution (batch folded
into the groups, "same" zero padding), giving ``R`` candidate outputs; each pixel keeps the candidate
of its region: ``y = sum_r mask_r * out_r``. Pure PyTorch, so CPU and CUDA behave the same (the
official implementation's CPU path returns zeros; this one does not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _StraightThroughOneHot(torch.autograd.Function):
    """Forward: one-hot of the argmax over dim 1. Backward: identity (to the probabilities)."""

    @staticmethod
    def forward(ctx, probabilities: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        index = probabilities.argmax(dim=1, keepdim=True)
        return torch.zeros_like(probabilities).scatter_(1, index, 1.0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_output


def straight_through_region_masks(region_logits: torch.Tensor) -> torch.Tensor:
    """One-hot region masks ``(B, R, H, W)`` from logits, with the softmax gradient (straight-through).

    Forward value: ``onehot(argmax_r logits)`` exactly (ties go to the lowest region index).
    Gradient w.r.t. the logits: the softmax Jacobian applied to the incoming gradient, i.e. the gradient
    of ``onehot + softmax - softmax.detach()``.
    """
    if region_logits.dim() != 4:
        raise ValueError(f"region_logits must be (B, R, H, W), got shape {tuple(region_logits.shape)}")
    return _StraightThroughOneHot.apply(region_logits.softmax(dim=1))


def apply_region_filters(
    x: torch.Tensor, region_masks: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Convolve each sample with its ``R`` filter banks and select per pixel by region.

    Args:
        x: ``(B, C_in, H, W)`` input map.
        region_masks: ``(B, R, H, W)`` (one-hot or soft) region weights.
        weights: ``(B, R, C_out, C_in, k, k)`` per-sample filter banks, ``k`` odd ("same" zero padding).
        bias: optional ``(B, R, C_out)`` per-sample, per-region biases.

    Returns:
        ``(B, C_out, H, W)`` = ``sum_r region_masks[:, r] * conv2d(x_b, weights[b, r]) (+ bias[b, r])``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C_in, H, W), got shape {tuple(x.shape)}")
    if weights.dim() != 6:
        raise ValueError(f"weights must be (B, R, C_out, C_in, k, k), got shape {tuple(weights.shape)}")
    batch, in_channels, height, width = x.shape
    w_batch, regions, out_channels, w_in, k_h, k_w = weights.shape
    if w_batch != batch or w_in != in_channels:
        raise ValueError(
            f"weights {tuple(weights.shape)} do not match x {tuple(x.shape)}: expected (B={batch}, R, C_out, C_in={in_channels}, k, k)"
        )
    if k_h != k_w or k_h % 2 == 0:
        raise ValueError(f"filters must be square with an odd size, got {k_h}x{k_w}")
    if region_masks.shape != (batch, regions, height, width):
        raise ValueError(
            f"region_masks must be (B={batch}, R={regions}, H={height}, W={width}), got {tuple(region_masks.shape)}"
        )
    grouped_weight = weights.reshape(batch * regions * out_channels, in_channels, k_h, k_w)
    grouped_bias = None
    if bias is not None:
        if bias.shape != (batch, regions, out_channels):
            raise ValueError(f"bias must be (B={batch}, R={regions}, C_out={out_channels}), got {tuple(bias.shape)}")
        grouped_bias = bias.reshape(-1)
    candidates = F.conv2d(
        x.reshape(1, batch * in_channels, height, width),
        grouped_weight,
        grouped_bias,
        padding=k_h // 2,
        groups=batch,
    ).reshape(batch, regions, out_channels, height, width)
    return torch.einsum("brhw,brchw->bchw", region_masks.to(candidates.dtype), candidates)


class DRConv2d(nn.Module):
    """Dynamic region-aware convolution driven by a separate guide feature map (see module docstring).

    Args:
        in_channels: channels ``C_in`` of the convolved map ``x`` (expression map: 3).
        out_channels: channels ``C_out`` of the result (displacement: 1).
        guide_channels: channels ``E`` of the guide features (attribute embedding).
        num_regions: number of regions ``R``.
        kernel_size: size ``k`` (odd) of the regressed filters.
        guide_kernel_size: kernel (odd) of the guide conv that produces the region logits.
        filter_pool: the filter branch pools the guide features to ``filter_pool x filter_pool``.
        filter_hidden: channels of the filter branch's 1x1 conv.
        dynamic_bias: also regress a bias per region and output channel.
        filter_init_scale: the filter branch's last layer starts with its default init times this
            factor (and zero bias), so initial filters are small and ``tanh`` downstream is not saturated.
        soft_regions: ``False`` (the DRConv paper): one-hot region masks with the straight-through
            gradient. ``True``: the softmax of the region logits blends the ``R`` candidates, so the
            output varies continuously with the guide features (no quantisation at region borders).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        guide_channels: int,
        num_regions: int,
        kernel_size: int = 3,
        guide_kernel_size: int = 3,
        filter_pool: int = 4,
        filter_hidden: int = 32,
        dynamic_bias: bool = True,
        filter_init_scale: float = 0.1,
        soft_regions: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("guide_channels", guide_channels),
            ("num_regions", num_regions),
            ("filter_pool", filter_pool),
            ("filter_hidden", filter_hidden),
        ):
            if int(value) < 1:
                raise ValueError(f"DRConv2d: {name} must be >= 1, got {value}")
        for name, value in (("kernel_size", kernel_size), ("guide_kernel_size", guide_kernel_size)):
            if int(value) < 1 or int(value) % 2 == 0:
                raise ValueError(f"DRConv2d: {name} must be a positive odd integer, got {value}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.num_regions = int(num_regions)
        self.kernel_size = int(kernel_size)
        self.dynamic_bias = bool(dynamic_bias)
        self.soft_regions = bool(soft_regions)

        self.guide = nn.Conv2d(guide_channels, num_regions, guide_kernel_size, padding=guide_kernel_size // 2)

        self.filter_pooling = nn.AdaptiveAvgPool2d(filter_pool)
        self.filter_features = nn.Sequential(nn.Conv2d(guide_channels, filter_hidden, 1), nn.ReLU(inplace=True))
        self.n_filter_weights = num_regions * out_channels * in_channels * kernel_size * kernel_size
        n_outputs = self.n_filter_weights + (num_regions * out_channels if dynamic_bias else 0)
        self.filter_head = nn.Linear(filter_hidden * filter_pool * filter_pool, n_outputs)
        with torch.no_grad():
            self.filter_head.weight.mul_(filter_init_scale)
            self.filter_head.bias.zero_()

    def region_logits(self, guide_features: torch.Tensor) -> torch.Tensor:
        """Guide branch logits ``(B, R, H, W)``."""
        return self.guide(guide_features)

    def region_masks(self, guide_features: torch.Tensor) -> torch.Tensor:
        """Region masks ``(B, R, H, W)``: straight-through one-hot, or the softmax with ``soft_regions``."""
        logits = self.region_logits(guide_features)
        return logits.softmax(dim=1) if self.soft_regions else straight_through_region_masks(logits)

    def regress_filters(self, guide_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Filter branch: per-sample filter banks ``(B, R, C_out, C_in, k, k)`` and biases ``(B, R, C_out)``
        (``None`` without ``dynamic_bias``)."""
        batch = guide_features.shape[0]
        pooled = self.filter_features(self.filter_pooling(guide_features))
        params = self.filter_head(pooled.flatten(1))
        k = self.kernel_size
        weights = params[:, : self.n_filter_weights].reshape(
            batch, self.num_regions, self.out_channels, self.in_channels, k, k
        )
        bias = params[:, self.n_filter_weights :].reshape(batch, self.num_regions, self.out_channels) if self.dynamic_bias else None
        return weights, bias

    def forward_with_masks(self, x: torch.Tensor, guide_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward` but also returns the region masks ``(B, R, H, W)``."""
        self._check_inputs(x, guide_features)
        masks = self.region_masks(guide_features)
        weights, bias = self.regress_filters(guide_features)
        return apply_region_filters(x, masks, weights, bias), masks

    def forward(self, x: torch.Tensor, guide_features: torch.Tensor) -> torch.Tensor:
        """``(B, C_out, H, W)``: ``x`` convolved with the filters of each pixel's region."""
        return self.forward_with_masks(x, guide_features)[0]

    def _check_inputs(self, x: torch.Tensor, guide_features: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DRConv2d: x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if guide_features.dim() != 4 or guide_features.shape[1] != self.guide.in_channels:
            raise ValueError(
                f"DRConv2d: guide_features must be (B, {self.guide.in_channels}, H, W), got {tuple(guide_features.shape)}"
            )
        if x.shape[0] != guide_features.shape[0] or x.shape[2:] != guide_features.shape[2:]:
            raise ValueError(
                f"DRConv2d: x {tuple(x.shape)} and guide_features {tuple(guide_features.shape)} must share batch size and H, W"
            )
