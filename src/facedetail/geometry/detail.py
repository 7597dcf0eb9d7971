"""Detail geometry in UV space (DECA's scheme): displaced position maps, their normals, de-lit albedo.

All maps are ``(B, C, S, S)`` tensors in the project's UV-image convention (row 0 is the top of
the UV square, i.e. v = 1; column 0 is u = 0), with a validity mask ``(B or 1, 1, S, S)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def displace_position_map(position_map: torch.Tensor, normal_map: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Detailed surface points: ``p + d * n`` per texel (``displacement`` is ``(B,1,S,S)`` in model units)."""
    return position_map + displacement * F.normalize(normal_map, dim=1, eps=1e-8)


def normals_from_position_map(
    position_map: torch.Tensor, valid: torch.Tensor, reference_normals: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-texel normals of the dense UV-grid surface, from central differences of the position map.

    At the border of the valid region one-sided differences are used (invalid neighbours are
    replaced by the centre texel). When ``reference_normals`` (the coarse normal map) is given,
    each normal is flipped to agree with it, so the result does not depend on the UV chart's
    handedness. Invalid texels get the reference normal (or zero).
    """
    valid_f = valid.to(position_map.dtype).expand(position_map.shape[0], 1, *position_map.shape[-2:])
    padded = F.pad(position_map, (1, 1, 1, 1), mode="replicate")
    padded_valid = F.pad(valid_f, (1, 1, 1, 1), value=0.0)
    centre = position_map

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        h, w = position_map.shape[-2:]
        values = padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        ok = padded_valid[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        return ok * values + (1.0 - ok) * centre

    d_u = neighbour(0, 1) - neighbour(0, -1)
    d_v = neighbour(-1, 0) - neighbour(1, 0)  # row index grows as v decreases
    normals = F.normalize(torch.cross(d_u, d_v, dim=1), dim=1, eps=1e-12)
    if reference_normals is not None:
        sign = torch.sign((normals * reference_normals).sum(1, keepdim=True))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        normals = normals * sign
        degenerate = (torch.linalg.vector_norm(torch.cross(d_u, d_v, dim=1), dim=1, keepdim=True) < 1e-12)
        fill = F.normalize(reference_normals, dim=1, eps=1e-8)
        normals = torch.where(degenerate, fill, normals)
        return valid_f * normals + (1.0 - valid_f) * fill
    return valid_f * normals


def masked_blur(image: torch.Tensor, valid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of the valid texels only (normalised convolution); invalid texels are filled too."""
    if sigma <= 0:
        return image * valid
    radius = max(1, int(round(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel_1d = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum()
    valid_f = valid.to(image.dtype).expand(image.shape[0], 1, *image.shape[-2:])

    def separable(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        kx = kernel_1d.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        ky = kernel_1d.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="constant"), kx, groups=c)
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="constant"), ky, groups=c)

    numerator = separable(image * valid_f)
    denominator = separable(valid_f).clamp_min(1e-6)
    return numerator / denominator


def delit_albedo(texture: torch.Tensor, valid: torch.Tensor, shading: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth albedo map from an unwrapped texture: ``blur(texture / coarse shading)``.

    The open face model (ICT-FaceKit) has no albedo basis. Dividing the unwrapped texture by the
    coarse SH shading removes the low-frequency lighting; the Gaussian low-pass (``sigma`` texels)
    removes the high-frequency shading that fine geometry (wrinkles, folds) casts, so the detail
    generator has to explain that shading with displacement instead of baking it into albedo.
    """
    ratio = texture / shading.clamp_min(1e-3)
    return masked_blur(ratio.clamp(0.0, 2.0), valid, sigma).clamp(0.0, 1.5)


def displacement_regularization_points(
    coarse_positions: torch.Tensor, refined_positions: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten the valid texels of two position maps to point sets ``(B, N, 3)`` for Eq. 2.

    Returns the coarse and refined points of the texels valid in ``valid`` (shared by the batch).
    """
    mask = valid.reshape(-1).bool() if valid.shape[0] == 1 else valid[0].reshape(-1).bool()
    coarse = coarse_positions.flatten(2).transpose(1, 2)[:, mask]
    refined = refined_positions.flatten(2).transpose(1, 2)[:, mask]
    return coarse, refined
