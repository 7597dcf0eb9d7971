"""One implementation per step: a photo through the pipelines' node functions (data_prep → estimation → uv_maps,
called directly, no Kedro session) and through the inference engine gives the same face ids, the same estimates
and bit-identical generator inputs (float16 expression maps, uint8 textures, bool validity).

Both sides share one estimation cache folder, as a user's ``kedro run`` and ``facedetail reconstruct`` do: the
engine's estimates of the same crops are cache hits, so this test checks that the two sides make the SAME crops
(detect + align), the SAME face ids, attach the estimates to the same faces and build the SAME generator inputs.
Two photos whose names collide (``x/y.jpg`` and ``x__y.jpg``) must still get distinct face ids.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facedetail.engine.checkpoint import make_detail_checkpoint
from facedetail.engine.reconstructor import Reconstructor
from facedetail.models.detail_model import DetailGenerator
from facedetail.data.shards import FaceShards
from facedetail.pipelines.data_prep.nodes import detect_and_align_faces
from facedetail.pipelines.estimation.nodes import detect_landmarks, fit_face_coefficients, make_face_masks
from facedetail.pipelines.uv_maps.nodes import build_uv_maps
from tests.conftest import CONF, OBAMA, TWO_PEOPLE, needs_assets

pytestmark = [needs_assets, pytest.mark.slow]

UV_SIZE = 32
FAST_FITTING = {"rigid_steps": 30, "landmark_steps": 80, "photometric_steps": 15}
TINY_CONFIG = {"ngf": 8, "num_downs": 3, "embedding_channels": 4, "regions": 2, "filter_hidden": 8, "max_displacement": 0.3}
#: Two photos whose names give the same stem ``x__y`` (the old data_prep rule gave both faces the id ``x__y__f0``).
PHOTOS = {"x/y.jpg": OBAMA, "x__y.jpg": TWO_PEOPLE}


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> dict:
    from facedetail.cli import load_project_config

    parameters, _, _ = load_project_config(str(CONF))
    parameters["device"] = "cpu"
    estimation = parameters["estimation"]
    estimation["fitting"] = {**(estimation.get("fitting") or {}), **FAST_FITTING}
    estimation.update(cache=True, cache_dir=str(tmp_path_factory.mktemp("estimation_cache")), facenet_embeddings=False)
    parameters["uv_maps"] = {**parameters["uv_maps"], "uv_size": UV_SIZE}
    return parameters


def _stacked(data: FaceShards) -> dict[str, np.ndarray]:
    """Every face of a sharded dataset, its fields stacked (``face_ids`` from ``face_id``)."""
    faces = list(data.iter_faces())
    keys = [k for k in faces[0] if k not in ("__key__", "status", "reason", "overlay_jpeg")]
    out = {k: np.stack([np.asarray(f[k]) for f in faces]) for k in keys}
    out["face_ids"] = out.pop("face_id")
    return out


@pytest.fixture(scope="module")
def pipeline(params, tmp_path_factory) -> dict:
    """What the pipelines' node functions make of :data:`PHOTOS` (files in a raw folder), stacked per field."""
    from kedro_datasets.partitions import PartitionedDataset

    torch.set_num_threads(1)
    raw = tmp_path_factory.mktemp("raw")
    for name, path in PHOTOS.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(path.read_bytes())
    partitions = PartitionedDataset(path=str(raw), dataset="facedetail.datasets.RawBytesDataset").load()
    execution = {"scheduler": "synchronous", "work_dir": str(tmp_path_factory.mktemp("work"))}
    estimation, weights, face_model = params["estimation"], params["weights"], params["face_model"]
    manifest, aligned = detect_and_align_faces(partitions, params["data_prep"], "cpu", execution)
    landmarks = detect_landmarks(aligned, estimation, weights, "cpu", execution)
    masks = make_face_masks(aligned, landmarks, estimation, weights, "cpu", execution)
    estimates, report, _ = fit_face_coefficients(aligned, landmarks, masks, estimation, face_model, weights, "cpu", execution)
    uv_maps = build_uv_maps(aligned, estimates, params["uv_maps"], face_model, "cpu", execution)
    uv = _stacked(uv_maps)
    uv["expression_valid"] = uv["expression_valid"][0]
    renamed = {"expression_map": "expression_maps", "uv_texture": "uv_textures"}
    uv = {renamed.get(k, k): v for k, v in uv.items()}
    aligned_arrays = _stacked(aligned)
    aligned_arrays["images"], aligned_arrays["source_images"] = aligned_arrays.pop("image"), aligned_arrays.pop("source_image")
    return {"manifest": manifest, "aligned": aligned_arrays, "estimates": _stacked(estimates), "report": report, "uv_maps": uv}


