"""``torchrun --nproc_per_node=2 -m facedetail.pipelines.train.torchrun`` (gloo, CPU) in a Kedro project:
both ranks load the four shard datasets from the catalog, rank 0 alone saves the model through the
catalog, logs its own MLflow run and registers the model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ICT = REPO_ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = [pytest.mark.skipif(not ICT.is_file() or not TORCHRUN.is_file(), reason="needs the ICT model and torchrun"), pytest.mark.slow]
STAGES = ("aligned_faces", "face_masks", "face_coefficients", "uv_maps")

CATALOG = "\n".join(
    [f"{name}:\n  type: facedetail.datasets.ShardedFaceDataset\n  filepath: data/shards/{name}\n  versioned: true\n" for name in STAGES]
) + """
detail_model:
  type: facedetail.datasets.TorchCheckpointDataset
  filepath: data/06_models/detail_generator.pt
  versioned: true
training_history:
  type: pandas.ParquetDataset
  filepath: data/08_reporting/training_history.parquet
  versioned: true
train_split:
  type: json.JSONDataset
  filepath: data/05_model_input/train_split.json
model_registration:
  type: json.JSONDataset
  filepath: data/06_models/model_registration.json
"""


def test_torchrun_two_gloo_ranks_train_save_log_and_register(tmp_path):
    from kedro.io.core import Version

    from facedetail.data.streaming import write_stage_shards
    from facedetail.datasets import ShardedFaceDataset
    from facedetail.geometry.face_model import load_face_model
    from tests.test_training import synthetic_faces

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    conf = project / "conf"
    (conf / "local").mkdir(parents=True)
    (conf / "base").mkdir()
    for name in ("parameters.yml", "parameters_train.yml", "mlflow.yml"):
        shutil.copy(REPO_ROOT / "conf" / "base" / name, conf / "base" / name)
    (conf / "base" / "catalog.yml").write_text(CATALOG)
    stages = write_stage_shards(synthetic_faces(load_face_model("ict", ICT), n=10), tmp_path / "work", faces_per_shard=4)
    for name, shards in stages.items():
        ShardedFaceDataset(filepath=str(project / "data" / "shards" / name), version=Version(None, None)).save(shards)
    params = ("train.steps=2,train.batch_size=4,train.log_every=1,train.image_log_every=1,train.checkpoint_every=1,"
              "train.loss_weights.perceptual=0,train.model.ngf=8,train.model.embedding_channels=4,train.model.regions=2,"
              "train.model.filter_pool=2,train.discriminator.ndf=8,train.registered_model_name=torchrun-test-model,"
              "train.streaming.shuffle_buffer=4")
    env = {**os.environ, "DO_NOT_TRACK": "1", "FACEDETAIL_DEVICE": "cpu", "FACEDETAIL_ICT_MODEL": str(ICT), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}", "PYTHONPATH": str(REPO_ROOT / "src")}
    env.pop("MLFLOW_REGISTRY_URI", None)  # earlier in-process tests may have set it (mlflow.set_registry_uri)
    tic = time.perf_counter()
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "facedetail.pipelines.train.torchrun", "--", "--params", params],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - tic
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(f"torchrun 2 ranks: {elapsed:.1f} s")
    import torch

    versions = list((project / "data" / "06_models" / "detail_generator.pt").iterdir())
    assert len(versions) == 1  # rank 0 alone saved it
    checkpoint = torch.load(versions[0] / "detail_generator.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["uv_size"] == 32
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"  # one run, by rank 0
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train.loss_total")] == [0, 1]
    versions = client.search_model_versions("name='torchrun-test-model'")
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id
