"""Closed faces: boundary loops, hole filling in the face model, closed renders and exports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.io import savemat

from facedetail.geometry.face_model import (
    _points_in_polygon,
    close_face_model_holes,
    load_face_model,
    load_face_model_from_params,
)
from facedetail.geometry.face_uv import fitted_screen_vertices
from facedetail.geometry.holes import boundary_edges, boundary_loops, fill_uv_fold_count, plan_hole_fill
from facedetail.io.export import write_obj_with_uv
from facedetail.render.rasterizer import rasterize

ICT_PATH = Path(__file__).resolve().parents[1] / "../shared/assets/ict_facekit/ict_face_only_9409.npz"
needs_ict = pytest.mark.skipif(not ICT_PATH.is_file(), reason=f"ICT-FaceKit asset missing at {ICT_PATH}")


def grid_with_hole(n: int = 4, hole: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An n x n vertex grid in the x-y plane (counter-clockwise triangles, normals +z), optionally
    without the two triangles of its centre quad."""
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    vertices = np.stack([xs.ravel(), ys.ravel(), np.zeros(n * n)], 1)
    tris = []
    centre = (n - 1) // 2
    for r in range(n - 1):
        for c in range(n - 1):
            if hole and r == centre and c == centre:
                continue
            i = r * n + c
            tris += [[i, i + 1, i + n + 1], [i, i + n + 1, i + n]]
    return vertices, np.asarray(tris, np.int64)


def edge_use(triangles: np.ndarray) -> np.ndarray:
    """How many triangles use each undirected edge."""
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), 1)
    return np.unique(edges, axis=0, return_counts=True)[1]


def test_boundary_loops_of_a_grid_with_a_known_hole() -> None:
    vertices, tris = grid_with_hole(4)
    loops = sorted(boundary_loops(tris), key=len)
    assert [len(loop) for loop in loops] == [4, 12]
    assert sorted(loops[0].tolist()) == [5, 6, 9, 10]  # the centre quad
    assert len(boundary_edges(tris)) == 16
    # the hole runs clockwise (its triangles are counter-clockwise around it), the border counter-clockwise
    xy = vertices[:, :2]
    area = lambda loop: 0.5 * np.sum(xy[loop, 0] * np.roll(xy[loop, 1], -1) - np.roll(xy[loop, 0], -1) * xy[loop, 1])  # noqa: E731
    assert area(loops[0]) < 0 < area(loops[1])
    # closed surface (octahedron) and a disc: nothing to fill
    octa = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    assert boundary_loops(octa) == []


def test_plan_fill_closes_the_hole_consistently_and_keeps_the_border() -> None:
    vertices, tris = grid_with_hole(4)
    uv = vertices[:, :2] / 3.0
    fill = plan_hole_fill(vertices, tris, uv, tris, rings=1)
    assert len(fill.loops) == 1 and fill.kinds == ("other",) and fill.n_new == 4 + 1
    closed = np.concatenate([tris, fill.triangles])
    assert [len(loop) for loop in boundary_loops(closed)] == [12]  # only the outer border is left
    assert set(edge_use(closed).tolist()) == {1, 2}
    # consistent winding: every interior edge is used once in each direction
    directed = np.concatenate([closed[:, [0, 1]], closed[:, [1, 2]], closed[:, [2, 0]]])
    assert len({tuple(e) for e in directed.tolist()}) == len(directed)
    new = fill.extend(vertices, with_offsets=True)
    assert np.allclose(new[-1], [1.5, 1.5, 0.0])  # centre = mean of the loop; flat fill
    assert np.allclose(new[: len(vertices)], vertices)
    all_uv = np.concatenate([uv, fill.uv])
    assert fill_uv_fold_count(all_uv, fill.tri_uv_idx, +1.0) == 0
    assert np.allclose(all_uv[-1], [0.5, 0.5])