@pytest.fixture(scope="module")
def engine(params, pipeline):
    """The engine's fitted faces of the same photos (given as bytes with the same names) and their generator inputs."""
    torch.manual_seed(0)
    checkpoint = make_detail_checkpoint(DetailGenerator.from_config(TINY_CONFIG), UV_SIZE, "ict", 0)
    with Reconstructor.from_params(checkpoint, params, "cpu") as reconstructor:
        faces = reconstructor.fitter.fit_images([path.read_bytes() for path in PHOTOS.values()], list(PHOTOS))
        return {"faces": faces, "inputs": reconstructor.generator_inputs(faces)}


def test_colliding_names_get_distinct_face_ids(pipeline, engine):
    ids = pipeline["aligned"]["face_ids"].tolist()
    assert ids == ["x__y_jpg__f0", "x__y_jpg_1__f0", "x__y_jpg_1__f1"]
    assert [face.face_id for face in engine["faces"]] == ids
    source = dict(zip(ids, pipeline["aligned"]["source_images"].tolist()))
    assert source == {"x__y_jpg__f0": "x/y.jpg", "x__y_jpg_1__f0": "x__y.jpg", "x__y_jpg_1__f1": "x__y.jpg"}


def test_estimates_attach_to_the_right_face(pipeline, engine):
    estimates, manifest = pipeline["estimates"], pipeline["manifest"]
    assert estimates["face_ids"].tolist() == pipeline["aligned"]["face_ids"].tolist()
    box_of = {row.face_id: np.asarray(row.bbox) for row in manifest.itertuples() if row.face_id}
    for face_id, landmarks in zip(estimates["face_ids"].tolist(), estimates["fitted_landmarks68_original"]):
        x0, y0, x1, y1 = box_of[face_id]
        centre = landmarks.mean(0)  # the fitted face lies in ITS photo's detection box
        assert x0 < centre[0] < x1 and y0 < centre[1] < y1, face_id
    row = {f: i for i, f in enumerate(estimates["face_ids"].tolist())}
    for face in engine["faces"]:
        np.testing.assert_array_equal(face.coefficients, estimates["coefficients"][row[face.face_id]].astype(np.float32))


def test_pipeline_and_engine_build_bit_identical_generator_inputs(pipeline, engine):
    uv_maps, inputs = pipeline["uv_maps"], engine["inputs"]
    order = [uv_maps["face_ids"].tolist().index(face.face_id) for face in engine["faces"]]
    aligned_row = {f: i for i, f in enumerate(pipeline["aligned"]["face_ids"].tolist())}
    for face in engine["faces"]:  # the same crops (one detect-and-align)
        np.testing.assert_array_equal(face.aligned, pipeline["aligned"]["images"][aligned_row[face.face_id]])
    for key, dtype in (("expression_maps", np.float16), ("uv_textures", np.uint8), ("texture_valid", np.bool_)):
        assert inputs[key].dtype == uv_maps[key].dtype == dtype, key
        np.testing.assert_array_equal(inputs[key], uv_maps[key][order], err_msg=key)
    np.testing.assert_array_equal(inputs["expression_valid"], uv_maps["expression_valid"])
