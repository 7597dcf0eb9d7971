"""Tests of facedetail.engine: detailed reconstruction of real photos, exports, re-targeting.

A tiny detail generator (seeded, freshly initialised, uv_size 32) stands in for a trained model: the tests
check the plumbing (shapes, frames, files, round trips), not the quality of a trained model. A freshly
initialised DetailGenerator gives a nonzero displacement (its DRConv filter branch is not zero-initialised;
``test_fresh_generator_has_nonzero_displacement`` checks it), so re-targeting can change the maps without
perturbing the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facedetail.detect.align import original_to_aligned
from facedetail.io.export import read_displacement_png16
from facedetail.models.detail_model import DetailGenerator
from facedetail.engine.checkpoint import latest_versioned_file, load_detail_checkpoint
from facedetail.engine.export import export_face, export_fit
from facedetail.engine.fitter import torch_threads
from facedetail.engine.reconstructor import FaceReconstruction, Reconstructor
from facedetail.engine.retarget import expression_sweep, retarget
from facedetail.io.face_ids import image_stems
from facedetail.training.checkpoint import CheckpointError
from tests.conftest import EXPRESSIONS, ICT_PATH, OBAMA, REPO_ROOT, TWO_PEOPLE, needs_assets

PROJECT = REPO_ROOT
ICT = ICT_PATH
UV_SIZE = 32
EXPORT_SIZE = 128  # the default is 256; 128 keeps the dense OBJ small for the tests
#: Shorter fits than the defaults (360 steps) keep the tests fast; landmarks still converge on these portraits.
FAST_FITTING = {"rigid_steps": 30, "landmark_steps": 80, "photometric_steps": 15}
TINY_CONFIG = {"ngf": 8, "num_downs": 3, "embedding_channels": 4, "regions": 2, "filter_hidden": 8, "max_displacement": 0.3}



def tiny_checkpoint(seed: int = 0, uv_size: int = UV_SIZE) -> dict:
    """A checkpoint dict in the train pipeline's format, from a seeded fresh generator."""
    torch.manual_seed(seed)
    generator = DetailGenerator.from_config(TINY_CONFIG)
    return {"generator": generator.state_dict(), "model_config": generator.config, "uv_size": uv_size,
            "face_model_kind": "ict", "step": 7, "albedo_blur_sigma": 2.0}


@pytest.fixture(scope="module")
def params() -> dict:
    from facedetail.cli import load_project_config

    parameters, _, _ = load_project_config(str(PROJECT / "conf"))
    parameters["device"] = "cpu"
    parameters["estimation"]["fitting"] = {**(parameters["estimation"].get("fitting") or {}), **FAST_FITTING}
    parameters["inference"] = {**parameters.get("inference", {}), "cpu_threads": 1}  # steady on a busy shared CPU
    return parameters


@pytest.fixture(scope="module")
def estimation_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("estimation_cache")  # a face fitted once is a cache hit afterwards


@pytest.fixture(scope="module")
def reconstructor(params, estimation_cache):
    with Reconstructor.from_params(tiny_checkpoint(), params, "cpu", cache_dir=estimation_cache, export_size=EXPORT_SIZE) as built:
        yield built


@pytest.fixture(scope="module")
def obama(reconstructor) -> FaceReconstruction:
    faces = reconstructor.reconstruct_images([OBAMA])
    assert [f.face_id for f in faces] == ["obama__f0"], reconstructor.last_report
    return faces[0]


@pytest.fixture(scope="module")
def exported(obama, reconstructor, tmp_path_factory) -> dict[str, str]:
    return export_face(obama, tmp_path_factory.mktemp("export"), reconstructor.face_model)


# ---------------------------------------------------------------------------------------------- checkpoint


