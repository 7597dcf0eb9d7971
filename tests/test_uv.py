"""Tests of UV baking (expression maps) and texture unwrapping."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from facedetail.geometry.uv import (
    bake_to_uv,
    expression_map,
    expression_offsets,
    fill_invalid_texels,
    unwrap_texture,
)
from facedetail.render import interpolate_uv, rasterize, rasterize_fast, sample_uv_map
from tests.conftest import ICT_PATH, needs_ict




def render_texture(screen: torch.Tensor, faces: torch.Tensor, tri_uv_idx: torch.Tensor, uv: torch.Tensor,
                   texture: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, size, size) render of a UV texture on meshes (background 0), from the render functions."""
    fragments = rasterize(screen, faces, size)
    return sample_uv_map(texture, interpolate_uv(fragments, tri_uv_idx, uv), mask=fragments.mask)

def grid_mesh(cells: int, jitter: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a (cells+1)^2 grid over [0, 1]^2 (interior points jittered) and its triangles,
    counter-clockwise in (u, v) with v up."""
    coords = torch.linspace(0, 1, cells + 1, dtype=torch.float64)
    v_grid, u_grid = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([u_grid.reshape(-1), v_grid.reshape(-1)], -1)
    interior = (points > 0).all(-1) & (points < 1).all(-1)
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand(points.shape, generator=generator, dtype=torch.float64) - 0.5) * (jitter / cells)
    points = torch.where(interior[:, None], points + noise, points)
    faces = []
    for row in range(cells):
        for col in range(cells):
            a = row * (cells + 1) + col
            faces += [[a, a + 1, a + cells + 2], [a, a + cells + 2, a + cells + 1]]
    return points.float(), torch.tensor(faces)


def texel_centres(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) of every texel centre of an S x S map (v = 0 on the last row)."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return centres[None, :].expand(size, size), 1 - centres[:, None].expand(size, size)


def smooth_texture(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A smooth RGB pattern in [0, 1] as a function of UV, channel-first."""
    return torch.stack(
        [0.5 + 0.3 * torch.sin(2 * np.pi * u), 0.5 + 0.3 * torch.cos(2 * np.pi * v), 0.2 + 0.6 * u * v]
    )


def test_bake_linear_field_on_jittered_grid_is_exact() -> None:
    uv, faces = grid_mesh(6, jitter=0.6)
    # Rows: a, b, c per channel; value_channel = a u + b v + c.
    coefficients = torch.tensor([[1.0, -2.0, 0.5], [0.5, 3.0, -1.0], [0.2, 0.1, 0.3]])
    values = uv @ coefficients[:2] + coefficients[2]  # (V, 3) linear in uv
    size = 32
    uv_map, valid = bake_to_uv(values[None], faces, faces, uv, size=size)
    assert uv_map.shape == (1, 3, size, size) and valid.shape == (size, size)
    assert valid.all()  # the grid covers the whole UV square
    u, v = texel_centres(size)
    expected = torch.stack([coefficients[0, c] * u + coefficients[1, c] * v + coefficients[2, c] for c in range(3)])
    torch.testing.assert_close(uv_map[0], expected, atol=1e-5, rtol=0)
    # Hand check: texel (row 0, col 0) is (u, v) = (1/64, 63/64).
    hand = [1 / 64 + 0.5 * 63 / 64 + 0.2, -2 / 64 + 3 * 63 / 64 + 0.1, 0.5 / 64 - 63 / 64 + 0.3]
    torch.testing.assert_close(uv_map[0, :, 0, 0], torch.tensor(hand), atol=1e-5, rtol=0)


def test_bake_marks_texels_outside_the_layout_invalid_and_keeps_orientation() -> None:
    uv, faces = grid_mesh(4)
    uv_left_half = uv * torch.tensor([0.5, 1.0])  # layout covers u < 0.5 only
    values = uv_left_half[:, 1:2]  # value = v
    uv_map, valid = bake_to_uv(values, faces, faces, uv_left_half, size=16)
    assert valid[:, :8].all() and not valid[:, 8:].any()
    assert (uv_map[0, 0][~valid] == 0).all()
    assert uv_map[0, 0, 0, 0] > 0.9 and uv_map[0, 0, 15, 0] < 0.1  # v = 1 is the top row


def test_bake_rejects_mismatched_inputs() -> None:
    uv, faces = grid_mesh(2)
    with pytest.raises(ValueError, match="tri_uv_idx must have the same shape"):
        bake_to_uv(torch.zeros(1, 9, 3), faces, faces[:-1], uv)
    with pytest.raises(ValueError, match="vertex_values has 4 vertices"):
        bake_to_uv(torch.zeros(1, 4, 3), faces, faces, uv)


@needs_ict
def test_ict_expression_map_round_trips_vertex_offsets_and_is_zero_for_neutral() -> None:
    data = np.load(ICT_PATH)
    faces = torch.from_numpy(data["tris"]).long()
    tri_uv_idx = torch.from_numpy(data["tri_uv_idx"]).long()
    uv = torch.from_numpy(data["uv"]).float()
    basis = torch.from_numpy(data["exp_basis"].astype(np.float32))
    names = list(data["exp_names"])
    coeffs = torch.zeros(2, basis.shape[0])
    coeffs[1, names.index("jawOpen")] = 1.0
    offsets = expression_offsets(basis, coeffs)
    maps, valid = expression_map(offsets, faces, tri_uv_idx, uv, size=256)
    assert maps.shape == (2, 3, 256, 256) and valid.float().mean() > 0.3
    assert maps[0].abs().max() == 0  # neutral expression: no displacement
    assert maps[1].abs().amax() > 0.5  # jawOpen moves the chin by centimetres
    # Sample the map at each vertex's UV: recovers that vertex's offset (bilinear error only).
    corner_uv = uv[tri_uv_idx.reshape(-1)]
    corner_offset = offsets[1][faces.reshape(-1)]
    sampled = sample_uv_map(fill_invalid_texels(maps[1:], valid, 2), corner_uv.view(1, 1, -1, 2))[0, :, 0].T
    error = (sampled - corner_offset).norm(dim=-1)
    assert error.median() < 0.01 * corner_offset.norm(dim=-1).max()
    assert (error < 0.05 * corner_offset.norm(dim=-1).max()).float().mean() > 0.98


def textured_plane(
    cells: int, x_range: tuple[float, float], y_range: tuple[float, float], depth: float, uv_box: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Screen-space vertices of a plane facing the camera, its faces and UVs inside ``uv_box``
    (u0, v0, u1, v1); faces are counter-clockwise on screen (front-facing)."""
    unit, faces = grid_mesh(cells)
    u0, v0, u1, v1 = uv_box
    uv = torch.stack([u0 + unit[:, 0] * (u1 - u0), v0 + unit[:, 1] * (v1 - v0)], -1)
    x = x_range[0] + unit[:, 0] * (x_range[1] - x_range[0])
    y = y_range[1] - unit[:, 1] * (y_range[1] - y_range[0])  # v up = screen y down
    screen = torch.stack([x, y, torch.full_like(x, depth)], -1)
    return screen, faces, uv


def test_unwrap_recovers_texture_of_a_rendered_plane() -> None:
    screen, faces, uv = textured_plane(8, (10.0, 118.0), (10.0, 118.0), 5.0, (0.0, 0.0, 1.0, 1.0))
    texture_size = 128
    texture = smooth_texture(*texel_centres(texture_size))[None]
    image = render_texture(screen[None], faces, faces, uv, texture, 128)
    unwrapped, visible = unwrap_texture(image, screen[None], faces, faces, uv, size=64)
    assert unwrapped.shape == (1, 3, 64, 64) and visible.shape == (1, 1, 64, 64)
    assert visible.mean() > 0.95
    expected = smooth_texture(*texel_centres(64))
    error = (unwrapped[0] - expected).abs()[:, visible[0, 0] > 0]
    assert error.max() < 0.03 and error.mean() < 0.005


def test_unwrap_marks_occluded_and_back_facing_texels_invalid() -> None:
    # Back plane: whole image, UV left half. Front plane: centre square, nearer, UV right half.
    back, back_faces, back_uv = textured_plane(6, (0.0, 64.0), (0.0, 64.0), 10.0, (0.0, 0.0, 0.5, 1.0))
    front, front_faces, front_uv = textured_plane(3, (20.0, 44.0), (20.0, 44.0), 4.0, (0.5, 0.0, 1.0, 1.0))
    screen = torch.cat([back, front])[None]
    faces = torch.cat([back_faces, front_faces + back.shape[0]])
    uv = torch.cat([back_uv, front_uv])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    size = 64
    texture, visible = unwrap_texture(image, screen, faces, faces, uv, size=size)
    u, v = texel_centres(size)
    # Where each back-plane texel lands on screen: x = 128 u, y = 64 (1 - v).
    x, y = 128 * u, 64 * (1 - v)
    on_back = u < 0.5
    hidden = on_back & (x > 20) & (x < 44) & (y > 20) & (y < 44)
    margin = on_back & (x > 18) & (x < 46) & (y > 18) & (y < 46) & ~((x > 22) & (x < 42) & (y > 22) & (y < 42))
    # Bilinear sampling needs the 2x2 pixels around the point: the outermost half pixel is lost.
    margin |= on_back & ((x < 1) | (x > 63) | (y < 1) | (y > 63))
    seen = visible[0, 0] > 0
    assert not seen[hidden & ~margin].any()  # occluded by the front plane
    assert seen[on_back & ~hidden & ~margin].all()
    # The front plane is visible except where its 2x2 bilinear footprint leaves it (half a pixel).
    front_x, front_y = 20 + 24 * (u - 0.5) / 0.5, 20 + 24 * (1 - v)
    front_inner = (u > 0.5) & (front_x > 20.5) & (front_x < 43.5) & (front_y > 20.5) & (front_y < 43.5)
    assert seen[front_inner].all() and not seen[(u > 0.5) & ~front_inner].any()
    assert (texture[0][:, ~seen] == 0).all()
    # The visible back-plane texels sample the image at their own pixel.
    row, col = 30, 5  # u ~ 0.09, v ~ 0.52: x ~ 11, y ~ 30.5
    assert seen[row, col]
    xs, ys = 128 * (col + 0.5) / size, 64 * (row + 0.5) / size
    neighbourhood = image[0, :, int(ys) - 1 : int(ys) + 2, int(xs) - 1 : int(xs) + 2]
    assert (texture[0, :, row, col] >= neighbourhood.amin((1, 2)) - 1e-6).all()
    assert (texture[0, :, row, col] <= neighbourhood.amax((1, 2)) + 1e-6).all()
    # Wound the other way, every face is back-facing: nothing is visible.
    _, visible_flipped = unwrap_texture(image, screen, faces[:, [0, 2, 1]], faces[:, [0, 2, 1]], uv, size=size)
    assert visible_flipped.sum() == 0
    _, visible_any = unwrap_texture(
        image, screen, faces[:, [0, 2, 1]], faces[:, [0, 2, 1]], uv, size=size, require_front_facing=False
    )
    # Same visibility without the facing test (up to texels exactly on a pixel boundary).
    assert (visible_any != visible).float().mean() < 0.005


@needs_ict
def test_unwrap_recovers_texture_of_rendered_ict_face() -> None:
    data = np.load(ICT_PATH)
    verts = torch.from_numpy(data["neutral"]).float()
    faces = torch.from_numpy(data["tris"]).long()
    tri_uv_idx = torch.from_numpy(data["tri_uv_idx"]).long()
    uv = torch.from_numpy(data["uv"]).float()
    yaw = 0.5  # turned: part of the far cheek is hidden behind the nose / turned away
    rotation = torch.tensor([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]]).float()
    world = verts @ rotation
    depth = 130.0 - world[:, 2]
    screen = torch.stack([1015 * world[:, 0] / depth + 112, 112 - 1015 * (world[:, 1] - 0.4) / depth, depth], -1)[None]
    texture = smooth_texture(*texel_centres(256))[None]
    image = render_texture(screen, faces, tri_uv_idx, uv, texture, 224)
    unwrapped, visible = unwrap_texture(image, screen, faces, tri_uv_idx, uv, size=128)
    seen = visible[0, 0] > 0
    uv_screen = torch.stack([uv[:, 0] * 128, (1 - uv[:, 1]) * 128, torch.zeros(len(uv))], -1)[None]
    valid = rasterize_fast(uv_screen, tri_uv_idx, 128).mask[0]
    assert 0.3 < seen.sum() / valid.sum() < 0.95  # turned head: a good part is hidden
    assert not seen[~valid].any()
    error = (unwrapped[0] - smooth_texture(*texel_centres(128))).abs().amax(0)[seen]
    # No background or occluder colour bleeds in: every visible texel is close to the texture.
    assert error.median() < 0.005 and error.max() < 0.06 and (error < 0.03).float().mean() > 0.99


def test_interpolated_uv_matches_baked_screen_position() -> None:
    # Baking the screen position into UV, then looking up each covered pixel's UV in that map,
    # returns the pixel centre: UV and screen rasterizations are consistent.
    screen, faces, uv = textured_plane(4, (4.0, 60.0), (4.0, 60.0), 3.0, (0.1, 0.1, 0.9, 0.9))
    fragments = rasterize_fast(screen[None], faces, 64)
    pixel_uv = interpolate_uv(fragments, faces, uv)
    positions, valid = bake_to_uv(screen[None, :, :2], faces, faces, uv, size=256)
    looked_up = sample_uv_map(positions, pixel_uv)
    covered = fragments.mask[0]
    interior = covered.clone()
    interior[:6], interior[-6:], interior[:, :6], interior[:, -6:] = False, False, False, False
    centres = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="xy")) + 0.5
    torch.testing.assert_close(looked_up[0][:, interior], centres[:, interior], atol=1e-3, rtol=0)
