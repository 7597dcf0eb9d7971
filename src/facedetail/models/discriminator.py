"""PatchGAN discriminator (pix2pix convention, Isola et al. 2017), written from the paper's description.

Layers for ``n_layers = L`` and ``ndf``:

* ``Conv2d(in, ndf, 4, stride 2, pad 1)`` -> ``LeakyReLU(0.2)`` (no norm on the first layer);
* for ``i = 1 .. L-1``: ``Conv2d(4, stride 2, pad 1)`` to ``ndf * min(2**i, 8)`` -> norm -> ``LeakyReLU(0.2)``;
* ``Conv2d(4, stride 1, pad 1)`` to ``ndf * min(2**L, 8)`` -> norm -> ``LeakyReLU(0.2)``;
* ``Conv2d(4, stride 1, pad 1)`` to 1 channel: one raw score per patch (no sigmoid: LSGAN uses MSE).

Each output pixel sees a square patch of :func:`patchgan_receptive_field` pixels (70 for ``L = 3``).

Conditional use: ``forward(image, condition)`` concatenates ``(condition, image)`` on the channel axis,
so ``in_channels = condition channels + image channels`` (pix2pix's conditional D).
"""
from __future__ import annotations

import torch
from torch import nn

from facedetail.models.generator import conv_bias_for, make_norm


def patchgan_receptive_field(n_layers: int) -> int:
    """Receptive field (pixels) of one output score of :class:`PatchDiscriminator` with ``n_layers``."""
    kernels_strides = [(4, 2)] * n_layers + [(4, 1), (4, 1)]
    # Walk back from one output pixel: r_in = (r_out - 1) * stride + kernel.
    field = 1
    for kernel, stride in reversed(kernels_strides):
        field = (field - 1) * stride + kernel
    return field


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN (see module docstring).

    Args:
        in_channels: channels of the (concatenated) input.
        ndf: base width (pix2pix: 64).
        n_layers: number of stride-2 convs (3 gives the 70x70 PatchGAN).
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "instance") -> None:
        super().__init__()
        if in_channels < 1 or ndf < 1 or n_layers < 1:
            raise ValueError(f"PatchDiscriminator: in_channels, ndf, n_layers must be >= 1, got {in_channels}, {ndf}, {n_layers}")
        self.in_channels = in_channels
        self.n_layers = n_layers
        use_bias = conv_bias_for(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for i in range(1, n_layers + 1):
            next_width = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=use_bias),
                make_norm(norm, next_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Pixels seen by one output score (70 for ``n_layers = 3``)."""
        return patchgan_receptive_field(self.n_layers)

    def forward(self, image: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Patch scores ``(B, 1, H', W')`` for ``image`` (optionally conditioned on ``condition``)."""
        x = image if condition is None else torch.cat([condition, image], dim=1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchDiscriminator: expected {self.in_channels} input channels (condition + image), got input "
                f"{tuple(image.shape)}" + ("" if condition is None else f" with condition {tuple(condition.shape)}")
            )
        return self.model(x)


def build_discriminator(config: dict, image_channels: int = 3) -> PatchDiscriminator:
    """A :class:`PatchDiscriminator` from ``parameters_train.yml``'s ``train.discriminator`` dict.

    Keys: ``ndf`` (64), ``n_layers`` (3), ``norm`` ("instance"), ``conditional`` (True: the input is
    ``concat(condition image, image)``, so ``2 * image_channels`` channels).
    """
    allowed = {"ndf", "n_layers", "norm", "conditional"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"discriminator config has unknown keys {unknown}; allowed: {sorted(allowed)}")
    conditional = bool(config.get("conditional", True))
    return PatchDiscriminator(
        in_channels=image_channels * (2 if conditional else 1),
        ndf=int(config.get("ndf", 64)),
        n_layers=int(config.get("n_layers", 3)),
        norm=str(config.get("norm", "instance")),
    )