def test_load_detail_checkpoint_from_dict_and_versioned_folder(tmp_path):
    generator, meta = load_detail_checkpoint(tiny_checkpoint(), "cpu")
    assert not generator.training and meta["uv_size"] == UV_SIZE and meta["step"] == 7 and meta["source"] == "<dict>"
    folder = tmp_path / "detail_generator.pt"
    for version, step in (("2026-01-01T00.00.00.000Z", 1), ("2026-02-01T00.00.00.000Z", 2)):
        (folder / version).mkdir(parents=True)
        torch.save({**tiny_checkpoint(), "step": step}, folder / version / "detail_generator.pt")
    assert latest_versioned_file(folder).parent.name == "2026-02-01T00.00.00.000Z"
    _, meta = load_detail_checkpoint(folder, "cpu")
    assert meta["step"] == 2  # the latest version wins


def test_load_detail_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_detail_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no '<version>/empty"):
        (tmp_path / "empty").mkdir()
        load_detail_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"missing \['uv_size'\]"):
        load_detail_checkpoint({k: v for k, v in tiny_checkpoint().items() if k != "uv_size"})
    wrong = tiny_checkpoint()
    wrong["model_config"] = {**wrong["model_config"], "ngf": 16}
    with pytest.raises(CheckpointError, match="do not match its model_config"):
        load_detail_checkpoint(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_detail_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="multiple of"):
        load_detail_checkpoint({**tiny_checkpoint(), "uv_size": 36})


def test_fresh_generator_has_nonzero_displacement():
    generator, _ = load_detail_checkpoint(tiny_checkpoint(), "cpu")
    torch.manual_seed(1)
    texture, valid = torch.rand(1, 3, UV_SIZE, UV_SIZE), torch.ones(1, 1, UV_SIZE, UV_SIZE)
    with torch.no_grad():
        embedding = generator.embed(texture, valid)
        first = generator.displacement_from(embedding, 0.1 * torch.randn(1, 3, UV_SIZE, UV_SIZE))
        second = generator.displacement_from(embedding, 0.1 * torch.randn(1, 3, UV_SIZE, UV_SIZE))
    assert first.abs().max() > 1e-3
    assert (first - second).abs().mean() > 1e-4  # the expression map drives the displacement


def test_image_stems_are_unique_and_file_safe():
    assert image_stems(["a.jpg", "sub/b.png", "a.png", "c.v2.jpg"]) == ["a_jpg", "sub__b", "a_png", "c.v2"]
    assert image_stems(["x.jpg", "x.jpg"]) == ["x_jpg", "x_jpg_1"]
    assert image_stems(["/data/photos/obama.jpg", "../up/b.png"]) == ["obama", "b"]  # absolute: the file name only


# ---------------------------------------------------------------------------------------------- reconstruction


@needs_assets
def test_reconstruction_arrays(obama, reconstructor):
    S, E = UV_SIZE, EXPORT_SIZE
    fm = reconstructor.face_model
    assert obama.image == "obama.jpg" and obama.trans_params.shape == (5,)
    assert obama.coefficients.shape == (fm.layout.total,) and obama.aligned.shape == (224, 224, 3)
    assert obama.expression_map.shape == (3, S, S) and obama.uv_texture.shape == (3, S, S)
    assert obama.embedding.shape == (TINY_CONFIG["embedding_channels"], S, S) and obama.displacement.shape == (S, S)
    assert np.abs(obama.displacement).max() > 1e-4 and np.abs(obama.displacement).max() <= 0.3
    assert np.all(obama.displacement[~obama.uv_valid] == 0)
    assert obama.texture_valid.dtype == bool and 0.2 < obama.texture_valid.mean() < 0.95
    assert obama.detailed_positions.shape == (3, E, E) and obama.export_valid.shape == (E, E)
    for key in ("coarse", "detailed", "shape_coarse", "shape_detailed"):
        render = obama.renders[key]
        assert render.shape == (224, 224, 3) and render.dtype == np.uint8
        assert 0.2 < (render.max(axis=-1) > 0).mean() < 0.8  # the face covers part of the crop
    # the detailed render differs from the coarse one (the fresh generator's displacement is tiny, ~0.03 mm mean:
    # measured 3% of the pixels change by 1-2 levels)
    change = np.abs(obama.renders["shape_detailed"].astype(int) - obama.renders["shape_coarse"])
    assert change.max() >= 1 and (change > 0).mean() > 0.005
    # model frame: y up (forehead above chin), centred near the origin, ICT centimetres
    y = obama.coarse_vertices[fm.lmk68.cpu().numpy(), 1]
    assert y[27] > y[8] + 5.0  # nose bridge ~ 10 cm above the chin
    # the 68 landmarks in original pixels map back onto the aligned ones
    np.testing.assert_allclose(original_to_aligned(obama.landmarks68_original, obama.trans_params),
                               obama.landmarks68_aligned, atol=1e-3)


