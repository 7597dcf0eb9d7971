"""Tests of the rasterizer backends, interpolation and UV sampling (the low layer of facedetail.render)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facedetail.render import (
    interpolate,
    interpolate_packed,
    interpolate_uv,
    pixel_batch_index,
    pytorch3d_available,
    rasterize,
    rasterize_fast,
    rasterize_pytorch3d,
    resolve_backend,
    sample_uv_map,
)
from tests.conftest import ICT_PATH, needs_ict

needs_pytorch3d = pytest.mark.skipif(not pytorch3d_available(), reason="pytorch3d with compiled ops not installed")


def project(verts: torch.Tensor, size: int, distance: float = 130.0, y_shift: float = 0.4) -> torch.Tensor:
    """Pinhole projection (camera on +z looking at the origin) to (x_px, y_px, depth)."""
    focal = 1015.0 * size / 224.0
    depth = distance - verts[..., 2]
    x = focal * verts[..., 0] / depth + size / 2
    y = size / 2 - focal * (verts[..., 1] - y_shift) / depth
    return torch.stack([x, y, depth], -1)


@pytest.fixture(scope="module")
def ict_mesh() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = np.load(ICT_PATH)
    return (
        torch.from_numpy(data["neutral"]).float(),
        torch.from_numpy(data["tris"]).long(),
        torch.from_numpy(data["tri_uv_idx"]).long(),
        torch.from_numpy(data["uv"]).float(),
    )


def deformed_sphere(subdivisions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An icosphere (radius ~8) with a random smooth deformation plus per-vertex noise."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=8.0)
    verts = torch.tensor(sphere.vertices, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    frequencies = torch.randn(3, 3, generator=generator) * 0.3
    bumps = torch.sin(verts @ frequencies).sum(-1, keepdim=True)
    verts = verts * (1 + 0.15 * bumps) + 0.05 * torch.randn(verts.shape, generator=generator)
    return verts, torch.tensor(sphere.faces, dtype=torch.long)


def assert_fragments_agree(fast, reference, min_agreement: float = 0.995) -> None:
    covered = (fast.pix_to_face >= 0) | (reference.pix_to_face >= 0)
    agree = (fast.pix_to_face == reference.pix_to_face) & covered
    assert covered.sum() > 0
    agreement = agree.sum().item() / covered.sum().item()
    assert agreement >= min_agreement, f"pix_to_face agrees on only {agreement:.4%} of covered pixels"
    same = agree & (fast.pix_to_face >= 0)
    bary_error = (fast.bary_coords - reference.bary_coords)[same].abs().amax(-1)
    # pytorch3d works in float32 NDC: a few sliver faces round worse than 1e-4; nearly all agree.
    assert (bary_error <= 1e-4).float().mean() >= 0.999, f"bary error quantiles {bary_error.quantile(0.999)}"
    assert bary_error.max() < 2e-3
    depth_error = (fast.zbuf - reference.zbuf)[same].abs() / reference.zbuf[same]
    assert depth_error.max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Hand-checkable behaviour of the fast rasterizer
# ---------------------------------------------------------------------------------------------


def test_single_triangle_coverage_barycentrics_and_depth() -> None:
    # Right triangle with legs 4.2 px: pixel centre (c + .5, r + .5) is inside iff c + r + 1 < 4.2.
    verts = torch.tensor([[[0.0, 0.0, 2.0], [4.2, 0.0, 3.0], [0.0, 4.2, 4.0]]])
    faces = torch.tensor([[0, 1, 2]])
    fragments = rasterize_fast(verts, faces, (5, 6))
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    expected_inside = (rows + cols + 1) < 4.2
    assert torch.equal(fragments.pix_to_face[0] >= 0, expected_inside)
    assert fragments.pix_to_face[0][expected_inside].eq(0).all()
    # Pixel (row 0, col 1): centre (1.5, 0.5) -> w1 = 1.5 / 4.2, w2 = 0.5 / 4.2.
    w1, w2 = 1.5 / 4.2, 0.5 / 4.2
    expected = torch.tensor([1 - w1 - w2, w1, w2])
    torch.testing.assert_close(fragments.bary_coords[0, 0, 1], expected)
    torch.testing.assert_close(fragments.zbuf[0, 0, 1], torch.tensor(2.0 * (1 - w1 - w2) + 3.0 * w1 + 4.0 * w2))
    assert fragments.zbuf[0, 4, 4] == -1 and (fragments.bary_coords[0, 4, 4] == -1).all()


def test_nearest_face_wins_and_faces_behind_camera_are_ignored() -> None:
    square = [[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]]
    near = [[x, y, 1.0] for x, y in square]
    far = [[x, y, 5.0] for x, y in square]
    behind = [[x, y, -1.0] for x, y in square]
    verts = torch.tensor([far + near + behind])
    quad = [[0, 1, 2], [1, 3, 2]]
    faces = torch.tensor([[a + offset for a in tri] for offset in (0, 4, 8) for tri in quad])
    fragments = rasterize_fast(verts, faces, 8)
    assert set(fragments.pix_to_face.unique().tolist()) == {2, 3}  # the near quad only
    torch.testing.assert_close(fragments.zbuf, torch.ones(1, 8, 8))
    only_behind = rasterize_fast(verts, faces[4:], 8)
    assert (only_behind.pix_to_face == -1).all()


def test_interpolating_screen_x_gives_pixel_centres() -> None:
    generator = torch.Generator().manual_seed(0)
    verts = torch.rand(2, 30, 3, generator=generator) * torch.tensor([16.0, 16.0, 1.0]) + torch.tensor([0, 0, 1.0])
    faces = torch.randint(0, 30, (40, 3), generator=generator)
    fragments = rasterize_fast(verts, faces, 16)
    values = interpolate(fragments, faces, verts[..., :2])
    covered = fragments.mask
    cols = torch.arange(16).view(1, 1, 16).expand(2, 16, 16) + 0.5
    rows = torch.arange(16).view(1, 16, 1).expand(2, 16, 16) + 0.5
    assert covered.sum() > 50
    torch.testing.assert_close(values[..., 0][covered], cols[covered], atol=1e-4, rtol=0)
    torch.testing.assert_close(values[..., 1][covered], rows[covered], atol=1e-4, rtol=0)
    assert (values[~covered] == 0).all()


def test_shared_edges_leave_no_holes() -> None:
    # A regular 4x4-cell grid covering the whole 8x8 image: every pixel centre lies on the grid's
    # diagonals or inside a cell, and none may be dropped.
    n = 4
    coords = torch.linspace(0, 8, n + 1)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    verts = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(xs.numel())], -1)[None]
    faces = []
    for row in range(n):
        for col in range(n):
            a = row * (n + 1) + col
            faces += [[a, a + 1, a + n + 2], [a, a + n + 2, a + n + 1]]
    fragments = rasterize_fast(verts, torch.tensor(faces), 8)
    assert (fragments.pix_to_face >= 0).all()


def test_chunking_gives_identical_fragments() -> None:
    verts, faces = deformed_sphere(2, seed=3)
    screen = project(verts, 64, distance=40.0, y_shift=0.0)[None]
    whole = rasterize_fast(screen, faces, 64)
    chunked = rasterize_fast(screen, faces, 64, max_candidates=5000)
    assert torch.equal(whole.pix_to_face, chunked.pix_to_face)
    torch.testing.assert_close(whole.bary_coords, chunked.bary_coords)


def test_gradcheck_interpolation_wrt_vertices_and_attributes() -> None:
    verts = torch.tensor(
        [[[0.3, 0.2, 1.0], [5.7, 0.9, 1.5], [1.1, 5.6, 2.0], [6.1, 6.3, 1.2]]], dtype=torch.float64
    )
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    attrs = torch.tensor([[[0.1, 1.0], [0.7, -0.3], [0.4, 0.2], [0.9, 0.5]]], dtype=torch.float64)
    reference = rasterize_fast(verts, faces, 6)
    assert reference.mask.sum() >= 20

    def render(screen: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fragments = rasterize_fast(screen, faces, 6)
        assert torch.equal(fragments.pix_to_face, reference.pix_to_face)  # no coverage change
        return interpolate(fragments, faces, values), fragments.zbuf

    assert torch.autograd.gradcheck(render, (verts.requires_grad_(), attrs.requires_grad_()), eps=1e-6, atol=1e-7)
    perspective = lambda screen: rasterize_fast(screen, faces, 6, perspective_correct=True).bary_coords  # noqa: E731
    assert torch.autograd.gradcheck(perspective, (verts,), eps=1e-6, atol=1e-7)


def test_perspective_correct_barycentrics_interpolate_inverse_depth_linearly() -> None:
    verts = torch.tensor([[[0.0, 0.0, 1.0], [9.0, 0.0, 4.0], [0.0, 9.0, 2.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    fragments = rasterize_fast(verts, faces, 8, perspective_correct=True)
    screen_fragments = rasterize_fast(verts, faces, 8)
    covered = fragments.mask
    # 1 / depth is affine in screen space for a planar triangle.
    inverse_depth = interpolate(screen_fragments, faces, 1.0 / verts[..., 2:])[..., 0]
    torch.testing.assert_close(fragments.zbuf[covered], 1.0 / inverse_depth[covered])


# ---------------------------------------------------------------------------------------------
# Parity with pytorch3d
# ---------------------------------------------------------------------------------------------


@needs_ict
@needs_pytorch3d
def test_parity_with_pytorch3d_on_ict_face_224(ict_mesh) -> None:
    verts, faces, _, _ = ict_mesh
    screen = project(verts, 224)[None]
    fast = rasterize_fast(screen, faces, 224)
    reference = rasterize_pytorch3d(screen, faces, 224)
    assert fast.mask.sum() > 15000  # the face fills most of the crop
    assert_fragments_agree(fast, reference)


@needs_pytorch3d
def test_parity_with_pytorch3d_on_random_deformed_mesh_224() -> None:
    verts, faces = deformed_sphere(3, seed=1)
    angle = 0.6
    rotation = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
    )
    screen = project(verts @ rotation, 224, distance=60.0, y_shift=0.0)[None]
    fast = rasterize_fast(screen, faces, 224)
    reference = rasterize_pytorch3d(screen, faces, 224)
    assert_fragments_agree(fast, reference)
    culled_fast = rasterize_fast(screen, faces, 224, cull_backfaces=True)
    culled_reference = rasterize_pytorch3d(screen, faces, 224, cull_backfaces=True)
    assert_fragments_agree(culled_fast, culled_reference)


@needs_pytorch3d
def test_parity_non_square_perspective_correct_and_gradients() -> None:
    verts, faces = deformed_sphere(2, seed=2)
    screen = project(verts, 64, distance=35.0, y_shift=0.0)[None]
    screen = screen * torch.tensor([1.3, 0.8, 1.0]) + torch.tensor([4.0, -2.0, 0.0])
    for perspective_correct in (False, True):
        fast = rasterize_fast(screen, faces, (48, 96), perspective_correct=perspective_correct)
        reference = rasterize_pytorch3d(screen, faces, (48, 96), perspective_correct=perspective_correct)
        assert_fragments_agree(fast, reference)

    colours = torch.rand(1, verts.shape[0], 3, generator=torch.Generator().manual_seed(0))
    target = torch.rand(1, 48, 96, 3, generator=torch.Generator().manual_seed(1))
    gradients = []
    for rasterizer in (rasterize_fast, rasterize_pytorch3d):
        screen_var = screen.clone().requires_grad_(True)
        fragments = rasterizer(screen_var, faces, (48, 96))
        image = interpolate(fragments, faces, colours)
        ((image - target) ** 2).sum().backward()
        gradients.append(screen_var.grad[..., :2])
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[0], gradients[1], atol=2e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# UV sampling and textured / vertex-colour renders built from the functions
# ---------------------------------------------------------------------------------------------


def test_sample_uv_map_origin_is_bottom_left() -> None:
    size = 4
    uv_map = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    # Texel (row r, col c) is centred at u = (c + .5) / S, v = 1 - (r + .5) / S.
    pixel_uv = torch.tensor([[[[0.125, 0.875], [0.875, 0.125], [0.375, 0.125]]]])
    sampled = sample_uv_map(uv_map, pixel_uv, mode="nearest")
    assert sampled.flatten().tolist() == [0.0, 15.0, 13.0]


def test_rasterized_square_gives_texture_normals_depth_and_uv() -> None:
    # A square facing the camera, UVs = its corners, normals towards the camera.
    verts = torch.tensor([[[2.0, 2.0, 3.0], [14.0, 2.0, 3.0], [2.0, 14.0, 3.0], [14.0, 14.0, 3.0]]])
    faces = torch.tensor([[0, 2, 1], [1, 2, 3]])  # counter-clockwise on screen
    uv = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # top of the image = v 1
    texture = torch.zeros(1, 3, 8, 8)
    texture[:, 0, :4] = 1.0  # red in the top half (v > 0.5)
    normals = torch.tensor([[0.0, 0.0, -1.0]]).expand(4, 3)
    fragments = rasterize(verts, faces, 16, backend="fast", cull_backfaces=True)
    mask = fragments.mask[:, None].float()
    depth = torch.where(fragments.mask, fragments.zbuf, torch.zeros_like(fragments.zbuf))[:, None]
    pixel_uv = interpolate_uv(fragments, faces, uv)
    image = sample_uv_map(texture, pixel_uv, mask=mask)
    pixel_normals = torch.nn.functional.normalize(interpolate(fragments, faces, normals), dim=-1, eps=1e-12).permute(0, 3, 1, 2)
    assert image.shape == (1, 3, 16, 16) and mask.shape == (1, 1, 16, 16)
    assert mask[0, 0, 2:14, 2:14].eq(1).all() and mask.sum() == 144
    torch.testing.assert_close(depth[0, 0, 2:14, 2:14], torch.full((12, 12), 3.0))
    assert depth[0, 0, 0, 0] == 0
    assert image[0, 0, 3:7, 2:14].gt(0.99).all() and image[0, 0, 9:14, 2:14].lt(0.01).all()
    assert image[:, :, 0].eq(0).all()  # background
    torch.testing.assert_close(pixel_normals[0, :, 8, 8], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(pixel_uv[0, 2, 2], torch.tensor([0.5 / 12, 1 - 0.5 / 12]))
    # Same faces wound clockwise on screen are culled.
    assert rasterize(verts, faces[:, [0, 2, 1]], 16, backend="fast", cull_backfaces=True).mask.sum() == 0


def test_vertex_colours_and_texture_give_the_same_image_for_linear_colours() -> None:
    verts = torch.tensor([[[1.0, 1.0, 2.0], [31.0, 1.0, 2.0], [1.0, 31.0, 2.0], [31.0, 31.0, 2.0]]])
    faces = torch.tensor([[0, 2, 1], [1, 2, 3]])
    uv = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    colours = torch.stack([uv[:, 0], uv[:, 1], 1 - uv[:, 0]], -1)[None]
    size = 64
    centres = (torch.arange(size) + 0.5) / size
    v_grid, u_grid = 1 - centres[:, None].expand(size, size), centres[None, :].expand(size, size)
    texture = torch.stack([u_grid, v_grid, 1 - u_grid])[None]
    fragments = rasterize(verts, faces, 32)
    from_colours = interpolate(fragments, faces, colours).permute(0, 3, 1, 2)
    from_texture = sample_uv_map(texture, interpolate_uv(fragments, faces, uv), mask=fragments.mask)
    inner = fragments.mask[0].clone()
    inner[:2], inner[-3:], inner[:, :2], inner[:, -3:] = False, False, False, False  # texture border clamp
    torch.testing.assert_close(from_colours[0][:, inner], from_texture[0][:, inner], atol=1e-5, rtol=0)


def test_interpolate_broadcasts_one_rasterization_over_a_batch_of_attributes() -> None:
    verts = torch.tensor([[[0.0, 0.0, 1.0], [8.0, 0.0, 1.0], [0.0, 8.0, 1.0]]])
    faces = torch.tensor([[0, 1, 2]])
    fragments = rasterize_fast(verts, faces, 8)
    attrs = torch.randn(3, 3, 2)
    batched = interpolate(fragments, faces, attrs)
    assert batched.shape == (3, 8, 8, 2)
    for index in range(3):
        torch.testing.assert_close(batched[index], interpolate(fragments, faces, attrs[index])[0])
    uv = interpolate_uv(fragments, faces, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert uv.shape == (1, 8, 8, 2)


def test_interpolate_packed_is_interpolate_at_the_covered_pixels() -> None:
    verts = torch.tensor([[[0.0, 0.0, 1.0], [8.0, 0.0, 1.0], [0.0, 8.0, 1.0]]]).repeat(2, 1, 1)
    verts[1, :, :2] += 1.0
    faces = torch.tensor([[0, 1, 2]])
    fragments = rasterize_fast(verts, faces, 8)
    attrs = torch.randn(2, 3, 4)
    dense = interpolate(fragments, faces, attrs).reshape(-1, 4)
    torch.testing.assert_close(interpolate_packed(fragments, faces, attrs), dense[fragments.pixel_index])
    assert pixel_batch_index(fragments).tolist() == (fragments.pixel_index // 64).tolist()


def test_backend_selection_and_bad_inputs() -> None:
    assert resolve_backend("auto", "cpu") == "fast"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("opengl", "cpu")
    verts = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="screen_verts must have shape"):
        rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), 8)
    with pytest.raises(ValueError, match="3 vertices"):
        rasterize(verts, torch.tensor([[0, 1, 3]]), 8)
    with pytest.raises(TypeError, match="integer"):
        rasterize(verts, torch.tensor([[0.0, 1.0, 2.0]]), 8)
    with pytest.raises(ValueError, match="image_size"):
        rasterize(verts, torch.tensor([[0, 1, 2]]), (8, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_fast_backend_on_cuda_matches_cpu() -> None:
    verts, faces = deformed_sphere(3, seed=4)
    screen = project(verts, 128, distance=50.0, y_shift=0.0)[None]
    cpu = rasterize_fast(screen, faces, 128)
    cuda = rasterize_fast(screen.cuda(), faces.cuda(), 128)
    assert (cpu.pix_to_face == cuda.pix_to_face.cpu()).float().mean() > 0.999
