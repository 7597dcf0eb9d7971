"""Per-face training tensors (``FaceTensors``) and the content-based train/validation split.

Kedro-free and torch-only: the in-memory batch layout every training source (in-memory tensors or
the sharded stream of :mod:`facedetail.data.streaming`) produces, one batch at a time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FaceTensors:
    """Per-face training inputs, all indexed like ``face_ids``.

    images (N, 3, H, W) in [0, 1]; masks (N, 1, H, W) in {0, 1}; coefficients (N, K);
    uv_textures (N, 3, S, S) in [0, 1]; texture_valid (N, 1, S, S); expression_maps (N, 3, S, S).
    Large sets may keep compact dtypes (uint8 images/textures, bool masks, float16 maps: a quarter
    of the memory); :meth:`as_float` converts one batch at a time.
    """

    face_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    coefficients: torch.Tensor
    uv_textures: torch.Tensor
    texture_valid: torch.Tensor
    expression_maps: torch.Tensor

    def __len__(self) -> int:
        return len(self.face_ids)

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> "FaceTensors":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return FaceTensors(
            [self.face_ids[i] for i in index.tolist()],
            self.images[index],
            self.masks[index],
            self.coefficients[index],
            self.uv_textures[index],
            self.texture_valid[index],
            self.expression_maps[index],
        )

    def as_float(self) -> "FaceTensors":
        """The same faces as float32 tensors in the documented ranges (uint8 images/textures / 255)."""

        def unit(t: torch.Tensor) -> torch.Tensor:
            return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()

        return FaceTensors(
            self.face_ids, unit(self.images), self.masks.float(), self.coefficients.float(),
            unit(self.uv_textures), self.texture_valid.float(), self.expression_maps.float(),
        )

    def to(self, device: torch.device) -> "FaceTensors":
        return FaceTensors(
            self.face_ids,
            *(t.to(device) for t in (self.images, self.masks, self.coefficients, self.uv_textures, self.texture_valid, self.expression_maps)),
        )


def validation_split(face_keys: list[str], fraction: float, seed: int, threshold_from: int = 100) -> np.ndarray:
    """A seeded, content-based split: ``True`` = validation face.

    Each face gets a score from the hash of ``seed:key``. With ``threshold_from`` faces or more, a
    face is in validation when its score is below ``fraction``, so adding faces never moves
    another face across the split. Smaller sets take exactly ``round(fraction * n)`` faces (the
    lowest scores; at least one on each side when there are two faces or more), so a tiny sample
    is not split at random proportions.
    """
    scores = np.array([int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) / 16**12 for k in face_keys])
    n = len(face_keys)
    if n >= threshold_from:
        return scores < fraction
    is_val = np.zeros(n, bool)
    if n >= 2 and fraction > 0:
        k = min(n - 1, max(1, int(round(fraction * n))))
        is_val[np.argsort(scores)[:k]] = True
    return is_val