@needs_assets
def test_export_writes_every_file(exported, obama, reconstructor):
    fm = reconstructor.face_model
    expected = {
        "coarse_obj": "obama__f0_coarse.obj", "coarse_mtl": "obama__f0_coarse.mtl", "texture": "obama__f0_texture.png",
        "detail_obj": "obama__f0_detail.obj", "detail_mtl": "obama__f0_detail.mtl",
        "displacement_png": "obama__f0_displacement.png", "displacement_json": "obama__f0_displacement.png.json",
        "normal_object_png": "obama__f0_normal_object.png", "normal_tangent_png": "obama__f0_normal_tangent_opengl.png",
        "glb": "obama__f0_coarse.glb", "coefficients_npz": "obama__f0_coefficients.npz",
        "strip_png": "obama__f0_strip.png", "json": "obama__f0.json",
    }
    for key, name in expected.items():
        path = Path(exported[key])
        assert path.name == name and path.is_file() and path.stat().st_size > 0, key
    data = json.loads(Path(exported["json"]).read_text())
    assert data["image"] == "obama.jpg" and data["face_id"] == "obama__f0" and data["mask_source"]
    assert np.asarray(data["landmarks68"]).shape == (68, 2)
    assert {k: len(v) for k, v in data["coefficients"].items()} == fm.layout.sizes
    assert data["files"]["detail_obj"] == "obama__f0_detail.obj" and len(data["trans_params"]) == 5
    bundle = np.load(exported["coefficients_npz"])
    np.testing.assert_allclose(bundle["coefficients"], obama.coefficients)
    np.testing.assert_allclose(bundle["trans_params"], obama.trans_params, rtol=1e-6)
    np.testing.assert_allclose(bundle["exp"], obama.coefficients[fm.layout.slices["exp"]])
    import cv2

    strip = cv2.imread(exported["strip_png"])
    assert strip.shape[0] > 256 and strip.shape[1] > 4 * 256  # five labelled tiles side by side
    normals = cv2.imread(exported["normal_object_png"])
    assert normals.shape == (EXPORT_SIZE, EXPORT_SIZE, 3)


@needs_assets
def test_obj_files_load_in_trimesh_with_uvs(exported, reconstructor):
    trimesh = pytest.importorskip("trimesh")
    fm = reconstructor.face_model
    coarse = trimesh.load(exported["coarse_obj"], process=False)
    # trimesh splits vertices along UV seams: one vertex per (position, uv) pair = the model's UV count
    assert coarse.visual.uv is not None and coarse.vertices.shape == (len(fm.uv), 3)
    assert coarse.faces.shape == (len(fm.triangles), 3)
    ordered = trimesh.load(exported["coarse_obj"], process=False, maintain_order=True)
    assert ordered.vertices.shape == (fm.n_vertices, 3) and ordered.visual.uv.shape == (fm.n_vertices, 2)
    detail = trimesh.load(exported["detail_obj"], process=False)
    header = Path(exported["detail_obj"]).read_text().splitlines()[4]  # "# <V> vertices, <F> faces, <T> uv"
    n_vertices, n_faces = int(header.split()[1]), int(header.split()[3])
    assert detail.vertices.shape == (n_vertices, 3) and detail.faces.shape == (n_faces, 3)
    assert detail.visual.uv.shape == (n_vertices, 2) and 0 <= detail.visual.uv.min() and detail.visual.uv.max() <= 1
    assert n_vertices > 0.4 * EXPORT_SIZE**2  # dense: most texels of the UV layout
    # same surface: the dense mesh lies on the coarse one up to the displacement (<= 0.3 cm) and texel size
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(ordered.vertices).query(detail.vertices)
    assert np.median(distance) < 0.3


