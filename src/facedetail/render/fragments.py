"""The rasterizer output shared by every backend (see :mod:`facedetail.render.rasterizer` for conventions)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Fragments:
    """Per-pixel result of rasterizing a batch of meshes with one face per pixel.

    Dense fields (pytorch3d's layout without the ``faces_per_pixel`` axis):

    * ``pix_to_face`` (B, H, W) long: index of the visible face **within its own mesh** (0..F-1,
      not pytorch3d's packed index ``b * F + f``); -1 where no face covers the pixel centre.
    * ``bary_coords`` (B, H, W, 3): screen-space barycentric coordinates of the pixel centre in the
      visible face (weights of its corners 0, 1, 2); -1 where empty. Differentiable w.r.t. the
      screen vertices.
    * ``zbuf`` (B, H, W): depth of the visible surface at the pixel centre (same units as the
      screen vertices' z), -1 where empty. Differentiable.

    Packed fields (one row per covered pixel, used by :func:`interpolate` to avoid dense work):

    * ``pixel_index`` (N,) long: flat index ``(b * H + row) * W + col`` of each covered pixel.
    * ``face_index`` (N,) long: ``pix_to_face`` at those pixels.
    * ``bary_packed`` (N, 3): ``bary_coords`` at those pixels (differentiable).
    """

    pix_to_face: torch.Tensor
    bary_coords: torch.Tensor
    zbuf: torch.Tensor
    pixel_index: torch.Tensor
    face_index: torch.Tensor
    bary_packed: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Number of images B."""
        return int(self.pix_to_face.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return int(self.pix_to_face.shape[1]), int(self.pix_to_face.shape[2])

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool, True where a face covers the pixel centre."""
        return self.pix_to_face >= 0

    def detach(self) -> "Fragments":
        """A copy cut from the autograd graph."""
        return Fragments(
            self.pix_to_face,
            self.bary_coords.detach(),
            self.zbuf.detach(),
            self.pixel_index,
            self.face_index,
            self.bary_packed.detach(),
        )


def parse_image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair; raises a clear error otherwise."""
    if isinstance(image_size, int):
        height = width = image_size
    else:
        try:
            height, width = (int(s) for s in image_size)
        except (TypeError, ValueError) as error:
            raise ValueError(f"image_size must be an int or a (H, W) pair, got {image_size!r}") from error
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {(height, width)}")
    return height, width


def check_mesh_inputs(screen_verts: torch.Tensor, faces: torch.Tensor) -> None:
    """Validate ``screen_verts`` (B, V, 3) float and ``faces`` (F, 3) integer indices into V."""
    if screen_verts.ndim != 3 or screen_verts.shape[-1] != 3:
        raise ValueError(
            f"screen_verts must have shape (B, V, 3) = (x_px, y_px, depth), got {tuple(screen_verts.shape)}"
        )
    if not screen_verts.is_floating_point():
        raise TypeError(f"screen_verts must be a floating point tensor, got {screen_verts.dtype}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if faces.is_floating_point():
        raise TypeError(f"faces must be an integer tensor, got {faces.dtype}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= screen_verts.shape[1]):
        raise ValueError(
            f"faces index vertices in [{int(faces.min())}, {int(faces.max())}] but screen_verts has "
            f"{screen_verts.shape[1]} vertices"
        )


def fragments_from_dense(pix_to_face: torch.Tensor, bary_coords: torch.Tensor, zbuf: torch.Tensor) -> Fragments:
    """Build :class:`Fragments` (with the packed fields) from dense (B, H, W[, 3]) tensors."""
    pixel_index = torch.nonzero(pix_to_face.reshape(-1) >= 0).squeeze(1)
    face_index = pix_to_face.reshape(-1)[pixel_index]
    bary_packed = bary_coords.reshape(-1, 3)[pixel_index]
    return Fragments(pix_to_face, bary_coords, zbuf, pixel_index, face_index, bary_packed)
