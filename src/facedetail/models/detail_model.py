"""Detail generator of the paper (section 2.2): pix2pix U-Net -> attribute embedding -> DRConv on the expression map.

Inputs (all UV maps of the same size ``S``, channel-first):

* ``uv_texture`` ``(B, 3, S, S)``: RGB unwrapped face texture in [0, 1]. Internally mapped to [-1, 1] and
  zeroed where the texture is invalid, then concatenated with the validity mask as the U-Net input.
* ``texture_valid`` ``(B, 1, S, S)``: 1 where the texel saw the face, 0 elsewhere (float or bool).
* ``expression_map`` ``(B, 3, S, S)``: per-texel expression offsets ``B @ beta`` in face-model units
  (ICT: cm). This is what DRConv convolves.

Outputs of :meth:`DetailGenerator.forward` (dict):

* ``displacement`` ``(B, 1, S, S)`` = ``tanh(DRConv(expression_map; embedding)) * max_displacement``, in
  face-model units, along the coarse normals (positive = outwards);
* ``embedding`` ``(B, E, S, S)``: the attribute embedding (U-Net output, in [-1, 1] with ``tanh``);
* ``region_masks`` ``(B, R, S, S)``: one-hot DRConv region assignment (straight-through gradient).

Expression re-targeting: ``displacement_from(embedding, other_expression_map)`` keeps a face's attribute
embedding and applies it to another expression.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

from facedetail.geometry.detail import masked_blur
from facedetail.models.drconv import DRConv2d
from facedetail.models.generator import UNetGenerator


class DetailGenerator(nn.Module):
    """U-Net attribute embedding + one DRConv layer giving a bounded UV displacement map.

    Args:
        ngf: U-Net base width (pix2pix 64; small configs 16).
        num_downs: U-Net depth; the UV size must be a multiple of ``2**num_downs``.
        norm: U-Net norm, ``"batch"``, ``"instance"`` or ``"none"``.
        embedding_channels: attribute embedding channels ``E``.
        regions: DRConv regions ``R``.
        kernel_size: DRConv filter size ``k`` (odd).
        filter_pool: DRConv filter branch pooling grid size.
        filter_hidden: DRConv filter branch hidden channels.
        guide_kernel_size: DRConv guide conv kernel size (odd).
        max_displacement: bound of the displacement in face-model units (ICT cm: 0.3 = 3 mm).
        dropout: U-Net dropout (pix2pix levels), 0 disables.
        embedding_activation: ``"tanh"`` (bounded embedding) or ``"none"``.
        soft_regions: DRConv region masks: ``False`` (paper) one-hot with a straight-through gradient,
            ``True`` the softmax of the region logits (the displacement varies continuously with the embedding).
        texture_channels, mask_channels, expression_channels: input channel counts (3, 1, 3).
        texture_detail_gain: > 0 adds the texture's high-pass ``gain x (texture - masked Gaussian blur)`` (in the
            [-1, 1] input scale) as ``texture_channels`` more U-Net inputs: the fine shading of the person's wrinkles
            (often 1-3 grey levels) at a scale the embedding can use; 0 (default) keeps the paper's input.
        texture_detail_sigma: that blur, in texels.
        pattern_head: adds ``pattern(embedding) x drive(expression_map)`` (two 1x1 convolutions) to DRConv's
            output before the ``tanh``: a per-texel pattern from the embedding scaled by the local expression.
            DRConv alone shapes a wrinkle through its region masks, whose gradient is zero once the regressed
            filters shrink to zero, and its filters' gradient averages out over zero-mean oscillating wrinkles
            (furrows, crow's feet) whose phase the masks do not yet follow: it collapses to zero displacement
            there. The pattern term gets a per-texel gradient. ``False`` (default): the paper's generator.
    """

    def __init__(
        self,
        ngf: int = 64,
        num_downs: int = 8,
        norm: str = "instance",
        embedding_channels: int = 16,
        regions: int = 8,
        kernel_size: int = 3,
        filter_pool: int = 4,
        filter_hidden: int = 32,
        guide_kernel_size: int = 3,
        max_displacement: float = 0.3,
        dropout: float = 0.0,
        embedding_activation: str = "tanh",
        soft_regions: bool = False,
        texture_channels: int = 3,
        mask_channels: int = 1,
        expression_channels: int = 3,
        texture_detail_gain: float = 0.0,
        texture_detail_sigma: float = 2.0,
        pattern_head: bool = False,
    ) -> None:
        super().__init__()
        if not max_displacement > 0:
            raise ValueError(f"DetailGenerator: max_displacement must be > 0 (face-model units), got {max_displacement}")
        self.config: dict[str, Any] = {
            "ngf": int(ngf),
            "num_downs": int(num_downs),
            "norm": str(norm),
            "embedding_channels": int(embedding_channels),
            "regions": int(regions),
            "kernel_size": int(kernel_size),
            "filter_pool": int(filter_pool),
            "filter_hidden": int(filter_hidden),
            "guide_kernel_size": int(guide_kernel_size),
            "max_displacement": float(max_displacement),
            "dropout": float(dropout),
            "embedding_activation": str(embedding_activation),
            "soft_regions": bool(soft_regions),
            "texture_channels": int(texture_channels),
            "mask_channels": int(mask_channels),
            "expression_channels": int(expression_channels),
        }
        if texture_detail_gain < 0 or not texture_detail_sigma > 0:
            raise ValueError(f"DetailGenerator: texture_detail_gain must be >= 0 and texture_detail_sigma > 0, "
                             f"got {texture_detail_gain}, {texture_detail_sigma}")
        if texture_detail_gain > 0:  # only then in the config: older checkpoints' configs stay as they were
            self.config.update(texture_detail_gain=float(texture_detail_gain), texture_detail_sigma=float(texture_detail_sigma))
        if pattern_head:
            self.config["pattern_head"] = True
        self.texture_detail_gain = float(texture_detail_gain)
        self.texture_detail_sigma = float(texture_detail_sigma)
        self.max_displacement = float(max_displacement)
        self.texture_channels = int(texture_channels)
        self.mask_channels = int(mask_channels)
        self.expression_channels = int(expression_channels)
        self.embedding_net = UNetGenerator(
            in_channels=texture_channels * (2 if texture_detail_gain > 0 else 1) + mask_channels,
            out_channels=embedding_channels,
            num_downs=num_downs,
            ngf=ngf,
            norm=norm,
            dropout=dropout,
            output_activation=embedding_activation,
        )
        self.drconv = DRConv2d(
            in_channels=expression_channels,
            out_channels=1,
            guide_channels=embedding_channels,
            num_regions=regions,
            kernel_size=kernel_size,
            guide_kernel_size=guide_kernel_size,
            filter_pool=filter_pool,
            filter_hidden=filter_hidden,
            soft_regions=soft_regions,
        )
        self.pattern = nn.Conv2d(embedding_channels, 1, 1) if pattern_head else None
        self.drive = nn.Conv2d(expression_channels, 1, 1, bias=False) if pattern_head else None

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """Names accepted by :meth:`from_config` (the constructor's arguments)."""
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DetailGenerator":
        """Build from a config dict (e.g. ``parameters_train.yml``'s ``train.model`` or a checkpoint's ``config``).

        Missing keys take the constructor defaults; unknown keys raise ``ValueError`` listing the allowed ones.
        """
        unknown = sorted(set(config) - set(cls.config_keys()))
        if unknown:
            raise ValueError(f"DetailGenerator config has unknown keys {unknown}; allowed: {list(cls.config_keys())}")
        return cls(**dict(config))

    def embed(self, uv_texture: torch.Tensor, texture_valid: torch.Tensor) -> torch.Tensor:
        """Attribute embedding ``(B, E, S, S)`` from the UV texture ([0, 1]) and its validity mask."""
        if uv_texture.dim() != 4 or uv_texture.shape[1] != self.texture_channels:
            raise ValueError(f"uv_texture must be (B, {self.texture_channels}, S, S) in [0, 1], got {tuple(uv_texture.shape)}")
        if texture_valid.dim() != 4 or texture_valid.shape[1] != self.mask_channels:
            raise ValueError(f"texture_valid must be (B, {self.mask_channels}, S, S), got {tuple(texture_valid.shape)}")
        if texture_valid.shape[0] != uv_texture.shape[0] or texture_valid.shape[2:] != uv_texture.shape[2:]:
            raise ValueError(
                f"texture_valid {tuple(texture_valid.shape)} must match uv_texture {tuple(uv_texture.shape)} in batch and size"
            )
        valid = texture_valid.to(uv_texture.dtype)
        texture = (uv_texture * 2.0 - 1.0) * valid
        parts = [texture, valid]
        if self.texture_detail_gain > 0:
            parts.insert(1, self.texture_detail_gain * (texture - masked_blur(texture, valid, self.texture_detail_sigma)) * valid)
        return self.embedding_net(torch.cat(parts, dim=1))

    def detail_from(self, embedding: torch.Tensor, expression_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(displacement (B, 1, S, S), region_masks (B, R, S, S))`` for an embedding and an expression map."""
        if expression_map.dim() != 4 or expression_map.shape[1] != self.expression_channels:
            raise ValueError(
                f"expression_map must be (B, {self.expression_channels}, S, S) in face-model units, got {tuple(expression_map.shape)}"
            )
        expression_map = expression_map.to(embedding.dtype)
        raw, masks = self.drconv.forward_with_masks(expression_map, embedding)
        if self.pattern is not None:
            raw = raw + self.pattern(embedding) * self.drive(expression_map)
        return torch.tanh(raw) * self.max_displacement, masks

    def displacement_from(self, embedding: torch.Tensor, expression_map: torch.Tensor) -> torch.Tensor:
        """Displacement ``(B, 1, S, S)`` (face-model units) of an attribute embedding under an expression map.

        Used for expression re-targeting: the same embedding with a different expression map.
        """
        return self.detail_from(embedding, expression_map)[0]

    def forward(
        self, uv_texture: torch.Tensor, texture_valid: torch.Tensor, expression_map: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """See the module docstring: returns ``displacement``, ``embedding``, ``region_masks``."""
        embedding = self.embed(uv_texture, texture_valid)
        if expression_map.shape[0] != embedding.shape[0] or expression_map.shape[2:] != embedding.shape[2:]:
            raise ValueError(
                f"expression_map {tuple(expression_map.shape)} must match uv_texture {tuple(uv_texture.shape)} in batch and size"
            )
        displacement, region_masks = self.detail_from(embedding, expression_map)
        return {"displacement": displacement, "embedding": embedding, "region_masks": region_masks}