def test_closed_or_disc_mesh_is_unchanged_and_generic_loader_fills_a_bfm_like_hole(tmp_path: Path) -> None:
    vertices, tris = grid_with_hole(5, hole=False)
    fields = dict(mean_shape=vertices, id_basis=np.zeros((2, 25, 3)), exp_basis=np.zeros((1, 25, 3)), triangles=tris,
                  uv=vertices[:, :2] / 4, tri_uv_idx=tris, lmk68=np.arange(68) % 25, face_mask=np.ones(25, bool))
    out = close_face_model_holes(fields)
    assert out["hole_fill"].n_new == 0 and out["mean_shape"] is fields["mean_shape"] and out["triangles"] is tris

    # a BFM-format file whose mesh has one hole gets it closed (the option is generic)
    vertices, tris = grid_with_hole(6)
    n = len(vertices)
    rng = np.random.default_rng(0)
    savemat(str(tmp_path / "bfm.mat"), {
        "meanshape": vertices.reshape(1, -1), "idBase": rng.standard_normal((3 * n, 80)) * 0.01,
        "exBase": rng.standard_normal((3 * n, 64)) * 0.01, "meantex": np.full((1, 3 * n), 127.5),
        "texBase": rng.standard_normal((3 * n, 80)), "tri": tris.astype(float) + 1,
        "keypoints": (np.arange(68) % n + 1).reshape(1, 68).astype(float),
    })
    opened = load_face_model("bfm", tmp_path / "bfm.mat", close_holes=False)
    closed = load_face_model("bfm", tmp_path / "bfm.mat")
    assert opened.n_vertices == n and closed.n_open_vertices == n and closed.n_vertices > n
    assert len(boundary_loops(opened.triangles.numpy())) == 2 and len(boundary_loops(closed.triangles.numpy())) == 1
    assert closed.albedo(torch.zeros(1, 80)).shape == (1, closed.n_vertices, 3)
    assert not closed.face_mask[n:].any() and not closed.skin_mask[n:].any()


@pytest.fixture(scope="module")
def ict_pair():
    if not ICT_PATH.is_file():
        pytest.skip(f"ICT-FaceKit asset missing at {ICT_PATH}")
    return load_face_model("ict", ICT_PATH, close_holes=False), load_face_model("ict", ICT_PATH)


@needs_ict
def test_ict_only_the_outer_border_is_left(ict_pair) -> None:
    opened, closed = ict_pair
    open_loops = boundary_loops(opened.triangles.numpy())
    closed_loops = boundary_loops(closed.triangles.numpy())
    assert sorted(len(loop) for loop in open_loops) == [42, 42, 74, 204]  # two eyes, the mouth, the border
    assert len(boundary_edges(opened.triangles.numpy())) == 362
    assert [len(loop) for loop in closed_loops] == [204] and len(boundary_edges(closed.triangles.numpy())) == 204
    assert set(edge_use(closed.triangles.numpy()).tolist()) == {1, 2}
    assert sorted(closed.hole_fill.kinds) == ["eye", "eye", "mouth"]
    # original indices stay valid: same first vertices, landmarks, triangles and masks
    n = opened.n_vertices
    assert closed.n_open_vertices == n == 9409 and closed.n_vertices > n
    assert torch.equal(closed.lmk68, opened.lmk68) and torch.equal(closed.triangles[: len(opened.triangles)], opened.triangles)
    assert torch.allclose(closed.mean_shape[:n], opened.mean_shape) and torch.equal(closed.id_basis[:, :n], opened.id_basis)
    assert torch.equal(closed.face_mask[:n], opened.face_mask) and not closed.face_mask[n:].any()
    assert closed.uv.shape[0] > opened.uv.shape[0] and closed.tri_uv_idx.shape == closed.triangles.shape
    # the option from the parameters block
    params = {"kind": "ict", "ict_path": str(ICT_PATH), "bfm_path": "unused"}
    assert load_face_model_from_params({**params, "close_holes": False}).n_vertices == n


@needs_ict
def test_ict_fill_uvs_stay_inside_the_empty_hole_charts(ict_pair) -> None:
    opened, closed = ict_pair
    uv, tuv = closed.uv.numpy(), closed.tri_uv_idx.numpy()
    n_tris = len(opened.triangles)
    assert fill_uv_fold_count(uv, tuv[n_tris:], +1.0) == 0 and fill_uv_fold_count(uv, tuv[:n_tris], +1.0) == 0
    fill_centroids = uv[tuv[n_tris:]].mean(1)
    original_centroids = uv[tuv[:n_tris]].mean(1)
    inside_some_loop = np.zeros(len(fill_centroids), bool)
    for loop in closed.hole_fill.loops:
        polygon = _loop_uv_polygon(opened, loop)
        inside_some_loop |= _points_in_polygon(fill_centroids, polygon)
        assert not _points_in_polygon(original_centroids, polygon).any()  # the holes are empty in the chart
    assert inside_some_loop.mean() > 0.99  # the fill lies in the holes' UV slits: no overlap with the charts


