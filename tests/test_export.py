"""Tests of the user-facing exports: OBJ + MTL + texture, dense UV-grid meshes, 16-bit displacement
PNGs, normal-map PNGs, strips and GIFs. OBJ files are checked by loading them with trimesh."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from facedetail.io.export import (
    ExportError,
    displacement_sidecar_path,
    read_displacement_png16,
    read_normal_map_png,
    units_from_mm_per_unit,
    uv_grid_mesh,
    write_detail_obj,
    write_displacement_png16,
    write_gif,
    write_normal_map_png,
    write_obj_with_uv,
    write_strip_png,
)
from tests.conftest import ICT_PATH, needs_ict



def load_obj(path: Path, maintain_order: bool = True) -> trimesh.Trimesh:
    mesh = trimesh.load(path, process=False, maintain_order=maintain_order)
    assert isinstance(mesh, trimesh.Trimesh), f"{path} did not load as one mesh: {type(mesh)}"
    return mesh


def texel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of every texel centre of an S x S map (row 0 = v 1)."""
    centres = (np.arange(size) + 0.5) / size
    return np.broadcast_to(centres[None, :], (size, size)), np.broadcast_to(1.0 - centres[:, None], (size, size))


def count_grid_triangles(valid: np.ndarray, border_triangles: bool = True) -> int:
    """Reference count by a plain loop: 2 per 2x2 block of valid texels, 1 per block with 3."""
    total = 0
    for r in range(valid.shape[0] - 1):
        for c in range(valid.shape[1] - 1):
            n_valid = int(valid[r : r + 2, c : c + 2].sum())
            total += 2 if n_valid == 4 else (1 if n_valid == 3 and border_triangles else 0)
    return total


