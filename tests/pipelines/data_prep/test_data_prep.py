"""data_prep: Deng et al. 5-point alignment (numerically), MTCNN detection on real photos, every bad input,
and a full ``kedro run --pipeline=data_prep`` through a KedroSession with MLflow tracking in a temp dir."""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facedetail.detect.align import (
    STANDARD_LANDMARKS_3D,
    align_face,
    aligned_template_landmarks,
    aligned_to_original,
    compute_trans_params,
    fit_scale_translation,
    original_to_aligned,
)
from tests.conftest import PORTRAITS, REPO_ROOT

os.environ.setdefault("DO_NOT_TRACK", "1")



@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """MTCNN on 2 shared cores is several times faster single-threaded (no oversubscription)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------- alignment
def _synthetic_face(width: int, height: int, scale: float, centre_up: tuple[float, float], radius: float):
    """Black image with a bright disc at each of the 5 points of a frontal template face.

    The points are ``scale * X[:, :2] + centre`` in the y-up frame (so the least-squares fit is exact).
    Returns (image, points in image pixels x right / y down).
    """
    points_up = scale * STANDARD_LANDMARKS_3D[:, :2] + np.array(centre_up)
    points = np.stack([points_up[:, 0], height - 1 - points_up[:, 1]], axis=1)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width), dtype=np.float32)
    for x, y in points:
        image = np.maximum(image, np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * (radius / 2) ** 2)))
    return np.repeat((image * 255).round().astype(np.uint8)[..., None], 3, axis=2), points


def _blob_centroids(image: np.ndarray, around: np.ndarray, window: int = 9) -> np.ndarray:
    """Intensity-weighted centroid of the image in a window around each expected point."""
    gray = image[..., 0].astype(np.float64)
    centroids = []
    for x, y in around:
        x0, y0 = int(round(x)) - window, int(round(y)) - window
        patch = gray[y0 : y0 + 2 * window + 1, x0 : x0 + 2 * window + 1]
        ys, xs = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]]
        centroids.append([x0 + (patch * xs).sum() / patch.sum(), y0 + (patch * ys).sum() / patch.sum()])
    return np.array(centroids)


@pytest.mark.parametrize(
    "width,height,scale,centre,radius",
    [
        (640, 480, 150.0, (300.0, 260.0), 6.0),  # upscaled crop (s = 0.68)
        (2600, 2000, 620.0, (1500.0, 900.0), 24.0),  # big face: area pre-filter path (s = 0.16)
        (300, 260, 60.0, (140.0, 120.0), 2.5),  # small face: strong upscale (s = 1.7)
    ],
)
def test_synthetic_face_lands_on_the_template(width, height, scale, centre, radius):
    image, points = _synthetic_face(width, height, scale, centre, radius)
    aligned = align_face(image, points)
    template = aligned_template_landmarks()
    assert aligned.image.shape == (224, 224, 3) and aligned.image.dtype == np.uint8
    # the fit recovers the synthetic scale and centre (trans_params = [w0, h0, 102/s, tx, ty])
    np.testing.assert_allclose(aligned.trans_params, [width, height, 102.0 / scale, *centre], rtol=1e-5)
    # returned points and the pixels themselves are within 1 px of the template
    assert np.abs(aligned.landmarks5 - template).max() < 1.0
    assert np.abs(_blob_centroids(aligned.image, template) - template).max() < 1.0
    # and the inverse maps the aligned points back onto the original points
    np.testing.assert_allclose(aligned_to_original(aligned.landmarks5, aligned.trans_params), points, atol=1e-3)


def test_template_positions_by_hand():
    template = aligned_template_landmarks()
    # left eye: x = 112 + 102 * -0.31148657, y = 111 - 102 * 0.29036078
    np.testing.assert_allclose(template[0], [80.22837, 81.38320], atol=1e-4)
    # nose tip: x = 112 + 102 * 0.0032535, y = 111 + 102 * 0.04617932
    np.testing.assert_allclose(template[2], [112.33186, 115.71029], atol=1e-4)


def test_pos_fit_recovers_an_affine_camera_exactly():
    rng = np.random.default_rng(3)
    camera = rng.normal(size=(2, 3))
    translation = np.array([120.0, -40.0])
    points = STANDARD_LANDMARKS_3D @ camera.T + translation
    scale, fitted_translation = fit_scale_translation(points)
    expected_scale = 0.5 * (np.linalg.norm(camera[0]) + np.linalg.norm(camera[1]))
    assert scale == pytest.approx(expected_scale, rel=1e-9)
    np.testing.assert_allclose(fitted_translation, translation, atol=1e-9)


def test_mapping_follows_deep3dfacerecon_convention_and_inverts_exactly():
    rng = np.random.default_rng(0)
    landmarks = np.array([[445.3, 214.7], [551.7, 214.2], [497.7, 277.7], [435.6, 324.8], [557.1, 320.5]])
    width, height = 910, 1137
    params = compute_trans_params(landmarks, (width, height))
    w0, h0, s, tx, ty = params
    # Deep3DFaceRecon: y-up landmarks, resize to int(w0 s) x int(h0 s), shift by the centre, then flip rows
    up = np.stack([landmarks[:, 0], h0 - 1 - landmarks[:, 1]], axis=1)
    w, h = int(w0 * s), int(h0 * s)
    deng_up = (up - [tx, ty] + [w0 / 2, h0 / 2]) * s - [w / 2 - 112, h / 2 - 112]
    deng = np.stack([deng_up[:, 0], 223 - deng_up[:, 1]], axis=1)
    np.testing.assert_allclose(original_to_aligned(landmarks, params), deng, atol=1e-9)
    points = rng.uniform(-500, 1500, size=(50, 2))
    np.testing.assert_allclose(aligned_to_original(original_to_aligned(points, params), params), points, atol=1e-9)
    with pytest.raises(ValueError, match="trans_params"):
        original_to_aligned(points, params[:4])
    with pytest.raises(ValueError, match="degenerate"):
        compute_trans_params(np.zeros((5, 2)), (100, 100))


# ----------------------------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def detector():
    from facedetail.detect.mtcnn import MtcnnFaceDetector

    return MtcnnFaceDetector("cpu", min_face_size=40, min_probability=0.95, max_detection_side=1600)


def _portrait(name: str) -> np.ndarray:
    path = PORTRAITS / name
    if not path.is_file():
        pytest.skip(f"shared asset {path} is missing")
    from facedetail.io.images import load_image_rgb

    return load_image_rgb(path)


def _check_plausible_face(face) -> None:
    x0, y0, x1, y1 = face.bbox
    points = face.landmarks5
    assert np.all((points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1))
    assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]  # left before right
    assert max(points[0, 1], points[1, 1]) < points[2, 1] < min(points[3, 1], points[4, 1])  # eyes, nose, mouth


def test_detects_obama_once_and_two_people_left_to_right(detector):
    obama = detector.detect(_portrait("obama.jpg"))
    assert len(obama.faces) == 1 and obama.faces[0].score > 0.99
    _check_plausible_face(obama.faces[0])
    assert obama.faces[0].size > 200  # a portrait: the face is large
    pair = detector.detect(_portrait("two_people.jpg"))
    assert len(pair.faces) == 2
    centres = [0.5 * (face.bbox[0] + face.bbox[2]) for face in pair.faces]
    assert centres[0] < centres[1]
    for face in pair.faces:
        _check_plausible_face(face)


def test_downscaled_detection_maps_back_to_full_resolution(detector):
    from facedetail.detect.mtcnn import MtcnnFaceDetector

    image = _portrait("obama.jpg")
    full = detector.detect(image).faces[0]
    small = MtcnnFaceDetector("cpu", max_detection_side=400).detect(image)
    assert small.detection_scale < 0.4
    face = small.faces[0]
    eye_distance = np.linalg.norm(full.landmarks5[1] - full.landmarks5[0])
    assert np.abs(face.landmarks5 - full.landmarks5).max() < 0.08 * eye_distance


# ----------------------------------------------------------------------------------------- bad inputs, e2e
def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()[..., :3].copy()


def _jpeg(image: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


HUGE_OFFSET = np.array([3000.0, 1500.0])
HUGE_FACTOR = 4.0


def _write_raw_folder(folder: Path) -> None:
    """Every awkward input of issue 2 in one folder (file name -> expected manifest status below)."""
    folder.mkdir(parents=True)
    astronaut = _astronaut()
    (folder / "astronaut.jpg").write_bytes(_jpeg(astronaut))
    (folder / "MIRRORED.JPEG").write_bytes(_jpeg(astronaut[:, ::-1].copy()))  # upper-case extension
    pair = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    (folder / "pair.png").write_bytes(_png(Image.fromarray(pair)))
    (folder / "gray.png").write_bytes(_png(Image.fromarray(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY))))
    (folder / "deep16.png").write_bytes(_png(Image.fromarray(astronaut[..., 1].astype(np.uint16) * 257)))
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:, :80, 3] = 0  # transparent left margin
    (folder / "alpha.png").write_bytes(_png(Image.fromarray(rgba, "RGBA")))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 deg counter-clockwise; viewers rotate it back clockwise
    (folder / "exif_rotated.jpg").write_bytes(_jpeg(np.rot90(astronaut, 1).copy(), exif=exif))
    huge = np.full((6000, 8000, 3), 90, dtype=np.uint8)
    big_face = cv2.resize(astronaut, None, fx=HUGE_FACTOR, fy=HUGE_FACTOR, interpolation=cv2.INTER_CUBIC)
    y, x = int(HUGE_OFFSET[1]), int(HUGE_OFFSET[0])
    huge[y : y + big_face.shape[0], x : x + big_face.shape[1]] = big_face
    (folder / "huge.jpg").write_bytes(_jpeg(huge))
    full = _jpeg(astronaut)
    (folder / "corrupt.jpg").write_bytes(full[: len(full) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file with an image extension\n")
    ys, xs = np.mgrid[0:300, 0:400]
    (folder / "no_face.png").write_bytes(_png(Image.fromarray(((xs + ys) % 256).astype(np.uint8))))
    (folder / "tiny.bmp").write_bytes(_png(Image.fromarray(astronaut[::32, ::32].copy())))  # PNG bytes, .bmp name
    (folder / "readme.txt").write_text("not an image: it still gets its row (images are known by content)\n")


EXPECTED_STATUS = {
    "astronaut.jpg": "ok",
    "MIRRORED.JPEG": "ok",
    "pair.png": "ok",
    "gray.png": "ok",
    "deep16.png": "ok",
    "alpha.png": "ok",
    "exif_rotated.jpg": "ok",
    "huge.jpg": "ok",
    "corrupt.jpg": "unreadable",
    "empty.png": "empty",
    "notes.jpg": "not_an_image",
    "no_face.png": "no_face",
    "tiny.bmp": "too_small",
    "readme.txt": "not_an_image",
}


@pytest.fixture(scope="module")
def kedro_run(tmp_path_factory):
    """Run ``data_prep`` through a real KedroSession (kedro-mlflow hooks included) in a temp project."""
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = tmp_path_factory.mktemp("project")
    raw = project / "raw_faces"
    _write_raw_folder(raw)
    (project / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    (project / "src").mkdir()  # bootstrap_project wants the source dir; the package itself is installed
    tracking_uri = f"sqlite:///{project / 'mlruns.db'}"
    patch = pytest.MonkeyPatch()
    patch.chdir(project)
    patch.setenv("DO_NOT_TRACK", "1")
    patch.setenv("FACEDETAIL_RAW_FACES", str(raw))
    patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    patch.setenv("FACEDETAIL_DEVICE", "cpu")
    try:
        bootstrap_project(project)
        # a runtime override (as `kedro run --params`) keeps the 8000x6000 detection quick on 2 busy cores
        overrides = {"data_prep": {"detection": {"max_detection_side": 1024}}}
        with KedroSession.create(
            project_path=project, conf_source=str(REPO_ROOT / "conf"), save_on_close=False, runtime_params=overrides
        ) as session:
            session.run(pipeline_names=["data_prep"])
        yield project, tracking_uri
    finally:
        while mlflow.active_run() is not None:  # kedro-mlflow may leave the session's run active in-process
            mlflow.end_run()
        patch.undo()


def _latest(folder: Path, name: str) -> Path:
    versions = sorted((folder / name).iterdir())
    assert len(versions) == 1, versions  # one versioned save per run
    return versions[-1] / name


@pytest.mark.slow
def test_kedro_run_writes_manifest_rows_with_reasons(kedro_run):
    project, _ = kedro_run
    manifest = pd.read_parquet(_latest(project / "data" / "03_primary", "face_manifest.parquet"))
    assert set(manifest["image"]) == set(EXPECTED_STATUS)  # readme.txt has its row too: nothing is lost
    first_rows = manifest.drop_duplicates("image").set_index("image")
    assert first_rows["status"].to_dict() == EXPECTED_STATUS
    assert (manifest["reason"].str.len() > 0).all()
    assert "truncated" in first_rows.loc["corrupt.jpg", "reason"]
    assert "not an image" in first_rows.loc["notes.jpg", "reason"]
    assert "empty" in first_rows.loc["empty.png", "reason"]
    faces = manifest[manifest["status"] == "ok"].set_index("face_id")
    assert list(manifest.loc[manifest["image"] == "pair.png", "face_id"]) == ["pair__f0", "pair__f1"]
    assert faces.loc["gray__f0", "grayscale"] and not faces.loc["astronaut__f0", "grayscale"]
    assert faces.loc["deep16__f0", "bit_depth"] == 16
    assert faces.loc["alpha__f0", "had_alpha"]
    assert faces.loc["exif_rotated__f0", "exif_transposed"]
    assert (faces.loc["exif_rotated__f0", ["image_width", "image_height"]] == [512, 512]).all()
    assert tuple(faces.loc["huge__f0", ["image_width", "image_height"]]) == (8000, 6000)
    reference = np.reshape(faces.loc["astronaut__f0", "landmarks5"], (5, 2))
    # EXIF-rotated copy is upright again: same landmarks as the original
    assert np.abs(np.reshape(faces.loc["exif_rotated__f0", "landmarks5"], (5, 2)) - reference).max() < 4.0
    # huge image: detected downscaled, landmarks reported in full-resolution pixels
    huge_points = np.reshape(faces.loc["huge__f0", "landmarks5"], (5, 2))
    expected = (reference + 0.5) * HUGE_FACTOR - 0.5 + HUGE_OFFSET
    assert faces.loc["huge__f0", "detection_scale"] == pytest.approx(1024 / 8000, rel=1e-3)
    assert np.abs(huge_points - expected).max() < 4.0 * HUGE_FACTOR
    for _, row in faces.iterrows():
        assert len(row["bbox"]) == 4 and len(row["landmarks5"]) == 10 and len(row["trans_params"]) == 5
        assert len(row["sha256"]) == 64 and 0.95 <= row["score"] <= 1.0


def _aligned_arrays(project: Path) -> dict[str, np.ndarray]:
    """The latest ``aligned_faces`` version's faces (all shards, in order) stacked per field."""
    from facedetail.data.shards import read_shard

    folder = _latest(project / "data" / "03_primary", "aligned_faces")
    faces = [face for shard in sorted(folder.glob("shard-*.tar")) for face in read_shard(shard)]
    fields = ("face_id", "image", "landmarks5", "landmarks5_original", "trans_params", "face_sha256")
    return {("face_ids" if k == "face_id" else "images" if k == "image" else k): np.stack([np.asarray(f[k]) for f in faces]) for k in fields}