@needs_assets
def test_displacement_png_round_trips(exported, obama):
    decoded = read_displacement_png16(exported["displacement_png"])
    values = obama.export_displacement.astype(np.float64)
    span = max(values.max(), 0.0) - min(values.min(), 0.0)
    assert decoded.shape == values.shape == (EXPORT_SIZE, EXPORT_SIZE) and span > 0
    assert np.abs(decoded - values).max() <= 1e-4 * span


@needs_assets
def test_exported_maps_have_the_export_size_and_match_the_detail_obj(exported, obama, reconstructor):
    """Displacement PNG, normal PNG and dense OBJ are all at the export size and describe one surface:
    OBJ vertices = coarse UV surface + (decoded displacement PNG) x coarse normal, texel for texel."""
    import cv2
    from scipy.spatial import cKDTree

    E = EXPORT_SIZE
    decoded = read_displacement_png16(exported["displacement_png"])
    assert decoded.shape == (E, E) and cv2.imread(exported["normal_object_png"]).shape == (E, E, 3) == cv2.imread(exported["normal_tangent_png"]).shape
    assert json.loads(Path(exported["json"]).read_text())["export_size"] == E
    # the upsampled map is a smooth version of the model-size one: same range, same mean over the layout
    low = obama.displacement[obama.uv_valid]
    high = obama.export_displacement[obama.export_valid]
    assert abs(high.mean() - low.mean()) < 0.1 * np.abs(low).max() and np.abs(high).max() < 1.3 * np.abs(low).max()
    assert np.all(obama.export_displacement[~obama.export_valid] == 0)
    # the dense OBJ's vertices are the coarse export surface displaced by the PNG's values
    renderer = reconstructor.export_renderer
    surface = renderer.surface(torch.from_numpy(obama.coarse_vertices)[None], torch.from_numpy(obama.coarse_normals)[None])
    rebuilt = (surface.position_map + torch.from_numpy(decoded).float()[None, None] * surface.normal_map)[0].numpy()
    np.testing.assert_allclose(rebuilt[:, obama.export_valid], obama.detailed_positions[:, obama.export_valid], atol=1e-4)
    obj_vertices = np.array([[float(x) for x in line.split()[1:4]] for line in Path(exported["detail_obj"]).read_text().splitlines()
                             if line.startswith("v ")])
    distance, _ = cKDTree(rebuilt[:, obama.export_valid].T).query(obj_vertices)
    assert len(obj_vertices) > 0.4 * E * E and distance.max() < 1e-3  # OBJ writes 6 decimals (model units, cm)


@needs_assets
def test_fit_json_landmarks_lie_inside_the_face_box(reconstructor, tmp_path):
    faces = reconstructor.fitter.fit_images([TWO_PEOPLE])
    assert [f.face_id for f in faces] == ["two_people__f0", "two_people__f1"]  # two faces, left to right
    assert faces[0].bbox[0] < faces[1].bbox[0]
    for face in faces:
        written = export_fit(face, tmp_path, reconstructor.face_model)
        data = json.loads(Path(written["json"]).read_text())
        assert Path(written["overlay"]).is_file()
        points = np.asarray(data["landmarks68"])
        x0, y0, x1, y1 = face.bbox
        width, height = x1 - x0, y1 - y0
        # the MTCNN box is tight (jaw-line points reach its edges): allow 10% of its size
        inside = ((points[:, 0] > x0 - 0.1 * width) & (points[:, 0] < x1 + 0.1 * width)
                  & (points[:, 1] > y0 - 0.1 * height) & (points[:, 1] < y1 + 0.1 * height))
        assert inside.all(), points[~inside]
        # and they are spread over the face, not collapsed (jaw width > half the box)
        assert np.ptp(points[:, 0]) > 0.5 * width and np.ptp(points[:, 1]) > 0.5 * height
        # eyes (36-47) above the mouth (48-67): original-image pixels, y down
        assert points[36:48, 1].mean() < points[48:68, 1].mean()


