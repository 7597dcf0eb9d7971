"""Perceptual loss: cosine distance of face-recognition embeddings (paper section 2.5.2).

The embeddings come from :class:`facedetail.models.facenet.FaceEmbedder` (FaceNet, 512-d) of the rendered
and the real face; they need not be L2-normalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def perceptual_cosine_loss(emb_a: torch.Tensor, emb_b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean_b (1 - cos(emb_a[b], emb_b[b]))`` for embeddings ``(B, D)``; in [0, 2], 0 when parallel.

    A zero embedding has cosine 0 (loss 1) thanks to ``eps``, never NaN.
    """
    if emb_a.dim() != 2 or emb_a.shape != emb_b.shape:
        raise ValueError(f"embeddings must both be (B, D) with equal shapes, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    return (1.0 - F.cosine_similarity(emb_a, emb_b, dim=1, eps=eps)).mean()
