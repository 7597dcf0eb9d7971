import math

import torch

from facedetail.geometry.detail import (
    delit_albedo,
    displace_position_map,
    masked_blur,
    normals_from_position_map,
)


def plane(size=16):
    rows = torch.arange(size, dtype=torch.float64)
    v = 1 - (rows + 0.5) / size
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv, torch.zeros_like(uu)])[None]


def test_plane_normals_point_along_z_and_follow_reference():
    pos = plane()
    valid = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    n = normals_from_position_map(pos, valid)
    assert torch.allclose(n[:, 2], torch.ones(1, 16, 16, dtype=torch.float64))  # u x v = +z
    ref = torch.zeros_like(pos)
    ref[:, 2] = -1
    n_ref = normals_from_position_map(pos, valid, ref)
    assert torch.allclose(n_ref[:, 2], -torch.ones(1, 16, 16, dtype=torch.float64))


def test_displaced_ramp_tilts_normals_by_the_slope():
    size = 32
    pos = plane(size)
    normal = torch.zeros_like(pos)
    normal[:, 2] = 1
    slope = 0.5
    disp = (slope * pos[:, :1])  # d = 0.5 u -> surface z = 0.5 x, normal ∝ (-0.5, 0, 1)
    detailed = displace_position_map(pos, normal, disp)
    n = normals_from_position_map(detailed, torch.ones(1, 1, size, size, dtype=torch.bool), normal)
    expected = torch.tensor([-slope, 0.0, 1.0], dtype=torch.float64) / math.sqrt(1 + slope**2)
    assert torch.allclose(n[0, :, 5:-5, 5:-5].permute(1, 2, 0), expected.expand(size - 10, size - 10, 3), atol=1e-9)


def test_invalid_neighbours_do_not_leak_into_border_normals():
    pos = plane()
    pos[:, 2, :, 8:] = 100.0  # garbage outside the valid half
    valid = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    valid[..., :8] = True
    n = normals_from_position_map(pos, valid)
    assert torch.allclose(n[:, 2, :, :8], torch.ones(1, 16, 8, dtype=torch.float64))
    assert torch.all(n[:, :, :, 8:] == 0)


def test_masked_blur_keeps_constants_and_ignores_invalid_values():
    image = torch.full((1, 3, 20, 20), 0.25)
    image[..., 10:] = 9.0
    valid = torch.zeros(1, 1, 20, 20)
    valid[..., :10] = 1
    out = masked_blur(image, valid, sigma=2.0)
    assert torch.allclose(out[..., :10], torch.full((1, 3, 20, 10), 0.25), atol=1e-6)


def test_delit_albedo_divides_out_shading_and_is_differentiable():
    albedo = torch.full((1, 3, 8, 8), 0.6)
    shading = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
    texture = albedo * 0.5
    out = delit_albedo(texture, torch.ones(1, 1, 8, 8), shading, sigma=1.0)
    assert torch.allclose(out, albedo, atol=1e-6)
    out.sum().backward()
    assert shading.grad is not None and torch.isfinite(shading.grad).all()