@needs_assets
def test_bad_images_are_reported_not_raised(reconstructor):
    blank = np.full((120, 160, 3), 128, np.uint8)
    faces = reconstructor.reconstruct_images([b"not an image", blank, OBAMA], ["junk.jpg", "blank", "obama.jpg"])
    assert [f.face_id for f in faces] == ["obama__f0"]
    status = {row["image"]: row["status"] for row in reconstructor.last_report}
    assert status == {"junk.jpg": "not_an_image", "blank": "no_face", "obama.jpg": "ok"}
    reason = next(row["reason"] for row in reconstructor.last_report if row["image"] == "junk.jpg")
    assert "junk.jpg" in reason


@needs_assets
def test_zero_displacement_reproduces_the_coarse_face(reconstructor):
    generator = reconstructor.generator
    saved = {k: v.clone() for k, v in generator.state_dict().items()}
    try:
        with torch.no_grad():
            for parameter in generator.drconv.parameters():
                parameter.zero_()
        (face,) = reconstructor.reconstruct_images([OBAMA])  # estimation is a cache hit
    finally:
        generator.load_state_dict(saved)
    assert np.abs(face.displacement).max() == 0
    np.testing.assert_array_equal(face.renders["detailed"], face.renders["coarse"])
    # exported normals = the smooth coarse vertex normals baked into UV (model frame)
    renderer = reconstructor.export_renderer
    baked = renderer.bake(torch.from_numpy(face.coarse_normals)[None])[0].numpy()
    valid = face.export_valid & (np.linalg.norm(baked, axis=0) > 0.5)
    baked = baked / np.linalg.norm(baked, axis=0, keepdims=True).clip(1e-8)
    np.testing.assert_allclose(face.detailed_normals[:, valid], baked[:, valid], atol=1e-4)
    positions = renderer.bake(torch.from_numpy(face.coarse_vertices)[None])[0].numpy()
    np.testing.assert_allclose(face.detailed_positions[:, valid], positions[:, valid], atol=1e-4)


def test_torch_threads_is_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


@needs_assets
def test_inference_node_exports_and_reports(params, estimation_cache, tmp_path):
    from facedetail.pipelines.inference.nodes import reconstruct_and_export, summarise_inference

    def broken() -> bytes:
        raise PermissionError("denied")

    partitions = {"obama.jpg": OBAMA.read_bytes, "locked.jpg": broken, "notes.txt": lambda: b"ignored"}
    estimation = {**params["estimation"], "cache_dir": str(estimation_cache)}
    inference = {"output_dir": str(tmp_path / "out"), "batch_size": 2, "chunk_size": 4, "export_size": 64}
    report = reconstruct_and_export(partitions, tiny_checkpoint(), inference, params["face_model"], params["weights"],
                                    params["data_prep"], estimation, params["uv_maps"], "cpu")
    rows = report.set_index("image")
    # every input has its row (issue 11): notes.txt is not an image, by content
    assert set(rows.index) == {"obama.jpg", "locked.jpg", "notes.txt"}
    assert rows.loc["notes.txt", "status"] == "not_an_image"
    assert rows.loc["locked.jpg", "status"] == "unreadable" and "denied" in rows.loc["locked.jpg", "reason"]
    assert rows.loc["obama.jpg", "status"] == "ok" and Path(rows.loc["obama.jpg", "detail_obj"]).is_file()
    metrics = summarise_inference(report)
    assert metrics["faces"]["value"] == 1 and metrics["rows_unreadable"]["value"] == 1
    with pytest.raises(ValueError, match="FACEDETAIL_INFERENCE_IMAGES"):
        reconstruct_and_export({"a.txt": lambda: b""}, tiny_checkpoint(), inference, params["face_model"], params["weights"],
                               params["data_prep"], estimation, params["uv_maps"], "cpu")


# ---------------------------------------------------------------------------------------------- re-targeting


