"""`kedro run --pipelines=train` end to end on the built-in sample, through a real KedroSession:
versioned outputs, MLflow metrics/images/artifacts, a registered model that a new process loads
from the registry and uses to reconstruct a face, and a cached rerun that recomputes nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import ICT_PATH, REPO_ROOT, SAMPLE_FACES, needs_ict

SAMPLE = SAMPLE_FACES
ICT = ICT_PATH
pytestmark = [needs_ict, pytest.mark.slow]
MODEL_NAME = "facedetail-test-model"

TINY = {
    "uv_maps": {"uv_size": 32},
    "train": {
        "steps": 3,
        "batch_size": 2,
        "log_every": 1,
        "image_log_every": 2,
        "checkpoint_every": 2,
        "registered_model_name": MODEL_NAME,
        "model": {"ngf": 8, "num_downs": 5, "embedding_channels": 4, "regions": 2, "filter_pool": 2},
        "discriminator": {"ndf": 8, "n_layers": 2},
    },
    "estimation": {"fitting": {"rigid_steps": 20, "landmark_steps": 40, "photometric_steps": 10}},
}


def _run(project: Path, pipeline: str) -> float:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    tic = time.perf_counter()
    with KedroSession.create(project_path=project, conf_source=str(REPO_ROOT / "conf"), runtime_params=TINY) as session:
        session.run(pipeline_names=[pipeline])
    return time.perf_counter() - tic


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import mlflow

    project = tmp_path_factory.mktemp("project")
    (project / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    (project / "src").mkdir()
    tracking_uri = f"sqlite:///{project / 'mlruns.db'}"
    patch = pytest.MonkeyPatch()
    patch.chdir(project)
    for key, value in {
        "DO_NOT_TRACK": "1",
        "FACEDETAIL_RAW_FACES": str(SAMPLE),
        "FACEDETAIL_ICT_MODEL": str(ICT),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "FACEDETAIL_DEVICE": "cpu",
    }.items():
        patch.setenv(key, value)
    while mlflow.active_run() is not None:  # kedro-mlflow can leave an earlier in-process session's run active
        mlflow.end_run()
    try:
        first = _run(project, "train")
        yield project, tracking_uri, first
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        patch.undo()


def _single_version(folder: Path, name: str) -> Path:
    versions = sorted((folder / name).iterdir())
    assert len(versions) >= 1
    return versions[-1] / name


def test_train_writes_versioned_outputs(trained):
    project, _, _ = trained
    import torch

    checkpoint = torch.load(_single_version(project / "data" / "06_models", "detail_generator.pt"), weights_only=True)
    assert checkpoint["uv_size"] == 32 and checkpoint["face_model_kind"] == "ict" and checkpoint["step"] == 3
    uv = _faces(_single_version(project / "data" / "05_model_input", "uv_maps"))
    assert uv[0]["expression_map"].shape == (3, 32, 32)
    assert len(uv) >= 5  # the sample has 5 images, one of them with two faces
    estimates = [f for f in _faces(_single_version(project / "data" / "04_feature", "face_coefficients")) if f["status"] == "ok"]
    assert estimates[0]["coefficients"].shape == (186,)  # ICT layout: 100 id + 53 exp + 3 + 27 + 3
    assert np.median([float(f["landmark_nme"]) for f in estimates]) < 0.05
    aligned = {f["face_id"]: f for f in _faces(_single_version(project / "data" / "03_primary", "aligned_faces"))}
    x0, y0, x1, y1 = aligned[estimates[0]["face_id"]]["bbox"]
    original = estimates[0]["fitted_landmarks68_original"]
    margin = 0.15 * (x1 - x0)  # jaw points may sit slightly outside MTCNN's box
    assert (original[:, 0] > x0 - margin).all() and (original[:, 0] < x1 + margin).all()
    assert (original[:, 1] > y0 - margin).all() and (original[:, 1] < y1 + margin).all()


def _faces(folder: Path) -> list[dict]:
    """Every face record of a sharded dataset version folder, shard by shard."""
    from facedetail.data.shards import read_shard

    return [face for shard in sorted(folder.glob("shard-*.tar")) for face in read_shard(shard)]


def test_run_is_tracked_and_model_registered(trained):
    from mlflow.tracking import MlflowClient

    _, tracking_uri, _ = trained
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("facedetail").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "train.loss_total")
    assert [m.step for m in history] == [0, 1, 2]
    assert "evaluate.mean_photometric_l1_detailed" in run.data.metrics
    assert run.data.params["train.steps"] == "3"
    assert run.data.tags["estimation.source.mask"] == "landmarks+skin_gmm"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    assert "train/train_grid_000000.png" in artifacts and "train/model_registration.json" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "train/checkpoint")] == ["train/checkpoint/step_00000003.pt"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")} >= {"evaluate/evaluation_table.csv", "evaluate/coarse_vs_detailed.png"}
    # lineage: the intermediates the run wrote are MLflow dataset inputs (name, version, digest, face count, role);
    # MLflow keeps one entry per dataset and run, so a dataset written and then read is logged once, as "output"
    logged = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    for name in ("aligned_faces", "face_landmarks", "face_masks", "facenet_embeddings", "face_coefficients", "uv_maps"):
        tags = {t.key: t.value for t in logged[name].tags}
        assert tags["role"] == "output" and int(tags["faces"]) >= 5 and tags["kedro.version"], name
        assert len(logged[name].dataset.digest) == 16
    assert {"detail_model", "face_manifest", "training_history"} <= set(logged)
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    tags = versions[0].tags  # the evaluation summary travels with the registered version
    assert float(tags["evaluate.mean_photometric_l1_detailed"]) == pytest.approx(run.data.metrics["evaluate.mean_photometric_l1_detailed"], rel=1e-4)
    # MLflow practice: every registered version is the candidate; the first evaluated one is also the champion
    version = client.get_model_version(MODEL_NAME, versions[0].version)  # search results carry no aliases
    assert set(version.aliases) >= {"candidate", "champion"}
    assert "3 steps" in version.description and "training /" in version.description


def test_run_is_readable(trained):
    import re

    from mlflow.tracking import MlflowClient

    _, tracking_uri, _ = trained
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("facedetail").experiment_id], filter_string="tags.mlflow.runName LIKE 'train-%'")
    run = runs[-1]  # the first (train) run; the cached rerun is an estimation run
    assert re.fullmatch(r"train-\d{8}T\d{6}Z", run.info.run_name), run.info.run_name
    params = run.data.params
    assert not [k for k in params if k.startswith("parameters.")]  # each parameter once, flattened
    assert params["face_model.kind"] == "ict" and params["train.model.ngf"] == "8"
    tags = run.data.tags
    assert tags["runner"] == "SequentialRunner" and tags["facedetail.pid"].isdigit() and tags["facedetail.host"]


def test_registered_model_is_code_not_pickle(trained):
    import importlib.metadata

    import mlflow
    from mlflow.models import Model

    project, tracking_uri, _ = trained
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(project / "downloaded"),
                                                      tracking_uri=tracking_uri, registry_uri=tracking_uri))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith(".pkl")]  # models from code: nothing to unpickle
    model = Model.load(folder)
    assert model.flavors["python_function"]["model_code_path"].endswith("serving_model.py")
    assert model.signature.inputs.input_names() == ["image"] and model.saved_input_example_info is not None
    example = model.load_input_example(str(folder))
    assert bytes(example["image"][0])[:4] == b"\x89PNG"
    requirements = (folder / "requirements.txt").read_text().split()
    assert f"facedetail=={importlib.metadata.version('facedetail')}" in requirements
    assert f"torch=={importlib.metadata.version('torch')}" in requirements
    assert f"artifacts/facedetail-{importlib.metadata.version('facedetail')}-py3-none-any.whl" in files


def test_registered_model_reconstructs_a_face_in_a_new_process(trained):
    project, tracking_uri, _ = trained
    script = (
        "import mlflow, pandas as pd, json, sys\n"
        f"mlflow.set_tracking_uri({tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL_NAME}@champion')\n"
        f"out = model.predict(pd.DataFrame({{'image': [{str(SAMPLE / 'astronaut.jpg')!r}]}}))\n"
        "print(json.dumps({'n': len(out), 'face_id': out['face_id'][0], 'uv': int(out['uv_size'][0]),"
        " 'lmk': len(out['landmarks68'][0]), 'k': len(out['coefficients'][0])}))\n"
    )
    env = {"DO_NOT_TRACK": "1", "FACEDETAIL_DEVICE": "cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"n": 1, "face_id": "astronaut__f0", "uv": 32, "lmk": 68, "k": 186}


def test_cached_rerun_recomputes_no_estimate(trained):
    project, _, first = trained
    cache_files = list((project / "data" / "04_feature" / "estimation_cache").rglob("*.npz"))
    assert len(cache_files) >= 6
    before = {p: p.stat().st_mtime_ns for p in cache_files}
    _run(project, "estimation")
    assert {p: p.stat().st_mtime_ns for p in cache_files} == before  # nothing re-estimated


def test_quickstart_notebook_runs_against_the_registered_model(trained, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    project, tracking_uri, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("FACEDETAIL_MODEL_URI", f"models:/{MODEL_NAME}/latest")
    monkeypatch.setenv("FACEDETAIL_SAMPLE_IMAGE", str(SAMPLE / "astronaut.jpg"))
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    assert "astronaut__f0 displacement range:" in text
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the renders figure
    # a user's notebook shows no warnings of ours or tqdm's ("IProgress not found": ipywidgets is installed)
    errors = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream" and out.get("name") == "stderr")
    assert "IProgress" not in errors and "Warning" not in errors, errors
