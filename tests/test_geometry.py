"""Tests of the geometric core: face models, camera, SH lighting, normals (hand-computed values)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat
from scipy.spatial.transform import Rotation

from facedetail.geometry.camera import PerspectiveCamera, euler_to_rotation, project_to_screen, rigid_transform, transform_and_project
from facedetail.geometry.face_model import (
    CoefficientLayout,
    FaceModelFileError,
    cylindrical_uv,
    load_face_model,
    load_face_model_from_params,
)
from facedetail.geometry.lighting import irradiance, sh_basis, shade
from facedetail.geometry.mesh import face_normals, vertex_normals
from tests.conftest import ICT_PATH



# ----------------------------------------------------------------------------------------- camera


def test_rotation_yaw_90_maps_x_to_minus_z() -> None:
    rot = euler_to_rotation(torch.tensor([[0.0, math.pi / 2, 0.0]]))
    points = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    rotated = points @ rot
    assert torch.allclose(rotated[0, 0], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(rotated[0, 1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_rotation_roll_90_maps_x_to_y_and_pitch_90_maps_y_to_z() -> None:
    roll = euler_to_rotation(torch.tensor([[0.0, 0.0, math.pi / 2]]))
    assert torch.allclose(torch.tensor([1.0, 0.0, 0.0]) @ roll[0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    pitch = euler_to_rotation(torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    assert torch.allclose(torch.tensor([0.0, 1.0, 0.0]) @ pitch[0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_rotation_matches_extrinsic_xyz_transposed() -> None:
    angles = np.array([[0.3, -0.5, 0.2], [-1.0, 0.1, 2.0]])
    rot = euler_to_rotation(torch.tensor(angles, dtype=torch.float64)).numpy()
    for a, r in zip(angles, rot):
        # Rz @ Ry @ Rx acting on columns = extrinsic x, then y, then z; Deng uses its transpose on rows.
        expected = Rotation.from_euler("xyz", a).as_matrix().T
        np.testing.assert_allclose(r, expected, atol=1e-12)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)


def test_projection_of_known_point_ict_units() -> None:
    camera = PerspectiveCamera.for_units(mm_per_unit=10.0)  # centimetres -> camera 100 cm away
    assert camera.camera_distance == pytest.approx(100.0)
    point = torch.tensor([[[1.0, 2.0, 0.0]]])
    screen = project_to_screen(rigid_transform(point, torch.eye(3)[None], torch.tensor([[0.0, 0.0, 50.0]])), camera)
    # depth = 100 - 50 = 50; x = 1015 * 1 / 50 + 112 = 132.3; y = 112 - 1015 * 2 / 50 = 71.4 (rows down)
    assert torch.allclose(screen[0, 0], torch.tensor([132.3, 71.4, 50.0]), atol=1e-4)


def test_projection_bfm_units_and_resized_camera() -> None:
    camera = PerspectiveCamera.for_units(mm_per_unit=100.0)
    assert camera.camera_distance == pytest.approx(10.0)
    screen = project_to_screen(torch.tensor([[[0.5, -0.5, 0.0]]]), camera)
    assert torch.allclose(screen[0, 0], torch.tensor([112 + 50.75, 112 + 50.75, 10.0]), atol=1e-4)
    big = camera.resized(448)
    assert (big.focal, big.center, big.image_size) == (2030.0, 224.0, 448)


def test_transform_and_project_is_differentiable() -> None:
    vertices = torch.randn(2, 5, 3, dtype=torch.float64)
    angles = (0.1 * torch.randn(2, 3, dtype=torch.float64)).requires_grad_()
    trans = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    camera = PerspectiveCamera.for_units(10.0)
    assert torch.autograd.gradcheck(lambda a, t: transform_and_project(vertices, a, t, camera)[0], (angles, trans))


# ----------------------------------------------------------------------------------------- lighting


def test_sh_basis_of_up_facing_normal() -> None:
    y = sh_basis(torch.tensor([0.0, 0.0, 1.0]))
    # a0 c0 = pi / sqrt(4 pi) = sqrt(pi)/2; a1 c1 = sqrt(pi); a2 c2 = pi sqrt(5) / 2 ... see Deng et al.
    k0 = math.sqrt(math.pi) / 2
    k1 = math.sqrt(math.pi)
    k2 = (2 * math.pi / math.sqrt(8)) * (3 * math.sqrt(5) / math.sqrt(12 * math.pi))
    expected = torch.tensor([k0, 0.0, k1, 0.0, 0.0, 0.0, k2 / math.sqrt(3), 0.0, 0.0])
    assert torch.allclose(y, expected, atol=1e-6)
    assert k0 == pytest.approx(0.886227, abs=1e-6) and k1 == pytest.approx(1.772454, abs=1e-6)


def test_shade_known_normal_ambient_and_directional() -> None:
    normals = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    albedo = torch.full((1, 2, 3), 0.5)
    gamma = torch.zeros(1, 27)
    gamma[0, 2] = 1.0  # red channel, z term (light from the camera)
    gamma[0, 9 + 3] = 1.0  # green channel, -x term
    colour = shade(albedo, normals, gamma)
    ambient = 0.8 * 0.886227
    # normal +z: red gets ambient + sqrt(pi); green/blue only ambient; 3z^2-1 term unused (gamma 0)
    assert torch.allclose(colour[0, 0], 0.5 * torch.tensor([ambient + 1.772454, ambient, ambient]), atol=1e-5)
    # normal +x: green gets ambient - sqrt(pi)
    assert torch.allclose(colour[0, 1], 0.5 * torch.tensor([ambient, ambient - 1.772454, ambient]), atol=1e-5)
    assert irradiance(normals, gamma).shape == (1, 2, 3)


def test_shade_rejects_wrong_gamma_shape() -> None:
    with pytest.raises(ValueError, match="27"):
        shade(torch.ones(1, 1, 3), torch.ones(1, 1, 3), torch.zeros(1, 9))


# ----------------------------------------------------------------------------------------- mesh


def test_face_and_area_weighted_vertex_normals() -> None:
    vertices = torch.tensor([[[0.0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0, 1], [1, 0, 0]]])
    triangles = torch.tensor([[0, 1, 2], [0, 3, 4]])
    fn = face_normals(vertices, triangles)
    assert torch.allclose(fn[0], torch.tensor([[0.0, 0, 1], [0, 1, 0]]))
    vn = vertex_normals(vertices, triangles)
    # vertex 0: cross products (0,0,4) (area 2) + (0,1,0) (area 0.5) -> (0,1,4)/sqrt(17)
    assert torch.allclose(vn[0, 0], torch.tensor([0.0, 1.0, 4.0]) / math.sqrt(17.0), atol=1e-6)
    assert torch.allclose(vn[0, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_vertex_normals_gradcheck() -> None:
    vertices = torch.tensor(
        [[[0.0, 0, 0], [1, 0, 0.2], [0, 1, 0.1], [1, 1, 0.5], [0.5, 0.5, 1.0]]], dtype=torch.float64, requires_grad=True
    )
    triangles = torch.tensor([[0, 1, 4], [1, 3, 4], [3, 2, 4], [2, 0, 4]])
    assert torch.autograd.gradcheck(lambda v: vertex_normals(v, triangles), (vertices,))


# ----------------------------------------------------------------------------------------- layout


def test_layout_bfm_and_ict_sizes_split_join() -> None:
    bfm = CoefficientLayout(n_id=80, n_exp=64, n_tex=80)
    assert bfm.total == 257
    assert bfm.slices["angles"] == slice(224, 227) and bfm.slices["gamma"] == slice(227, 254)
    assert bfm.slices["trans"] == slice(254, 257)
    ict = CoefficientLayout(n_id=100, n_exp=53, n_tex=0)
    assert ict.total == 186
    coeffs = torch.arange(ict.total, dtype=torch.float32)[None]
    blocks = ict.split(coeffs)
    assert blocks["tex"].shape == (1, 0) and blocks["angles"][0, 0] == 153
    assert torch.equal(ict.join(blocks), coeffs)
    with pytest.raises(ValueError, match="186"):
        ict.split(torch.zeros(1, 257))


# ----------------------------------------------------------------------------------------- ICT


@pytest.fixture(scope="module")
def ict_model():
    if not ICT_PATH.is_file():
        pytest.skip(f"ICT-FaceKit asset missing at {ICT_PATH}")
    return load_face_model("ict", ICT_PATH)


def test_ict_loads_with_expected_shapes() -> None:
    if not ICT_PATH.is_file():
        pytest.skip(f"ICT-FaceKit asset missing at {ICT_PATH}")
    m = load_face_model("ict", ICT_PATH, close_holes=False)  # the mesh as stored (closed: test_face_model_holes.py)
    assert m.mean_shape.shape == (9409, 3) and m.mean_shape.dtype == torch.float32
    assert m.id_basis.shape == (100, 9409, 3) and m.id_basis.dtype == torch.float32
    assert m.exp_basis.shape == (53, 9409, 3)
    assert m.triangles.shape == (18460, 3) and m.triangles.dtype == torch.int64
    assert m.uv.shape == (9547, 2) and m.tri_uv_idx.shape == (18460, 3)
    assert m.lmk68.shape == (68,) and m.albedo_basis is None and not m.has_albedo
    assert m.layout.total == 186 and m.exp_bounds == (0.0, 1.0)
    assert m.mm_per_unit == 10.0 and m.camera.camera_distance == pytest.approx(100.0)
    assert "jawOpen" in m.exp_names and len(m.exp_names) == 53
    # face mask: the frontal face, not neck/ears/scalp
    n_face = int(m.face_mask.sum())
    assert 0.4 * 9409 < n_face < 0.8 * 9409
    assert torch.allclose(m.mean_shape[m.face_mask].mean(0), torch.zeros(3), atol=1e-4)
    chin_y = m.mean_shape[m.lmk68[8], 1]
    assert not m.face_mask[m.mean_shape[:, 1] < chin_y - 2.0].any()  # nothing 2 cm below the chin
    with pytest.raises(ValueError, match="albedo"):
        m.albedo(torch.zeros(1, 0))


def test_ict_shape_and_expression_offsets(ict_model) -> None:
    m = ict_model
    id_c = torch.zeros(2, 100)
    id_c[1, 0] = 1.0
    exp_c = torch.zeros(2, 53)
    exp_c[:, m.exp_names.index("jawOpen")] = 1.0
    shape = m.shape(id_c, exp_c)
    assert shape.shape == (2, m.n_vertices, 3) and m.n_open_vertices == 9409
    offsets = m.expression_offsets(exp_c)
    assert torch.allclose(shape[0] - m.mean_shape, offsets[0], atol=1e-5)
    assert torch.allclose(shape[1] - shape[0], m.id_basis[0], atol=1e-5)
    jaw = m.exp_basis[m.exp_names.index("jawOpen")]
    assert torch.allclose(offsets[1], jaw)
    assert offsets[0, m.lmk68[8], 1] < -0.5  # jaw opens downwards (cm)


def test_ict_neutral_projects_into_the_crop_symmetric(ict_model) -> None:
    m = ict_model
    coeffs = m.layout.zeros(1)
    b = m.layout.split(coeffs)
    screen, _, rot = transform_and_project(m.shape(b["id"], b["exp"]), b["angles"], b["trans"], m.camera)
    lmk = screen[0, m.lmk68]
    assert screen.shape == (1, m.n_vertices, 3)
    assert lmk[36, 0] < 112 < lmk[45, 0]  # subject's right eye on the image left
    assert lmk[36, 0] + lmk[45, 0] == pytest.approx(224.0, abs=0.5)
    assert lmk[8, 1] > lmk[30, 1] > lmk[27, 1]  # chin below nose below the nose bridge (rows down)
    assert (lmk[:, :2] > 0).all() and (lmk[:, :2] < 224).all()
    normals = vertex_normals(m.shape(b["id"], b["exp"]), m.triangles) @ rot
    assert normals[0, m.face_mask, 2].mean() > 0.3  # outward normals face the camera


def test_face_model_moves_device_and_dtype(ict_model) -> None:
    m64 = load_face_model("ict", ICT_PATH).double()
    assert m64.id_basis.dtype == torch.float64 and m64.triangles.dtype == torch.int64
    assert m64.to("cpu").device.type == "cpu"


# ----------------------------------------------------------------------------------------- BFM


def _write_bfm_mat(path: Path, n_vertices: int = 70, drop: str | None = None) -> dict:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(7)), -1).reshape(-1, 2).astype(np.float64)[:n_vertices]
    mean = np.concatenate([grid * 0.1, 0.05 * rng.standard_normal((n_vertices, 1)) + 1.0], axis=1)
    tris = []
    for r in range(6):
        for c in range(9):
            i = r * 10 + c
            tris += [[i, i + 1, i + 10], [i + 1, i + 11, i + 10]]
    data = {
        "meanshape": mean.reshape(1, -1),
        "idBase": rng.standard_normal((3 * n_vertices, 80)) * 0.01,
        "exBase": rng.standard_normal((3 * n_vertices, 64)) * 0.01,
        "meantex": np.full((1, 3 * n_vertices), 127.5),
        "texBase": rng.standard_normal((3 * n_vertices, 80)),
        "tri": np.asarray(tris, np.float64) + 1,  # MATLAB 1-based (stored as doubles)
        "keypoints": (np.arange(68) + 1).reshape(1, 68).astype(np.float64),
        "point_buf": np.ones((n_vertices, 8)),
        "frontmask2_idx": (np.arange(10, 60) + 1).reshape(-1, 1).astype(np.float64),
        "skinmask": (np.arange(n_vertices) % 2).reshape(1, -1).astype(np.float64),
    }
    if drop:
        data.pop(drop)
    savemat(str(path), data)
    return data


def test_bfm_loader_on_synthetic_mat(tmp_path: Path) -> None:
    path = tmp_path / "BFM_model_front.mat"
    data = _write_bfm_mat(path)
    m = load_face_model_from_params({"kind": "bfm", "bfm_path": str(path), "ict_path": "unused"})
    assert m.kind == "bfm" and m.layout.total == 257 and m.mm_per_unit == 100.0
    assert m.camera.camera_distance == pytest.approx(10.0)
    assert m.triangles.min() == 0 and m.triangles[0].tolist() == [0, 1, 10]  # 1-based -> 0-based
    assert m.lmk68[0] == 0 and m.lmk68[67] == 67
    assert int(m.face_mask.sum()) == 50 and bool(m.face_mask[10]) and not bool(m.face_mask[9])
    assert int(m.skin_mask.sum()) == 35
    mean = data["meanshape"].reshape(-1, 3)
    offset = mean[10:60].mean(0)
    assert torch.allclose(m.mean_shape, torch.tensor(mean - offset, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(m.recenter_offset, torch.tensor(offset, dtype=torch.float32))
    # basis (3N, K) column k, vertex i, axis c -> basis[k, i, c]
    assert m.id_basis[5, 3, 2].item() == pytest.approx(data["idBase"][3 * 3 + 2, 5], rel=1e-6)
    tex = torch.zeros(1, 80)
    tex[0, 1] = 1.0
    albedo = m.albedo(tex)
    assert albedo[0, 4, 1].item() == pytest.approx((127.5 + data["texBase"][3 * 4 + 1, 1]) / 255.0, rel=1e-5)
    assert m.uv.shape == (70, 2) and torch.equal(m.tri_uv_idx, m.triangles)
    assert m.uv.min() >= 0.0 and m.uv.max() <= 1.0


def test_bfm_loader_with_uv_file(tmp_path: Path) -> None:
    path = tmp_path / "bfm.mat"
    _write_bfm_mat(path)
    uv = np.random.default_rng(1).random((70, 2)).astype(np.float32)
    np.savez(tmp_path / "uv.npz", uv=uv)
    m = load_face_model("bfm", path, uv_path=tmp_path / "uv.npz")
    assert np.allclose(m.uv.numpy(), uv)
    np.savez(tmp_path / "bad_uv.npz", uv=uv[:10])
    with pytest.raises(FaceModelFileError, match="tri_uv_idx"):
        load_face_model("bfm", path, uv_path=tmp_path / "bad_uv.npz")


def test_cylindrical_uv_orders_left_to_right_and_bottom_to_top() -> None:
    vertices = np.array([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 0.5]])
    uv = cylindrical_uv(vertices)
    assert uv[0, 0] < uv[2, 0] < uv[1, 0] and uv[0, 1] < uv[2, 1]


# ----------------------------------------------------------------------------------------- errors


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    for kind in ("ict", "bfm"):
        missing = tmp_path / f"nope_{kind}.bin"
        with pytest.raises(FileNotFoundError, match=f"nope_{kind}.bin"):
            load_face_model(kind, missing)
    with pytest.raises(ValueError, match="'ict' or 'bfm'"):
        load_face_model("flame", tmp_path / "x")


def test_malformed_files_give_clear_errors(tmp_path: Path) -> None:
    bad_npz = tmp_path / "ict.npz"
    np.savez(bad_npz, neutral=np.zeros((4, 3), np.float32))
    with pytest.raises(FaceModelFileError, match=r"missing keys .*id_basis"):
        load_face_model("ict", bad_npz)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(FaceModelFileError, match="garbage.npz"):
        load_face_model("ict", garbage)
    wrong_shape = tmp_path / "wrong.npz"
    np.savez(
        wrong_shape, neutral=np.zeros((4, 3)), id_basis=np.zeros((2, 5, 3)), exp_basis=np.zeros((1, 4, 3)),
        exp_names=np.array(["a"]), tris=np.zeros((1, 3), int), tri_uv_idx=np.zeros((1, 3), int),
        uv=np.zeros((1, 2)), lmk68=np.zeros(68, int),
    )
    with pytest.raises(FaceModelFileError, match="id_basis"):
        load_face_model("ict", wrong_shape)
    mat = tmp_path / "bfm.mat"
    _write_bfm_mat(mat, drop="exBase")
    with pytest.raises(FaceModelFileError, match="exBase"):
        load_face_model("bfm", mat)
    (tmp_path / "text.mat").write_text("hello")
    with pytest.raises(FaceModelFileError, match="text.mat"):
        load_face_model("bfm", tmp_path / "text.mat")