@pytest.fixture(scope="module")
def expression_faces(reconstructor):
    files = [EXPRESSIONS / "3.jpg", EXPRESSIONS / "5.jpg"]
    if not all(f.is_file() for f in files):
        pytest.skip(f"needs {EXPRESSIONS} (3.jpg, 5.jpg)")
    faces = reconstructor.fitter.fit_images(files)
    assert len(faces) >= 2, reconstructor.fitter.last_report
    return [faces[0], faces[-1]]


@needs_assets
def test_retarget_keeps_identity_and_changes_displacement(obama, expression_faces, reconstructor):
    layout = reconstructor.face_model.layout
    exp = layout.slices["exp"]
    first, second = retarget(reconstructor, obama, expression_faces)
    for result, target in zip((first, second), expression_faces):
        rec = result["reconstruction"]
        assert rec.face_id == f"obama__f0__as__{target.face_id}"
        np.testing.assert_allclose(rec.coefficients[exp], target.coefficients[exp], atol=1e-6)
        keep = np.ones(layout.total, bool)
        keep[exp] = False
        np.testing.assert_allclose(rec.coefficients[keep], obama.coefficients[keep], atol=1e-6)
        assert result["displacement"].shape == (UV_SIZE, UV_SIZE)
    # different expressions of the same source face give different details
    valid = obama.uv_valid
    assert not np.allclose(expression_faces[0].coefficients[exp], expression_faces[1].coefficients[exp], atol=0.05)
    difference = np.abs(first["displacement"] - second["displacement"])[valid].mean()
    scale = np.abs(first["displacement"])[valid].mean()
    # measured: difference 7.3e-4 cm, 28% of the mean |d| of 2.6e-3 cm (tiny fresh generator); numerical noise
    # of the same computation is < 1e-5 (checked below)
    assert difference > max(1e-4, 0.1 * scale), (difference, scale)
    # the source's own expression reproduces the source's displacement (same embedding, same expression map)
    (same,) = retarget(reconstructor, obama, [obama])
    np.testing.assert_allclose(same["displacement"], obama.displacement, atol=1e-5)


@needs_assets
def test_expression_sweep_frames(obama, expression_faces, reconstructor):
    frames = expression_sweep(reconstructor, obama, expression_faces[0], n_frames=3)
    assert len(frames) == 3 and all(f.shape == (224, 3 * 224, 3) and f.dtype == np.uint8 for f in frames)
    # starts at the source expression (batched float round-off may move a pixel by one level)
    assert np.abs(frames[0][:, :224].astype(int) - obama.renders["detailed"]).max() <= 1
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1.0
    with pytest.raises(ValueError, match="n_frames"):
        expression_sweep(reconstructor, obama, expression_faces[0], n_frames=1)


@needs_assets
def test_glb_loads_in_trimesh_in_metres_with_texture_and_tangent_normal_map(exported, obama, reconstructor):
    """The GLB: metres (ICT cm / 100), y up, UVs flipped to glTF's top-left origin, base colour + normal map, TANGENT."""
    trimesh = pytest.importorskip("trimesh")
    from facedetail.io.gltf import read_glb_json

    fm = reconstructor.face_model
    scene = trimesh.load(exported["glb"], process=False)
    (mesh,) = scene.geometry.values()
    coarse = trimesh.load(exported["coarse_obj"], process=False)  # split at UV seams like the GLB
    assert mesh.vertices.shape == coarse.vertices.shape and mesh.faces.shape == (len(fm.triangles), 3)
    extent_m = np.ptp(mesh.vertices, axis=0)
    np.testing.assert_allclose(extent_m, np.ptp(obama.coarse_vertices, axis=0) / 100.0, rtol=1e-5)
    assert 0.1 < extent_m[1] < 0.4  # a head is 10-40 cm tall, in metres
    material = mesh.visual.material
    assert mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert material.baseColorTexture is not None and material.baseColorTexture.size == (EXPORT_SIZE, EXPORT_SIZE)
    assert material.normalTexture is not None and material.normalTexture.size == (EXPORT_SIZE, EXPORT_SIZE)
    document = read_glb_json(exported["glb"])
    attributes = document["meshes"][0]["primitives"][0]["attributes"]
    assert {"POSITION", "NORMAL", "TEXCOORD_0", "TANGENT"} <= set(attributes)
    assert document["accessors"][attributes["TANGENT"]]["type"] == "VEC4"
    assert document["asset"]["extras"]["units"] == "m"
    # tangent-space map: mostly pointing out of the surface (blue), unlike the object-space map of a face seen from +z
    tangent = np.asarray(material.normalTexture.convert("RGB"), np.float64) / 255.0 * 2 - 1
    valid = obama.export_valid
    assert np.median(tangent[valid][:, 2]) > 0.95
    obj_space = np.asarray(Image.open(exported["normal_object_png"]).convert("RGB"), np.float64) / 255.0 * 2 - 1
    assert np.mean(np.abs(obj_space[valid][:, 0]) > 0.5) > 0.1  # object space: side of the face points sideways


