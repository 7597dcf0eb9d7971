"""The per-face chain (data_prep -> estimation -> uv_maps) on an in-memory catalog, shard by shard.

Runs the registry's ``preprocess`` pipeline with Kedro's SequentialRunner on the built-in sample
split into 2-image shards (3 shards), tasks in-process, then checks that every stage's shard k
holds the same faces in the same order, the arrays' shapes and dtypes, and that a rerun computes
nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from facedetail.data.shards import read_shard
from facedetail.datasets import RawBytesDataset

REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE = REPO_ROOT / "data" / "01_raw" / "faces"
ICT = REPO_ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
pytestmark = pytest.mark.skipif(not ICT.is_file(), reason=f"ICT-FaceKit model not found at {ICT}")
STAGES = ["aligned_faces", "face_landmarks", "face_masks", "facenet_embeddings", "face_coefficients", "uv_maps"]


def _params(tmp_path: Path) -> dict:
    from kedro.config import OmegaConfigLoader

    from facedetail.settings import CONFIG_LOADER_ARGS

    params = dict(OmegaConfigLoader(conf_source=str(REPO_ROOT / "conf"), **CONFIG_LOADER_ARGS)["parameters"])
    params["data_prep"]["shard_size"] = 2
    params["estimation"].update(cache_dir=str(tmp_path / "cache"), fitting={"rigid_steps": 15, "landmark_steps": 30, "photometric_steps": 5})
    params["uv_maps"]["uv_size"] = 32
    params["face_model"] = {"kind": "ict", "ict_path": str(ICT)}
    params["weights"] = {"bisenet": "", "deng_regressor": "", "facenet": "", "facenet_cache": str(REPO_ROOT / "data" / "06_models" / "facenet_casia_webface_from_opencv.pt")}
    params["execution"] = {"scheduler": "synchronous", "work_dir": str(tmp_path / "work")}
    return params


class _Kept(MemoryDataset):
    """A MemoryDataset the runner cannot release, so the test can read every intermediate afterwards."""

    def _release(self) -> None:
        pass


def _catalog(params: dict) -> DataCatalog:
    from kedro_datasets.partitions import PartitionedDataset

    catalog = DataCatalog({"raw_faces": PartitionedDataset(path=str(SAMPLE), dataset=RawBytesDataset)})
    for key, value in params.items():
        catalog[f"params:{key}"] = MemoryDataset(value, copy_mode="assign")
    for name in ("device",):
        catalog[f"params:{name}"] = MemoryDataset("cpu")
    return catalog


def _run(params: dict):
    from facedetail.pipeline_registry import register_pipelines

    pipeline = register_pipelines()["preprocess"].only_nodes_with_tags("data_prep", "estimation", "uv_maps")
    catalog = _catalog(params)
    for name in pipeline.outputs() | pipeline.datasets():
        if not name.startswith("params:") and name not in catalog and name != "raw_faces":
            catalog[name] = _Kept(copy_mode="assign")
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in STAGES + ["face_manifest"]}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("preprocess")
    params = _params(tmp_path)
    return params, _run(params)


def test_every_stage_has_the_same_faces_in_the_same_shards(preprocessed):
    _, out = preprocessed
    aligned = out["aligned_faces"]
    assert aligned.num_shards == 3  # 5 images, 2 per shard
    assert len(aligned) == 6 and set(aligned.index["status"]) == {"ok"}  # the pair photo has two faces
    for name in STAGES[1:]:
        data = out[name]
        assert data.num_shards == 3, name
        assert list(data.index["face_id"]) == list(aligned.index["face_id"]), name
        assert list(data.index["shard"]) == list(aligned.index["shard"]), name
        assert (data.index["status"] == "ok").all(), (name, data.index[["face_id", "status", "reason"]])
    manifest = out["face_manifest"]
    assert sorted(manifest.loc[manifest["status"] == "ok", "face_id"]) == sorted(aligned.index["face_id"])


def test_arrays_have_the_documented_shapes_and_dtypes(preprocessed):
    _, out = preprocessed
    face = read_shard(out["aligned_faces"].shards[0])[0]
    assert face["image"].shape == (224, 224, 3) and face["image"].dtype == np.uint8
    assert face["trans_params"].shape == (5,)
    masks = read_shard(out["face_masks"].shards[0])[0]
    assert masks["mask"].dtype == bool and masks["mask"].shape == (224, 224) and 0.05 < masks["mask"].mean() < 0.9
    coefficients = read_shard(out["face_coefficients"].shards[0])[0]
    assert coefficients["coefficients"].shape == (186,) and coefficients["coefficients"].dtype == np.float32
    assert float(coefficients["landmark_nme"]) < 0.08
    assert coefficients["fitted_landmarks68_original"].shape == (68, 2)
    uv = read_shard(out["uv_maps"].shards[0])[0]
    assert uv["expression_map"].shape == (3, 32, 32) and uv["expression_map"].dtype == np.float16
    assert uv["uv_texture"].dtype == np.uint8 and uv["texture_valid"].dtype == bool
    embedding = read_shard(out["facenet_embeddings"].shards[0])[0]["facenet_embedding"]
    assert embedding.shape == (512,) and abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-3


def test_rerun_reuses_every_shard(preprocessed, monkeypatch):
    params, first = preprocessed
    import facedetail.data.execution as execution

    monkeypatch.setattr(execution, "get_executor", lambda *a: pytest.fail("a finished shard was sent to compute again"))
    second = _run(params)
    for name in STAGES:
        assert second[name].meta["shards_reused"] == 3, name
        assert second[name].shard_sha256 == first[name].shard_sha256, name
