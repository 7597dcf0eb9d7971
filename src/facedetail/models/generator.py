"""pix2pix U-Net generator (Isola et al. 2017), written from the paper's description.

With ``num_downs = n`` and channel widths ``c_i = ngf * min(2**i, 8)``:

* down block ``i`` (``0 <= i < n``): ``LeakyReLU(0.2)`` (not on block 0, which sees the raw input) ->
  ``Conv2d(4x4, stride 2, pad 1)`` -> norm (not on block 0 and not on the innermost block, whose output
  is 1x1 at the full size, as in pix2pix);
* up block ``i``: ``ReLU`` -> ``ConvTranspose2d(4x4, stride 2, pad 1)`` -> norm (+ optional dropout on the
  deepest non-innermost levels, as pix2pix); the input of up block ``i < n-1`` is the concatenation of
  down block ``i``'s output (skip connection) and up block ``i+1``'s output;
* the outermost up block has no norm and ends with ``tanh`` (``output_activation="tanh"``) or nothing
  (``"none"``).

Convolutions have a bias unless ``norm="batch"`` (pix2pix's ``use_bias``; the outermost up conv always has
one), so ``ngf=64, num_downs=8, norm="batch"``, 3 -> 3 channels has pix2pix's 54.414 M parameters.

For the detail generator the output is the **attribute embedding**. Default ``tanh``: a bounded
embedding in [-1, 1] keeps the inputs of the DRConv guide conv and filter regressor well scaled; with
``"none"`` the embedding is unbounded (a linear last layer).

The spatial size must be divisible by ``2**num_downs`` (256 with 8 downs reaches 1x1, 64 with 5 reaches
2x2). Input (default 4 channels) = UV texture (3) + validity mask (1).
"""
from __future__ import annotations

import torch
from torch import nn

NORMS = ("batch", "instance", "none")
OUTPUT_ACTIVATIONS = ("tanh", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-D norm layer: ``"batch"`` (affine), ``"instance"`` (no affine, no running stats, as pix2pix) or ``"none"``."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def conv_bias_for(norm: str) -> bool:
    """Convolutions followed by BatchNorm (which has its own shift) get no bias, as in pix2pix."""
    return norm != "batch"


class UNetGenerator(nn.Module):
    """pix2pix U-Net (see module docstring).

    Args:
        in_channels: input channels (UV texture 3 + validity 1 = 4).
        out_channels: output channels (attribute embedding channels ``E``).
        num_downs: number of down (and up) blocks, >= 2.
        ngf: base width (pix2pix: 64).
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        dropout: dropout probability in the up blocks of the (up to) three deepest non-innermost levels.
        output_activation: ``"tanh"`` or ``"none"``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 16,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        dropout: float = 0.0,
        output_activation: str = "tanh",
    ) -> None:
        super().__init__()
        if num_downs < 2:
            raise ValueError(f"UNetGenerator: num_downs must be >= 2, got {num_downs}")
        if in_channels < 1 or out_channels < 1 or ngf < 1:
            raise ValueError(f"UNetGenerator: channel counts must be >= 1 (in {in_channels}, out {out_channels}, ngf {ngf})")
        if norm not in NORMS:
            raise ValueError(f"UNetGenerator: norm must be one of {NORMS}, got {norm!r}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"UNetGenerator: output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNetGenerator: dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_downs = num_downs
        use_bias = conv_bias_for(norm)
        widths = [ngf * min(2**i, 8) for i in range(num_downs)]
        innermost = num_downs - 1

        downs = []
        for i in range(num_downs):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.LeakyReLU(0.2, inplace=False))
            source = in_channels if i == 0 else widths[i - 1]
            layers.append(nn.Conv2d(source, widths[i], 4, stride=2, padding=1, bias=use_bias))
            if 0 < i < innermost:
                layers.append(make_norm(norm, widths[i]))
            downs.append(nn.Sequential(*layers))
        self.downs = nn.ModuleList(downs)

        dropout_levels = set(range(max(1, innermost - 3), innermost))
        ups = []
        for i in range(num_downs):
            source = widths[i] if i == innermost else 2 * widths[i]
            target = out_channels if i == 0 else widths[i - 1]
            layers = [nn.ReLU(inplace=False), nn.ConvTranspose2d(source, target, 4, stride=2, padding=1, bias=use_bias or i == 0)]
            if i == 0:
                if output_activation == "tanh":
                    layers.append(nn.Tanh())
            else:
                layers.append(make_norm(norm, target))
                if dropout > 0 and i in dropout_levels:
                    layers.append(nn.Dropout(dropout))
            ups.append(nn.Sequential(*layers))
        self.ups = nn.ModuleList(ups)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (``2**num_downs``)."""
        return 2**self.num_downs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, S, S) -> (B, out_channels, S, S)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNetGenerator: input must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.size_multiple or x.shape[3] % self.size_multiple:
            raise ValueError(
                f"UNetGenerator: height and width must be multiples of 2**num_downs = {self.size_multiple}, "
                f"got {tuple(x.shape[2:])} (lower num_downs or change the UV size)"
            )
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        y = self.ups[-1](skips[-1])
        for i in range(self.num_downs - 2, -1, -1):
            y = self.ups[i](torch.cat([skips[i], y], dim=1))
        return y