@needs_assets
def test_mtl_references_texture_normal_and_displacement_maps(exported):
    mtl = Path(exported["coarse_mtl"]).read_text().splitlines()
    entries = {line.split()[0]: line.split()[-1] for line in mtl if line and not line.startswith("#")}
    assert entries["map_Kd"] == "obama__f0_texture.png"
    assert entries["norm"] == entries["map_Bump"] == "obama__f0_normal_tangent_opengl.png"
    assert entries["disp"] == "obama__f0_displacement.png"
    for name in (entries["map_Kd"], entries["norm"], entries["disp"]):
        assert (Path(exported["coarse_mtl"]).parent / name).is_file()


@needs_assets
def test_export_units_scale_obj_and_displacement(obama, reconstructor, exported, tmp_path):
    in_m = export_face(obama, tmp_path, reconstructor.face_model, units="m")
    header = Path(in_m["coarse_obj"]).read_text().splitlines()[:6]
    assert header[1] == "# units: m" and header[4].startswith(f"# {reconstructor.face_model.n_vertices} vertices")
    assert "import with scale 0.01" in Path(exported["coarse_obj"]).read_text().splitlines()[1]
    trimesh = pytest.importorskip("trimesh")
    cm = trimesh.load(exported["coarse_obj"], process=False, maintain_order=True).vertices
    m = trimesh.load(in_m["coarse_obj"], process=False, maintain_order=True).vertices
    np.testing.assert_allclose(m, cm / 100.0, atol=2e-6)
    np.testing.assert_allclose(read_displacement_png16(in_m["displacement_png"]),
                               read_displacement_png16(exported["displacement_png"]) / 100.0, atol=1e-7)
    assert json.loads(Path(in_m["json"]).read_text())["units"] == "m"
    with pytest.raises(ValueError, match="units must be one of"):
        export_face(obama, tmp_path, reconstructor.face_model, units="inch")


@needs_assets
def test_control_characters_in_a_photo_name_cannot_inject_obj_lines(obama, reconstructor, tmp_path):
    """A photo called 'my face\nmtllib evil.mtl\nv 0 0 0.jpg' gives safe names and no injected OBJ/MTL line."""
    from dataclasses import replace

    evil = replace(obama, face_id="my face\nmtllib evil.mtl\nv 0 0 0\r__f0")
    written = export_face(evil, tmp_path, reconstructor.face_model)
    for path in written.values():
        name = Path(path).name
        assert name.isprintable() and " " not in name and Path(path).parent == tmp_path
    coarse = Path(written["coarse_obj"]).read_text().splitlines()
    assert [line for line in coarse if line.startswith("mtllib")] == [f"mtllib {Path(written['coarse_mtl']).name}"]
    n_v = sum(line.startswith("v ") for line in coarse)
    assert n_v == reconstructor.face_model.n_vertices  # no injected vertex
    assert {line.split()[0] for line in coarse if line} == {"#", "mtllib", "v", "vt", "vn", "usemtl", "f"}
    assert all(line.startswith("#") for line in coarse[:6])  # the face id in the header comment stays one line
    mtl = Path(written["coarse_mtl"]).read_text().splitlines()
    assert sum(line.startswith("newmtl") for line in mtl) == 1 and not any(line.startswith("mtllib") for line in mtl)
    assert json.loads(Path(written["json"]).read_text())["face_id"] == evil.face_id  # the JSON keeps the real id