def _loop_uv_polygon(model, loop: np.ndarray) -> np.ndarray:
    tris, tuv, uv = model.triangles.numpy(), model.tri_uv_idx.numpy(), model.uv.numpy()
    start = {}
    for k in range(3):
        start.update(zip(zip(tris[:, k].tolist(), tris[:, (k + 1) % 3].tolist()), tuv[:, k].tolist()))
    return uv[[start[(int(a), int(b))] for a, b in zip(loop, np.roll(loop, -1))]]


def _coverage(model, expression: str | None = None) -> np.ndarray:
    coeffs = model.layout.zeros(1)
    if expression:
        coeffs[0, model.layout.slices["exp"].start + model.exp_names.index(expression)] = 1.0
    screen = fitted_screen_vertices(model, coeffs, 224)
    return (rasterize(screen, model.triangles, 224, backend="fast").pix_to_face[0] >= 0).numpy()


@needs_ict
@pytest.mark.parametrize("expression", [None, "jawOpen"])
def test_frontal_render_has_no_see_through_holes(ict_pair, expression) -> None:
    opened, closed = ict_pair
    hole_pixels = lambda mask: int((ndimage.binary_fill_holes(mask) & ~mask).sum())  # noqa: E731
    assert hole_pixels(_coverage(opened, expression)) > 100  # eyes (and the open mouth) show the background
    mask = _coverage(closed, expression)
    assert hole_pixels(mask) == 0 and mask.sum() > 20000


@needs_ict
def test_fill_follows_identity_and_expression(ict_pair) -> None:
    _, closed = ict_pair
    fill = closed.hole_fill
    n = closed.n_open_vertices
    gen = torch.Generator().manual_seed(0)
    id_c = torch.randn(2, closed.layout.n_id, generator=gen)
    exp_c = torch.rand(2, closed.layout.n_exp, generator=gen) * 0.5
    exp_c[1, closed.exp_names.index("jawOpen")] = 1.0
    shapes = closed.shape(id_c, exp_c)
    neutral = closed.mean_shape
    centres = n + np.cumsum([(len(loop) * 2 + 1) for loop in fill.loops]) - 1  # default 2 rings + centre
    for k, loop in enumerate(fill.loops):
        c = int(centres[k])
        offset = neutral[c] - neutral[loop].mean(0)  # the bulge / recess, fixed in model space
        assert torch.allclose(shapes[:, c], shapes[:, loop].mean(1) + offset, atol=1e-4)
    mouth = fill.kinds.index("mouth")
    c = int(centres[mouth])
    assert shapes[1, c, 1] < shapes[0, c, 1] - 0.3  # the mouth fill drops with the open jaw (cm)
    mouth_offset = neutral[c] - neutral[fill.loops[mouth]].mean(0)
    eye_offset = neutral[int(centres[fill.kinds.index("eye")])] - neutral[fill.loops[fill.kinds.index("eye")]].mean(0)
    assert mouth_offset[2] < -0.3 and eye_offset[2] > 0.05  # recessed mouth, convex eyes (cm, +z = out)


@needs_ict
def test_exported_coarse_obj_has_uvs_everywhere_and_one_boundary_loop(ict_pair, tmp_path: Path) -> None:
    trimesh = pytest.importorskip("trimesh")
    _, closed = ict_pair
    written = write_obj_with_uv(tmp_path / "coarse.obj", closed.mean_shape, closed.triangles, closed.uv, closed.tri_uv_idx)
    faces = [line.split()[1:] for line in written["obj"].read_text().splitlines() if line.startswith("f ")]
    assert len(faces) == len(closed.triangles)
    assert all(len(corner.split("/")) >= 2 and corner.split("/")[1] for face in faces for corner in face)
    mesh = trimesh.load(written["obj"], process=False, force="mesh")
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    mesh.merge_vertices(merge_tex=True, merge_norm=True)  # UV seams split vertices on load
    loops = boundary_loops(np.asarray(mesh.faces))
    assert len(loops) == 1 and len(loops[0]) == 204