def two_hemisphere_maps(size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A unit sphere as two UV charts: left half = upper (z > 0) hemisphere, right half = lower
    hemisphere, each a disk parameterised as a height field over (x, y) with x growing with u.

    The lower chart's UV winding (counter-clockwise in UV) gives inward normals, i.e. it is a
    mirrored chart that orientation must flip. Returns position (3,S,S), valid (S,S), normal (3,S,S).
    """
    u, v = texel_grid(size)
    positions = np.zeros((3, size, size))
    valid = np.zeros((size, size), dtype=bool)
    for chart, (u_centre, z_sign) in enumerate(((0.25, 1.0), (0.75, -1.0))):
        x = (u - u_centre) / 0.24
        y = (v - 0.5) / 0.48
        inside = (x**2 + y**2 < 0.97) & ((u < 0.5) if chart == 0 else (u > 0.5))
        z = z_sign * np.sqrt(np.clip(1.0 - x**2 - y**2, 0.0, None))
        positions[:, inside] = np.stack([x, y, z])[:, inside]
        valid |= inside
    return positions, valid, positions.copy()  # unit sphere: normal = position


# ---------------------------------------------------------------------------------------------- OBJ


def test_obj_lines_of_a_quad_with_a_uv_seam(tmp_path: Path) -> None:
    vertices = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]])
    face_uv_idx = np.array([[0, 1, 2], [4, 2, 3]])  # vertex 0 has two UVs (a seam)
    normals = np.tile([0.0, 0.0, 2.0], (4, 1))
    written = write_obj_with_uv(tmp_path / "quad.obj", torch.from_numpy(vertices), faces, uv, face_uv_idx, normals=normals)
    assert set(written) == {"obj"}  # no texture: no MTL, no PNG
    text = written["obj"].read_text()
    assert "# units: cm" in text and "y up" in text
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == "v 0.000000 0.000000 0.000000"
    assert lines[4:9] == ["vt 0.000000 0.000000", "vt 1.000000 0.000000", "vt 1.000000 1.000000", "vt 0.000000 1.000000", "vt 0.500000 0.500000"]
    assert lines[9] == "vn 0.000000 0.000000 1.000000"  # normalised
    assert lines[-2:] == ["f 1/1/1 2/2/2 3/3/3", "f 1/5/1 3/3/3 4/4/4"]
    assert "mtllib" not in text

    mesh = load_obj(written["obj"])
    assert mesh.vertices.shape == (4, 3) and mesh.faces.shape == (2, 3)
    assert np.allclose(mesh.face_normals, [0, 0, 1])  # CCW seen from +z -> normal +z
    # Without maintain_order trimesh splits vertex 0 at the seam: one vertex per (v, vt) pair.
    split = load_obj(written["obj"], maintain_order=False)
    assert split.vertices.shape == (5, 3) and split.visual.uv.shape == (5, 2)
    corner_uv = split.visual.uv[split.faces]
    assert np.allclose(corner_uv, uv[face_uv_idx])


def test_obj_rejects_bad_input(tmp_path: Path) -> None:
    vertices = np.zeros((3, 3))
    uv = np.zeros((3, 2))
    with pytest.raises(ExportError, match="faces must index 0..2"):
        write_obj_with_uv(tmp_path / "a.obj", vertices, [[0, 1, 3]], uv, [[0, 1, 2]])
    with pytest.raises(ExportError, match="NaN"):
        write_obj_with_uv(tmp_path / "a.obj", np.full((3, 3), np.nan), [[0, 1, 2]], uv, [[0, 1, 2]])
    with pytest.raises(ExportError, match=r"\.obj"):
        write_obj_with_uv(tmp_path / "a.ply", vertices, [[0, 1, 2]], uv, [[0, 1, 2]])
    with pytest.raises(ExportError, match="face_uv_idx"):
        write_obj_with_uv(tmp_path / "a.obj", vertices, [[0, 1, 2]], uv, [[0, 1, 2], [0, 1, 2]])


@needs_ict
def test_ict_obj_with_texture_loads_in_trimesh_with_uvs(tmp_path: Path) -> None:
    from facedetail.geometry.face_model import load_face_model

    model = load_face_model("ict", ICT_PATH)
    texture = np.zeros((32, 64, 3), dtype=np.uint8)
    texture[:16] = (200, 30, 10)  # top half (v > 0.5) red
    written = write_obj_with_uv(
        tmp_path / "out" / "coarse.obj",
        model.mean_shape,
        model.triangles,
        model.uv,
        model.tri_uv_idx,
        texture_png=texture,
        units=units_from_mm_per_unit(model.mm_per_unit),
    )
    assert written["mtl"].read_text().splitlines()[-1] == "map_Kd coarse_texture.png"
    assert "# units: cm" in written["obj"].read_text()[:300]
    n_vertices, n_faces = model.mean_shape.shape[0], model.triangles.shape[0]

    mesh = load_obj(written["obj"])  # maintain_order: one vertex per OBJ v (one UV kept per vertex)
    assert mesh.vertices.shape == (n_vertices, 3) and mesh.faces.shape == (n_faces, 3)
    assert mesh.visual.uv.shape == (n_vertices, 2)
    assert np.allclose(mesh.vertices, model.mean_shape.numpy(), atol=1e-5)
    image = np.asarray(mesh.visual.material.image.convert("RGB"))
    assert image.shape == (32, 64, 3) and tuple(image[0, 0]) == (200, 30, 10) and tuple(image[-1, -1]) == (0, 0, 0)

    split = load_obj(written["obj"], maintain_order=False)  # trimesh splits at the UV seams
    pairs = np.unique(np.stack([model.triangles.numpy().ravel(), model.tri_uv_idx.numpy().ravel()], 1), axis=0)
    assert split.vertices.shape == (len(pairs), 3) and split.faces.shape == (n_faces, 3)
    assert np.allclose(split.visual.uv[split.faces], model.uv.numpy()[model.tri_uv_idx.numpy()], atol=1e-6)
    assert np.allclose(split.vertices[split.faces], model.mean_shape.numpy()[model.triangles.numpy()], atol=1e-5)


# ----------------------------------------------------------------------------------- UV-grid mesh


def test_flat_position_map_grid_counts_uvs_and_normals() -> None:
    size = 8
    u, v = texel_grid(size)
    positions = np.stack([u * 4.0, v * 4.0, np.zeros_like(u)])
    valid = np.ones((size, size), dtype=bool)
    vertices, faces, uv = uv_grid_mesh(positions, valid)
    assert vertices.shape == (size * size, 3) and faces.shape == (2 * (size - 1) ** 2, 3) and uv.shape == (size * size, 2)
    # Vertex 9 is texel (row 1, col 1): uv = (1.5/8, 1 - 1.5/8).
    assert np.allclose(uv[9], [1.5 / 8, 1 - 1.5 / 8]) and np.allclose(vertices[9], [0.75, 3.25, 0.0])
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    assert np.allclose(normals / np.linalg.norm(normals, axis=1, keepdims=True), [0, 0, 1])  # UV-CCW = +z here
    # Each triangle's area is half a texel cell (0.5 x 0.5 cm here).
    assert np.allclose(np.linalg.norm(normals, axis=1) / 2, 0.125)

    down = np.broadcast_to(np.array([0.0, 0.0, -1.0])[:, None, None], positions.shape)
    vertices, flipped, _ = uv_grid_mesh(positions, valid, down)
    normals = np.cross(vertices[flipped[:, 1]] - vertices[flipped[:, 0]], vertices[flipped[:, 2]] - vertices[flipped[:, 0]])
    assert (normals[:, 2] < 0).all()

    holed = valid.copy()
    holed[0, 0] = holed[4, 4] = False  # one corner texel and one interior texel
    _, faces, _ = uv_grid_mesh(positions, holed)
    _, faces_no_border, _ = uv_grid_mesh(positions, holed, border_triangles=False)
    # 49 blocks; (0,0) kills 1 block (it has 3 valid: +1 border triangle), (4,4) touches 4 blocks (+4).
    assert len(faces) == 2 * 44 + 5 == count_grid_triangles(holed)
    assert len(faces_no_border) == 2 * 44 == count_grid_triangles(holed, border_triangles=False)


@pytest.mark.parametrize("orient", ["chart", "triangle"])
def test_sphere_grid_mesh_faces_outwards_even_on_a_mirrored_chart(orient: str) -> None:
    positions, valid, normals = two_hemisphere_maps()
    vertices, faces, uv = uv_grid_mesh(torch.from_numpy(positions), torch.from_numpy(valid), normals, orient=orient)
    assert vertices.shape == (valid.sum(), 3) and uv.shape == (valid.sum(), 2)
    assert len(faces) == count_grid_triangles(valid)
    face_normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    centres = vertices[faces].mean(axis=1)
    assert ((face_normals * centres).sum(1) > 0).all()  # outward on both hemispheres
    lower = centres[:, 2] < -0.05
    assert lower.sum() > 100 and (face_normals[lower, 2] < 0).all()
    # Without a reference the UV winding is kept: the mirrored lower chart faces inwards.
    vertices, raw, _ = uv_grid_mesh(positions, valid)
    raw_normals = np.cross(vertices[raw[:, 1]] - vertices[raw[:, 0]], vertices[raw[:, 2]] - vertices[raw[:, 0]])
    assert ((raw_normals * vertices[raw].mean(1)).sum(1) < 0).sum() > 0.4 * len(raw)


def test_outward_direction_orients_a_mirrored_height_field() -> None:
    size = 16
    u, v = texel_grid(size)
    x, y = 1.0 - 2 * u, 2 * v - 1  # x decreases with u: UV winding gives -z
    positions = np.stack([x, y, 0.2 * np.exp(-(x**2 + y**2))])
    valid = np.ones((size, size), dtype=bool)
    vertices, faces, _ = uv_grid_mesh(positions, valid, outward=(0, 0, 1))
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    assert (normals[:, 2] > 0).all()
    _, unoriented, _ = uv_grid_mesh(positions, valid)
    assert (unoriented[:, 1:] == faces[:, [2, 1]]).all()


def test_long_edge_filter_drops_stitches_between_abutting_charts() -> None:
    size = 12
    u, v = texel_grid(size)
    right = u > 0.5  # right chart sits 10 units away in x but abuts the left chart in UV
    positions = np.stack([u + 10.0 * right, v, np.zeros_like(u)])
    valid = np.ones((size, size), dtype=bool)
    _, all_faces, _ = uv_grid_mesh(positions, valid)
    _, kept, _ = uv_grid_mesh(positions, valid, max_edge_ratio=20)
    assert len(all_faces) == 2 * (size - 1) ** 2
    assert len(kept) == 2 * 2 * (size - 1) * (size // 2 - 1)  # two 6-column grids, the stitch column gone


def test_detail_obj_keeps_uvs_and_texel_positions(tmp_path: Path) -> None:
    positions, valid, normals = two_hemisphere_maps(size=40)
    texture = np.random.default_rng(0).random((3, 40, 40))  # channel-first float UV map
    written = write_detail_obj(tmp_path / "detail.obj", positions, valid, normals, texture=texture, units="dm")
    assert written["texture"].is_file() and "# units: dm" in written["obj"].read_text()[:200]
    mesh = load_obj(written["obj"])
    assert mesh.vertices.shape == (written["n_vertices"], 3) and mesh.faces.shape == (written["n_faces"], 3)
    assert written["n_faces"] == count_grid_triangles(valid)
    assert mesh.visual.uv.shape == (written["n_vertices"], 2)
    assert written["n_vertices"] <= valid.sum()  # isolated texels are dropped
    # UV of each vertex is its texel centre: decode the texel and compare the stored position.
    cols = np.round(mesh.visual.uv[:, 0] * 40 - 0.5).astype(int)
    rows = np.round((1 - mesh.visual.uv[:, 1]) * 40 - 0.5).astype(int)
    assert np.allclose(mesh.visual.uv[:, 0], (cols + 0.5) / 40, atol=1e-6)
    assert valid[rows, cols].all()
    assert np.allclose(mesh.vertices, positions[:, rows, cols].T, atol=1e-5)
    assert np.allclose(mesh.vertex_normals, normals[:, rows, cols].T, atol=1e-4)  # written as vn
    assert ((mesh.face_normals * mesh.triangles_center).sum(1) > 0).all()
    # Same file without maintain_order: v, vt, vn share indices, so trimesh splits nothing.
    assert load_obj(written["obj"], maintain_order=False).vertices.shape == (written["n_vertices"], 3)


@needs_ict
def test_ict_dense_mesh_from_baked_position_map(tmp_path: Path) -> None:
    from facedetail.geometry.face_model import load_face_model
    from facedetail.geometry.mesh import vertex_normals
    from facedetail.geometry.uv import bake_to_uv

    model = load_face_model("ict", ICT_PATH)
    shape = model.mean_shape[None]
    size = 64
    position_map, valid = bake_to_uv(shape, model.triangles, model.tri_uv_idx, model.uv, size)
    normal_map, _ = bake_to_uv(vertex_normals(shape, model.triangles), model.triangles, model.tri_uv_idx, model.uv, size)
    written = write_detail_obj(tmp_path / "ict_detail.obj", position_map, valid, normal_map)
    mesh = load_obj(written["obj"])
    assert mesh.visual.uv.shape == (written["n_vertices"], 2)
    assert written["n_faces"] == count_grid_triangles(valid.numpy()) == len(mesh.faces)
    reference = torch.nn.functional.normalize(normal_map[0], dim=0).numpy()
    cols = np.round(mesh.visual.uv[:, 0] * size - 0.5).astype(int)
    rows = np.round((1 - mesh.visual.uv[:, 1]) * size - 0.5).astype(int)
    corner_normals = reference[:, rows, cols].T[mesh.faces].sum(1)
    agree = (mesh.face_normals * corner_normals).sum(1) > 0
    assert agree.mean() > 0.99  # faces point out of the face (a few folded nostril triangles excepted)
    assert mesh.face_normals[:, 2].mean() > 0.4  # the face looks towards +z


# ----------------------------------------------------------------------------------------- maps


def test_displacement_png16_round_trip_and_sidecar(tmp_path: Path) -> None:
    size = 64
    u, v = texel_grid(size)
    displacement = 0.04 * np.sin(9 * u) * np.cos(7 * v) + 0.01  # cm, about [-0.03, 0.05]
    valid = (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.2
    info = write_displacement_png16(tmp_path / "disp.png", torch.from_numpy(displacement)[None, None], valid)
    sidecar = json.loads(displacement_sidecar_path(tmp_path / "disp.png").read_text())
    assert sidecar["encoding"] == "value = pixel / 65535 * scale + offset" and sidecar["units"] == "cm"
    assert sidecar["scale"] == pytest.approx(info["scale"]) and sidecar["offset"] == pytest.approx(displacement[valid].min())
    with Image.open(tmp_path / "disp.png") as image:
        assert image.mode.startswith("I") and image.size == (size, size)
        pixels = np.asarray(image)
    assert pixels.max() == 65535 and pixels.min() == 0  # full 16-bit range used
    assert sidecar["zero_pixel_value"] == round(-sidecar["offset"] / sidecar["scale"] * 65535)
    decoded = read_displacement_png16(tmp_path / "disp.png")
    value_range = np.ptp(displacement[valid])
    assert np.abs(decoded - displacement)[valid].max() <= 1e-4 * value_range
    assert np.abs(decoded[~valid]).max() <= sidecar["scale"] / 65535  # invalid texels: zero displacement
    blender = sidecar["blender_displace_modifier"]
    assert (pixels[0, 0] / 65535 - blender["midlevel"]) * blender["strength"] == pytest.approx(decoded[0, 0])


def test_displacement_png16_positive_map_and_errors(tmp_path: Path) -> None:
    displacement = np.linspace(1.0, 1.001, 100).reshape(10, 10)  # range 1e-3, far from 0
    write_displacement_png16(tmp_path / "tight.png", displacement, include_zero=False)
    assert np.abs(read_displacement_png16(tmp_path / "tight.png") - displacement).max() <= 1e-4 * 1e-3
    info = write_displacement_png16(tmp_path / "zero.png", displacement)
    assert info["offset"] == 0.0 and info["zero_pixel_value"] == 0
    constant = write_displacement_png16(tmp_path / "flat.png", np.zeros((4, 4)))
    assert constant["scale"] == 0.0 and np.all(read_displacement_png16(tmp_path / "flat.png") == 0.0)
    displacement_sidecar_path(tmp_path / "tight.png").unlink()
    with pytest.raises(FileNotFoundError, match="tight.png.json"):
        read_displacement_png16(tmp_path / "tight.png")
    with pytest.raises(ExportError, match="no valid"):
        write_displacement_png16(tmp_path / "bad.png", np.full((4, 4), np.nan))


def test_normal_map_png_encoding_of_known_normals(tmp_path: Path) -> None:
    normals = np.zeros((3, 2, 3))
    normals[:, 0, 0] = (0, 0, 2)  # unnormalised +z
    normals[:, 0, 1] = (1, 0, 0)
    normals[:, 0, 2] = (0, -1, 0)
    normals[:, 1, 0] = (0.6, 0.0, 0.8)
    normals[:, 1, 1] = (1, 0, 0)  # marked invalid below
    normals[:, 1, 2] = (0, 0, 0)  # zero length: invalid
    valid = np.array([[True, True, True], [True, False, True]])
    write_normal_map_png(tmp_path / "n8.png", normals, valid)
    with Image.open(tmp_path / "n8.png") as image:
        assert image.mode == "RGB"
        rgb = np.asarray(image)
    assert rgb[0].tolist() == [[128, 128, 255], [255, 128, 128], [128, 0, 128]]
    assert rgb[1].tolist() == [[204, 128, 230], [128, 128, 255], [128, 128, 255]]  # 0.8*255=204, 0.9*255=229.5->230
    write_normal_map_png(tmp_path / "n16.png", torch.from_numpy(normals)[None], valid, bit_depth=16)
    decoded = read_normal_map_png(tmp_path / "n16.png")
    assert np.allclose(decoded[:, 0, 1], [1, 0, 0], atol=1e-4) and np.allclose(decoded[:, 1, 0], [0.6, 0, 0.8], atol=1e-4)
    import cv2

    raw = cv2.imread(str(tmp_path / "n16.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw[0, 1, ::-1].tolist() == [65535, 32768, 32768]


# --------------------------------------------------------------------------------- visualisations


def test_strip_png_layout_and_colours(tmp_path: Path) -> None:
    red = np.zeros((100, 50, 3), dtype=np.uint8)
    red[..., 0] = 255
    gray_float = np.full((64, 64), 0.5)
    blue_chw = torch.zeros(3, 32, 32)
    blue_chw[2] = 1.0
    strip = write_strip_png(tmp_path / "strip.png", [red, gray_float, blue_chw], ["input", "aligned", "coarse render"], height=128)
    bar = max(16, 128 // 8)
    assert strip.shape == (128 + bar, 64 + 128 + 128, 3)
    with Image.open(tmp_path / "strip.png") as image:
        assert np.array_equal(np.asarray(image), strip)  # RGB on disk, not BGR
    assert strip[bar + 60, 30].tolist() == [255, 0, 0]
    assert strip[bar + 60, 64 + 60].tolist() == [128, 128, 128]
    assert strip[bar + 60, 64 + 128 + 60].tolist() == [0, 0, 255]
    assert strip[:bar].max() == 255 and strip[:bar, 64 + 128 :].max() > 200  # labels drawn in every bar
    with pytest.raises(ExportError, match="3 images but 2 labels"):
        write_strip_png(tmp_path / "bad.png", [red, red, red], ["a", "b"])


def test_gif_frames_round_trip(tmp_path: Path) -> None:
    import imageio.v3 as iio

    frames = [np.full((24, 32, 3), level, dtype=np.uint8) for level in (0, 60, 120, 180, 240)]
    frames[2] = frames[2].astype(np.float32) / 255.0  # float frames are accepted
    path = write_gif(tmp_path / "sweep.gif", frames, fps=5)
    loaded = iio.imread(path, index=None)
    assert loaded.shape[:3] == (5, 24, 32)
    assert [int(frame[..., :3].mean()) for frame in loaded] == pytest.approx([0, 60, 120, 180, 240], abs=2)
    with pytest.raises(ExportError, match="same shape"):
        write_gif(tmp_path / "bad.gif", [frames[0], np.zeros((10, 10, 3), np.uint8)])