@pytest.mark.slow
def test_kedro_run_writes_aligned_shards(kedro_run):
    project, _ = kedro_run
    arrays = _aligned_arrays(project)
    count = len(arrays["face_ids"])
    assert count == 9  # 8 ok images, one of them with two faces
    assert arrays["images"].shape == (count, 224, 224, 3) and arrays["images"].dtype == np.uint8
    assert arrays["landmarks5"].shape == arrays["landmarks5_original"].shape == (count, 5, 2)
    assert arrays["trans_params"].shape == (count, 5) and arrays["trans_params"].dtype == np.float32
    for index in range(count):
        mapped = original_to_aligned(arrays["landmarks5_original"][index], arrays["trans_params"][index])
        np.testing.assert_allclose(mapped, arrays["landmarks5"][index], atol=1e-3)
    import hashlib

    assert arrays["face_sha256"][0] == hashlib.sha256(arrays["images"][0].tobytes()).hexdigest()
    ids = list(arrays["face_ids"])
    # the huge photo is cropped from FULL resolution: the crop equals the pasted astronaut warped by the same
    # transform (aligned = s * huge_px + c, huge_px = 4 * (astronaut_px + 0.5) - 0.5 + offset)
    huge_index = ids.index("huge__f0")
    scale = float(arrays["trans_params"][huge_index][2])
    offset = original_to_aligned(np.zeros((1, 2)), arrays["trans_params"][huge_index])[0]
    shift = scale * (HUGE_OFFSET + 0.5 * HUGE_FACTOR - 0.5) + offset
    matrix = np.array([[HUGE_FACTOR * scale, 0, shift[0]], [0, HUGE_FACTOR * scale, shift[1]]])
    expected = cv2.warpAffine(_astronaut(), matrix, (224, 224), flags=cv2.INTER_LINEAR)
    difference = np.abs(arrays["images"][huge_index].astype(float) - expected.astype(float))
    # measured 1.6 (JPEG noise); a crop taken from the 1024-px detection image would differ by ~3.9
    assert difference[8:-8, 8:-8].mean() < 2.8, difference.mean()
    # aligned points of every face sit near the template (frontal faces)
    assert np.abs(arrays["landmarks5"] - aligned_template_landmarks()).max() < 20.0


