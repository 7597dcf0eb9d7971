"""Coarse and detailed renders of fitted faces (paper Fig. 1's "Differentiable Renderer"), used by training,
evaluation and inference (the high layer of :mod:`facedetail.render`, above :mod:`facedetail.geometry`).

The coarse mesh comes from the 3DMM coefficients (fixed during detail training). Details live
in UV space (DECA's scheme): the coarse surface is baked into a UV position map and normal map,
the displacement ``d`` moves each texel along its normal, the detailed normal map is recomputed
on that dense UV-grid surface, and both renders shade the same albedo with the same SH lighting,
sampling the normal map per pixel through the coarse mesh's rasterized UVs (deferred shading).
Gradients flow from the detailed render into the displacement map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from facedetail.geometry.camera import transform_and_project
from facedetail.geometry.detail import delit_albedo, displace_position_map, normals_from_position_map
from facedetail.geometry.face_model import FaceModel
from facedetail.geometry.mesh import vertex_normals
from facedetail.geometry.uv import fill_invalid_texels, rasterize_uv
from facedetail.render.rasterizer import interpolate, interpolate_uv, rasterize, sample_uv_map
from facedetail.render.shading import irradiance_map


@dataclass
class UVSurface:
    """A batch of surfaces baked into UV space (what :meth:`DetailRenderer.detailed_maps` displaces).

    Attributes:
        position_map: (B, 3, S, S) surface points, padded past the UV layout.
        normal_map: (B, 3, S, S) unit normals (same frame), padded.
        uv_valid: (1, 1, S, S) texels covered by the UV layout.
    """

    position_map: torch.Tensor
    normal_map: torch.Tensor
    uv_valid: torch.Tensor


@dataclass
class FaceBatchScene:
    """Everything about a batch of fitted faces that does not depend on the detail generator.

    Attributes:
        position_map: (B, 3, S, S) coarse surface points (camera-aligned model frame), padded.
        normal_map: (B, 3, S, S) coarse unit normals (same frame), padded.
        albedo_map: (B, 3, S, S) smooth de-lit albedo from the unwrapped texture.
        uv_valid: (1, 1, S, S) texels covered by the UV layout.
        gamma: (B, 27) SH lighting.
        pixel_uv: (B, H, W, 2) UV of the coarse surface seen at each pixel.
        render_mask: (B, 1, H, W) pixels covered by the face region of the model.
    """

    position_map: torch.Tensor
    normal_map: torch.Tensor
    albedo_map: torch.Tensor
    uv_valid: torch.Tensor
    gamma: torch.Tensor
    pixel_uv: torch.Tensor
    render_mask: torch.Tensor

    _PER_FACE = ("position_map", "normal_map", "albedo_map", "gamma", "pixel_uv", "render_mask")

    def select(self, index: torch.Tensor) -> "FaceBatchScene":
        """The scenes of a subset of the batch (``index`` into axis 0)."""
        picked = {name: getattr(self, name)[index] for name in self._PER_FACE}
        return FaceBatchScene(uv_valid=self.uv_valid, **picked)

    @staticmethod
    def concatenate(scenes: list["FaceBatchScene"]) -> "FaceBatchScene":
        """One scene batch from several (they must share the UV layout)."""
        joined = {name: torch.cat([getattr(s, name) for s in scenes]) for name in FaceBatchScene._PER_FACE}
        return FaceBatchScene(uv_valid=scenes[0].uv_valid, **joined)


class DetailRenderer:
    """Bakes fitted meshes into UV space and renders them with coarse or detailed normals.

    Args:
        face_model: the morphable model the coefficients belong to.
        uv_size: side of the UV maps (must match the maps of the ``uv_maps`` pipeline).
        image_size: side of the aligned crop (224).
        backend: rasterizer backend ("auto", "fast", "pytorch3d").
        albedo_blur_sigma: low-pass of the de-lit albedo, in texels.
    """

    def __init__(
        self,
        face_model: FaceModel,
        uv_size: int,
        image_size: int = 224,
        backend: str = "auto",
        albedo_blur_sigma: float = 2.0,
    ) -> None:
        self.face_model = face_model
        self.uv_size = int(uv_size)
        self.image_size = int(image_size)
        self.backend = backend
        self.albedo_blur_sigma = float(albedo_blur_sigma)
        self.camera = face_model.camera.resized(self.image_size) if self.image_size != face_model.camera.image_size else face_model.camera
        self.uv_fragments = rasterize_uv(face_model.tri_uv_idx, face_model.uv, self.uv_size)
        self.uv_valid = self.uv_fragments.mask[0][None, None].to(face_model.mean_shape.dtype)
        self.face_region = face_model.face_mask.to(face_model.mean_shape.dtype)[:, None]

    def bake(self, vertex_values: torch.Tensor) -> torch.Tensor:
        """Per-vertex values (B, V, C) -> UV maps (B, C, S, S) (0 outside the UV layout)."""
        baked = interpolate(self.uv_fragments, self.face_model.triangles, vertex_values)
        return baked.permute(0, 3, 1, 2).contiguous()

    def surface(self, vertices: torch.Tensor, normals: torch.Tensor) -> UVSurface:
        """Bake vertices (B, V, 3) and their normals (any one frame) into padded UV position/normal maps."""
        valid = self.uv_valid[0, 0]
        position_map = fill_invalid_texels(self.bake(vertices), valid, iterations=3)
        normal_map = F.normalize(fill_invalid_texels(self.bake(normals), valid, iterations=3), dim=1, eps=1e-8)
        return UVSurface(position_map, normal_map, self.uv_valid)

    def coarse_mesh(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Coarse mesh of coefficients (B, K): world/screen vertices, rotated normals, SH gamma."""
        parts = self.face_model.layout.split(coefficients)
        shape = self.face_model.shape(parts["id"], parts["exp"])
        screen, world, rotation = transform_and_project(shape, parts["angles"], parts["trans"], self.camera)
        normals = vertex_normals(shape, self.face_model.triangles) @ rotation
        return {"shape": shape, "world": world, "screen": screen, "normals": normals, "gamma": parts["gamma"]}

    @torch.no_grad()
    def prepare(self, coefficients: torch.Tensor, uv_texture: torch.Tensor, texture_valid: torch.Tensor) -> FaceBatchScene:
        """Rasterize and bake everything the generator does not change (no gradients needed)."""
        mesh = self.coarse_mesh(coefficients)
        valid = self.uv_valid
        surface = self.surface(mesh["world"], mesh["normals"])
        position_map, normal_map = surface.position_map, surface.normal_map
        shading = irradiance_map(normal_map, mesh["gamma"])
        albedo = delit_albedo(uv_texture, texture_valid * valid, shading, self.albedo_blur_sigma)
        fragments = rasterize(mesh["screen"], self.face_model.triangles, self.image_size, backend=self.backend)
        pixel_uv = interpolate_uv(fragments, self.face_model.tri_uv_idx, self.face_model.uv)
        region = interpolate(fragments, self.face_model.triangles, self.face_region.expand(1, -1, -1))
        render_mask = ((region[..., 0] > 0.5) & fragments.mask)[:, None].to(coefficients.dtype)
        return FaceBatchScene(position_map, normal_map, albedo, valid, mesh["gamma"], pixel_uv, render_mask)

    def detailed_maps(self, scene: FaceBatchScene | UVSurface, displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(detailed position map, detailed normal map) for a displacement map (B, 1, S, S).

        ``scene`` is a prepared :class:`FaceBatchScene` (camera frame, for the renders) or a :class:`UVSurface`
        (e.g. the model-frame surface of :meth:`surface`, for the exports).

        The detailed normal is the coarse (smooth, interpolated) normal plus the change that the
        displacement makes to the UV-grid surface's finite-difference normal, so a zero
        displacement reproduces the coarse render exactly and only the details change shading.
        """
        valid = scene.uv_valid.bool()
        detailed = displace_position_map(scene.position_map, scene.normal_map, displacement * scene.uv_valid)
        grid_coarse = normals_from_position_map(scene.position_map, valid, scene.normal_map)
        grid_detailed = normals_from_position_map(detailed, valid, scene.normal_map)
        # the change first: exactly 0 where the displacement changes nothing (n + (a - a) == n; (n + a) - a may not)
        normals = F.normalize(scene.normal_map + (grid_detailed - grid_coarse), dim=1, eps=1e-8)
        return detailed, normals

    def render(self, scene: FaceBatchScene, normal_map: torch.Tensor) -> torch.Tensor:
        """Shade the albedo with a normal map and render it into the crop: (B, 3, H, W) in [0, 1]."""
        normals = F.normalize(sample_uv_map(normal_map, scene.pixel_uv), dim=1, eps=1e-8)
        albedo = sample_uv_map(scene.albedo_map, scene.pixel_uv)
        return (albedo * irradiance_map(normals, scene.gamma) * scene.render_mask).clamp(0.0, 1.0)

    def render_shape(self, scene: FaceBatchScene, normal_map: torch.Tensor, grey: float = 0.7) -> torch.Tensor:
        """Shape-only render (uniform grey albedo, the fitted lighting) to see the geometry itself."""
        normals = F.normalize(sample_uv_map(normal_map, scene.pixel_uv), dim=1, eps=1e-8)
        gamma = torch.zeros_like(scene.gamma)
        gamma[:, 0] = gamma[:, 9] = gamma[:, 18] = -0.3  # ambient (0.8 is added by the SH convention)
        gamma[:, 2] = gamma[:, 11] = gamma[:, 20] = 0.4  # light from the camera side (+z)
        return (grey * irradiance_map(normals, gamma) * scene.render_mask).clamp(0.0, 1.0)