@needs_assets
def test_pymeshlab_opens_the_obj_and_glb_with_uvs_and_textures(exported, reconstructor):
    pymeshlab = pytest.importorskip("pymeshlab", reason="pymeshlab is in the dev extra: pip install -e '.[dev]'")
    fm = reconstructor.face_model
    meshset = pymeshlab.MeshSet()
    meshset.load_new_mesh(exported["coarse_obj"])
    mesh = meshset.current_mesh()
    assert mesh.vertex_number() == fm.n_vertices and mesh.face_number() == len(fm.triangles)
    assert mesh.has_wedge_tex_coord() and mesh.textures() and "obama__f0_texture.png" in str(mesh.textures())
    meshset.load_new_mesh(exported["glb"])
    glb = meshset.current_mesh()
    assert glb.face_number() == len(fm.triangles) and (glb.has_vertex_tex_coord() or glb.has_wedge_tex_coord())
    extent = glb.bounding_box().dim_y()
    assert 0.1 < extent < 0.4  # metres


BLENDER_CHECK = r"""
import sys, json, bpy
import numpy
if not hasattr(numpy, "bool"):  # Debian's Blender 3.4 glTF importer uses np.bool, gone from numpy 1.24-1.26
    numpy.bool = bool
glb, obj, out = sys.argv[sys.argv.index("--") + 1:]
bpy.ops.wm.read_factory_settings(use_empty=True)
report = {}
for key, path in (("glb", glb), ("obj", obj)):
    before = set(bpy.data.objects)
    if key == "glb":
        bpy.ops.import_scene.gltf(filepath=path)
    elif hasattr(bpy.ops.wm, "obj_import"):
        bpy.ops.wm.obj_import(filepath=path)
    else:
        bpy.ops.import_scene.obj(filepath=path)
    (ob,) = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    mesh = ob.data
    nodes = [n for m in mesh.materials if m and m.use_nodes for n in m.node_tree.nodes]
    report[key] = {
        "vertices": len(mesh.vertices), "faces": len(mesh.polygons), "uv_layers": len(mesh.uv_layers),
        "dimensions": list(ob.dimensions),
        "images": sorted(n.image.name for n in nodes if n.type == "TEX_IMAGE" and n.image),
        "normal_map_nodes": sum(n.type == "NORMAL_MAP" for n in nodes),
    }
json.dump(report, open(out, "w"))
"""


@needs_assets
def test_blender_imports_the_glb_and_obj_with_uvs_and_maps(exported, reconstructor, tmp_path):
    """Runs only where Debian's `blender` package (or any `blender` on PATH) is installed."""
    import shutil
    import subprocess

    blender = shutil.which("blender")
    if blender is None:
        pytest.skip("Blender is not installed (`apt-get install blender`); the GLB/OBJ Blender import check needs it")
    script = tmp_path / "check.py"
    script.write_text(BLENDER_CHECK)
    out = tmp_path / "report.json"
    # --python-exit-code: an error in the check script fails the run (Blender exits 0 otherwise)
    run = subprocess.run([blender, "-b", "--factory-startup", "--python-exit-code", "1", "--python", str(script), "--",
                          exported["glb"], exported["coarse_obj"], str(out)], timeout=300, capture_output=True, text=True)
    assert run.returncode == 0 and out.is_file(), (run.stdout + run.stderr)[-3000:]
    report = json.loads(out.read_text())
    n_faces = len(reconstructor.face_model.triangles)
    for key in ("glb", "obj"):
        assert report[key]["faces"] == n_faces and report[key]["uv_layers"] >= 1, report
        assert report[key]["normal_map_nodes"] >= 1, report  # the tangent normal map is wired as a Normal Map node
        assert len(report[key]["images"]) >= 2, report  # base colour + normal map
    assert 0.1 < report["glb"]["dimensions"][2] < 0.4  # Blender is Z up: the glTF +Y (metres) becomes Z
    assert 10 < max(report["obj"]["dimensions"]) < 40  # OBJ in cm, imported unscaled