@pytest.mark.slow
def test_kedro_run_is_tracked_in_mlflow(kedro_run):
    from mlflow.tracking import MlflowClient

    project, tracking_uri = kedro_run
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("facedetail")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["data_prep.alignment.rescale_factor"] == "102.0"
    assert run.data.params["data_prep.detection.min_face_size"] == "40"
    assert run.data.params["data_prep.detection.max_detection_side"] == "1024"  # the runtime override
    metrics = run.data.metrics
    assert metrics["data_prep.images"] == len(EXPECTED_STATUS)
    assert metrics["data_prep.faces"] == 9
    assert metrics["data_prep.images_ok"] == 8 and metrics["data_prep.images_unreadable"] == 1
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "data_prep")}
    assert artifacts == {"data_prep/face_manifest.csv", "data_prep/data_prep_contact_sheet.png"}
    sheet = np.asarray(Image.open(project / "data" / "08_reporting" / "data_prep" / "data_prep_contact_sheet.png"))
    assert sheet.ndim == 3 and sheet.shape[0] >= 3 * 160


def test_zero_image_folder_is_a_clear_error(tmp_path):
    from kedro_datasets.partitions import PartitionedDataset

    from facedetail.pipelines.data_prep.nodes import detect_and_align_faces

    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "LICENSES.md").write_text("no pictures here")
    partitions = PartitionedDataset(path=str(folder), dataset="facedetail.datasets.RawBytesDataset").load()
    params = {"image_extensions": [".jpg", ".png"]}
    with pytest.raises(ValueError, match="no images in .*faces"):
        detect_and_align_faces(partitions, params, "cpu", {"scheduler": "synchronous", "work_dir": str(tmp_path / "work")})
    with pytest.raises(ValueError, match="no images"):
        detect_and_align_faces({}, params, "cpu", {"scheduler": "synchronous", "work_dir": str(tmp_path / "work")})


def test_face_ids_are_unique_for_same_stems():
    from facedetail.pipelines.data_prep.nodes import make_face_ids

    ids = make_face_ids(["a.jpg", "a.PNG", "sub/b.jpg", "c.jpeg"])
    assert ids == {"a.jpg": "a_jpg", "a.PNG": "a_png", "sub/b.jpg": "sub__b", "c.jpeg": "c"}


def test_small_folders_are_split_so_every_worker_gets_a_shard():
    from facedetail.data.execution import worker_count
    from facedetail.pipelines.data_prep.nodes import images_per_shard

    assert images_per_shard(40, 256, 2) == 20  # the 40-photo check: two shards for two workers
    assert images_per_shard(41, 256, 2) == 21
    assert images_per_shard(640, 256, 2) == 256  # large folders keep shard_size
    assert images_per_shard(5, 2, 1) == 2
    assert images_per_shard(1, 256, 8) == 1 and images_per_shard(0, 256, 2) == 1
    assert worker_count({"scheduler": "synchronous"}) == 1
    assert worker_count({"scheduler": "local", "n_workers": 3}) == 3
    assert worker_count({"scheduler": "local", "n_workers": None}) == (os.cpu_count() or 1)
