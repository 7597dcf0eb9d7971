"""Second-order spherical-harmonics (SH) lighting with Deng et al.'s constants.

``gamma`` (B, 27) is reshaped to (B, 3, 9) (colour channel major: R's 9 coefficients, then G,
then B), ``0.8`` is added to the first (ambient) coefficient of every channel, and the colour of a
point is ``(Y(n) . gamma_c) * albedo_c`` where ``Y`` is the 9-term basis below (``n`` the unit
normal in the rotated model frame: x right, y up, z towards the camera).
"""
from __future__ import annotations

import math

import torch

#: Lambertian attenuation per SH band (pi, 2 pi / sqrt 3, 2 pi / sqrt 8) as in Deng et al.
SH_A = (math.pi, 2.0 * math.pi / math.sqrt(3.0), 2.0 * math.pi / math.sqrt(8.0))
#: SH normalisation constants per band as in Deng et al.
SH_C = (1.0 / math.sqrt(4.0 * math.pi), math.sqrt(3.0) / math.sqrt(4.0 * math.pi), 3.0 * math.sqrt(5.0) / math.sqrt(12.0 * math.pi))
#: Added to the first coefficient of each colour channel (Deng et al.'s ``init_lit``).
SH_AMBIENT_INIT = 0.8
#: Number of SH coefficients per colour channel.
SH_COEFFS_PER_CHANNEL = 9


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 SH basis values (attenuation and normalisation folded in) of unit normals.

    Args:
        normals: (..., 3) unit normals.

    Returns:
        (..., 9): ``[a0c0, -a1c1 y, a1c1 z, -a1c1 x, a2c2 xy, -a2c2 yz, a2c2/(2 sqrt 3) (3z^2-1),
        -a2c2 xz, a2c2/2 (x^2-y^2)]``.
    """
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    k0, k1, k2 = SH_A[0] * SH_C[0], SH_A[1] * SH_C[1], SH_A[2] * SH_C[2]
    return torch.stack(
        [
            torch.full_like(x, k0),
            -k1 * y,
            k1 * z,
            -k1 * x,
            k2 * x * y,
            -k2 * y * z,
            0.5 * k2 / math.sqrt(3.0) * (3.0 * z * z - 1.0),
            -k2 * x * z,
            0.5 * k2 * (x * x - y * y),
        ],
        dim=-1,
    )


def gamma_to_sh(gamma: torch.Tensor) -> torch.Tensor:
    """Reshape (B, 27) lighting coefficients to (B, 3, 9) and add the 0.8 ambient initialisation."""
    if gamma.ndim != 2 or gamma.shape[-1] != 3 * SH_COEFFS_PER_CHANNEL:
        raise ValueError(f"gamma must have shape (B, 27), got {tuple(gamma.shape)}")
    sh = gamma.reshape(gamma.shape[0], 3, SH_COEFFS_PER_CHANNEL)
    ambient = torch.zeros_like(sh)
    ambient[:, :, 0] = SH_AMBIENT_INIT
    return sh + ambient


def irradiance(normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-channel shading ``Y(n) . gamma_c``.

    Args:
        normals: (B, N, 3) unit normals (rotated model frame).
        gamma: (B, 27) coefficients (without the 0.8; it is added here).

    Returns:
        (B, N, 3) shading, multiply by albedo to get colour.
    """
    return sh_basis(normals) @ gamma_to_sh(gamma).transpose(1, 2)


def shade(albedo: torch.Tensor, normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Lambertian SH colour ``(Y(n) . gamma) * albedo`` (Deng et al.'s ``compute_color``).

    Args:
        albedo: (B, N, 3) in [0, 1].
        normals: (B, N, 3) unit normals in the rotated model frame.
        gamma: (B, 27) SH coefficients.

    Returns:
        (B, N, 3) colour (same range as albedo, not clamped).
    """
    return irradiance(normals, gamma) * albedo
