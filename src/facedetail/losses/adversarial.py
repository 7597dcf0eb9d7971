"""Least-squares GAN losses (Mao et al. 2017), as pix2pix/CycleGAN use them (paper section 2.5.3).

Discriminator outputs are raw patch scores (no sigmoid), any shape. Real target 1, fake target 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lsgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``0.5 * (mean((d_real - 1)^2) + mean(d_fake^2))`` (halved, as pix2pix).

    Pass ``d_fake`` computed on detached generator outputs so this loss does not train the generator.
    """
    return 0.5 * (F.mse_loss(d_real, torch.ones_like(d_real)) + F.mse_loss(d_fake, torch.zeros_like(d_fake)))


def lsgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss ``mean((d_fake - 1)^2)``: the generator wants its outputs scored as real."""
    return F.mse_loss(d_fake, torch.ones_like(d_fake))
