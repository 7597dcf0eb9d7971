"""Faults and bad settings: one-line messages naming the path and the setting (CLI: exit status 2; ``kedro run``:
``Error: ...``, exit status 2), a full disk during every kind of save, and ``kill -9`` trials of real ``kedro run``s
(``benchmarks/fault_injection.py``, marked slow)."""
from __future__ import annotations

import errno
import importlib.util
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from facedetail.cli import main
from facedetail.utils import SettingError
from tests.conftest import CONF, ICT_PATH, REPO_ROOT, SAMPLE_FACES

COMMON = ["--conf-source", str(CONF), "--no-cache"]


def _harness():
    spec = importlib.util.spec_from_file_location("fault_injection", REPO_ROOT / "benchmarks" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def one_photo(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SAMPLE_FACES / "astronaut.jpg", folder / "astronaut.jpg")
    return folder


@pytest.fixture()
def garbage(tmp_path) -> Path:
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------- CLI messages
def test_cli_cuda_without_cuda_is_one_line(one_photo, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["fit", str(one_photo), str(tmp_path / "out"), *COMMON, "--device", "cuda"]) == 2
    _one_line_error(capsys, "CUDA is not available", "--device", "FACEDETAIL_DEVICE")


def test_cli_random_checkpoint_is_not_a_facedetail_checkpoint(one_photo, garbage, tmp_path, capsys):
    code = main(["reconstruct", str(one_photo), str(tmp_path / "out"), "--checkpoint", str(garbage), *COMMON, "--device", "cpu"])
    assert code == 2
    line = _one_line_error(capsys, str(garbage), "is not a facedetail checkpoint")
    assert "weights_only" not in line and "False" not in line


def test_cli_missing_bisenet_weights_is_an_error(one_photo, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "79999_iter.pth"
    monkeypatch.setenv("FACEDETAIL_BISENET_WEIGHTS", str(missing))
    assert main(["fit", str(one_photo), str(tmp_path / "out"), *COMMON, "--device", "cpu"]) == 2
    _one_line_error(capsys, str(missing), "weights.bisenet", "FACEDETAIL_BISENET_WEIGHTS")


def test_cli_garbage_bisenet_weights_is_one_line(one_photo, garbage, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEDETAIL_BISENET_WEIGHTS", str(garbage))
    assert main(["fit", str(one_photo), str(tmp_path / "out"), *COMMON, "--device", "cpu"]) == 2
    line = _one_line_error(capsys, str(garbage), "weights.bisenet", "not a plain torch.save file")
    assert "weights_only" not in line


def test_cli_garbage_ict_model_is_one_line(one_photo, garbage, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEDETAIL_ICT_MODEL", str(garbage))
    assert main(["fit", str(one_photo), str(tmp_path / "out"), *COMMON, "--device", "cpu"]) == 2
    line = _one_line_error(capsys, str(garbage), "face_model.ict_path", "FACEDETAIL_ICT_MODEL")
    assert "allow_pickle" not in line


def test_empty_weights_path_is_the_open_default_and_a_set_missing_one_an_error(tmp_path):
    from kedro.config import OmegaConfigLoader

    from facedetail.estimation.estimator import optional_weights_path
    from facedetail.settings import CONFIG_LOADER_ARGS

    assert optional_weights_path("", "bisenet") is None and optional_weights_path(None, "deng_regressor") is None
    with pytest.raises(SettingError, match="weights.deng_regressor / FACEDETAIL_DENG_WEIGHTS"):
        optional_weights_path(tmp_path / "epoch_20.pth", "deng_regressor")
    env = {k: os.environ.pop(k) for k in ("FACEDETAIL_BISENET_WEIGHTS", "FACEDETAIL_DENG_WEIGHTS") if k in os.environ}
    try:
        weights = OmegaConfigLoader(conf_source=str(CONF), **CONFIG_LOADER_ARGS)["parameters"]["weights"]
    finally:
        os.environ.update(env)
    assert weights["bisenet"] == "" and weights["deng_regressor"] == ""  # the default run uses the open defaults


# ---------------------------------------------------------------------------------------------- stage runner
class _Stage:
    """A stage whose setup or process fails as told."""

    def __new__(cls, failure: BaseException | None, where: str = "process"):
        from facedetail.data.stages import ShardStage

        class Failing(ShardStage):
            name = "failing"

            def setup(self):
                if where == "setup" and failure is not None:
                    raise failure

            def process(self, state, shard, inputs):
                if where == "process" and failure is not None:
                    raise failure
                return [{"face_id": str(item), "x": np.arange(2)} for item in shard.items], []

        return Failing()


def test_a_setting_error_stops_the_stage_instead_of_failing_every_face(tmp_path):
    from facedetail.data.execution import SynchronousExecutor
    from facedetail.data.stages import ShardInput, clear_stage_state, run_stage

    shards = [ShardInput(number=0, items=("a", "b"), face_ids=("a", "b"))]
    clear_stage_state()
    with pytest.raises(SettingError, match="bad weights"):
        run_stage(_Stage(SettingError("bad weights"), "setup"), shards, tmp_path, lambda n: SynchronousExecutor())
    assert not list((tmp_path / "failing").glob("*.json"))  # nothing recorded: a fixed setting reruns the shard
    clear_stage_state()


def test_a_full_disk_in_a_stage_is_not_recorded_as_failed_faces(tmp_path):
    from facedetail.data.execution import SynchronousExecutor
    from facedetail.data.stages import ShardInput, clear_stage_state, run_stage

    shards = [ShardInput(number=0, items=("a", "b"), face_ids=("a", "b"))]
    clear_stage_state()
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "x.npz"))
    with pytest.raises(OSError, match="No space left"):
        run_stage(_Stage(full), shards, tmp_path, lambda n: SynchronousExecutor())
    data, _ = run_stage(_Stage(None), shards, tmp_path, lambda n: SynchronousExecutor())  # space freed: the rerun computes
    assert list(data.index["status"]) == ["ok", "ok"] and data.meta["shards_reused"] == 0
    clear_stage_state()


# ---------------------------------------------------------------------------------------------- full disk
def test_disk_full_during_each_kind_of_save_keeps_the_previous_version(tmp_path):
    results = _harness().disk_full_trials(tmp_path)
    assert [ok for ok, _ in results] == [True] * 4, results


def test_disk_full_during_a_sharded_version_names_it_and_keeps_the_previous(tmp_path, monkeypatch):
    from kedro.io.core import DatasetError, Version

    from facedetail.data.shards import FaceShards, file_sha256, index_frame, index_rows, write_shard
    from facedetail.datasets import ShardedFaceDataset

    records = [{"face_id": "a", "x": np.arange(3)}]
    shard = tmp_path / "work" / "s.tar"
    sha = write_shard(shard, records)
    data = FaceShards([shard], index_frame(index_rows(0, records)), [sha])
    folder = tmp_path / "aligned_faces"
    ShardedFaceDataset(filepath=str(folder), version=Version(None, "2026-01-01T00.00.00.000Z")).save(data)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", full)
    monkeypatch.setattr(shutil, "copy2", full)
    with pytest.raises(DatasetError, match=r"cannot write '.*aligned_faces/2026-01-02.*No space left on device") as caught:
        ShardedFaceDataset(filepath=str(folder), version=Version(None, "2026-01-02T00.00.00.000Z")).save(data)
    from facedetail.hooks import user_error_message

    assert "aligned_faces" in user_error_message(caught.value) and "free space" in user_error_message(caught.value)
    # no new version: its folder holds nothing (the staging folder inside it was removed; Kedro lists <version>/<name>)
    assert not any((folder / "2026-01-02T00.00.00.000Z").iterdir())
    loaded = ShardedFaceDataset(filepath=str(folder), version=Version(None, None)).load()
    assert list(loaded.index["face_id"]) == ["a"] and file_sha256(loaded.shards[0]) == sha


# ---------------------------------------------------------------------------------------------- kedro run messages
def _session_run(project: Path, monkeypatch, raw: Path, pipeline: str = "data_prep"):
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    (project / "src").mkdir(parents=True, exist_ok=True)
    (project / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    monkeypatch.chdir(project)
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    monkeypatch.setenv("FACEDETAIL_DEVICE", "cpu")
    monkeypatch.setenv("FACEDETAIL_DASK_SCHEDULER", "synchronous")
    monkeypatch.setenv("FACEDETAIL_RAW_FACES", str(raw))
    while mlflow.active_run() is not None:
        mlflow.end_run()
    bootstrap_project(project)
    with KedroSession.create(project_path=project, conf_source=str(CONF)) as session:
        session.run(pipeline_names=[pipeline])


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_kedro_run_with_a_missing_or_empty_raw_folder_is_one_line(tmp_path, monkeypatch, kind):
    import mlflow

    from facedetail.hooks import RunSettingError

    raw = tmp_path / "raw"
    if kind == "empty":
        (raw / "sub").mkdir(parents=True)
    with pytest.raises(RunSettingError) as caught:
        _session_run(tmp_path / "project", monkeypatch, raw)
    message = caught.value.format_message()
    assert caught.value.exit_code == 2 and "\n" not in message
    assert str(raw) in message and "FACEDETAIL_RAW_FACES" in message
    assert ("does not exist" if kind == "missing" else "holds no files") in message
    assert mlflow.active_run() is None


def test_kedro_run_setting_error_in_a_node_is_one_line(tmp_path, monkeypatch):
    import mlflow

    from facedetail.hooks import RunSettingError

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_text("no photos")
    with pytest.raises(RunSettingError) as caught:
        _session_run(tmp_path / "project", monkeypatch, raw)
    message = caught.value.format_message()
    assert caught.value.exit_code == 2 and "no images in" in message and str(raw) in message and "FACEDETAIL_RAW_FACES" in message
    assert mlflow.active_run() is None  # kedro-mlflow closed its run before the error was replaced


def test_no_partitions_and_full_disk_messages():
    from kedro.io.core import DatasetError

    from facedetail.hooks import user_error_message

    message = user_error_message(DatasetError("No partitions found in '/nowhere/faces'"))
    assert "'/nowhere/faces' does not exist" in message and "FACEDETAIL_RAW_FACES" in message and "FACEDETAIL_INFERENCE_IMAGES" in message
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/06_models/checkpoints/step_00000004.pt")
        except OSError as error:
            raise RuntimeError("training failed") from error
    except RuntimeError as wrapped:
        message = user_error_message(wrapped)
    assert "No space left on device while writing '/data/06_models/checkpoints/step_00000004.pt'" in message
    assert user_error_message(ZeroDivisionError("bug")) is None  # a bug keeps its traceback


# ---------------------------------------------------------------------------------------------- kill -9 trials
@pytest.mark.slow
@pytest.mark.skipif(not ICT_PATH.is_file(), reason="ICT-FaceKit model not found")
def test_kill_9_a_train_run_then_rerun(tmp_path):
    """One uninterrupted ``kedro run --pipeline=train`` (the per-face stages, training, evaluation) from scratch, then
    one killed at a seeded random moment and rerun: nothing lost, no broken version, the same final model.

    Kept to one trial (the whole chain, so the kill may land in a stage or in training); the benchmark
    (``benchmarks/fault_injection.py``) runs 20, alternating ``preprocess`` and ``train`` kills.
    """
    harness = _harness()
    reference = tmp_path / "reference"
    env = harness.make_project(reference)
    rc, seconds, log = harness.kedro_run(reference, "train", env)
    assert rc == 0, log
    assert not harness.version_problems(reference / "data")
    ok, message = harness.kill_trial(reference, tmp_path / "trial", "train", seconds, random.Random(0), "synchronous")
    assert ok, message


# ---------------------------------------------------------------------------------------------- per-file isolation
def test_an_unreadable_sub_folder_gets_a_row_instead_of_being_skipped(tmp_path, monkeypatch):
    from facedetail.engine.inputs import list_images, load_input_image
    from facedetail.io.images import ImageReadError

    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    shutil.copy(SAMPLE_FACES / "astronaut.jpg", root / "a.jpg")
    shutil.copy(SAMPLE_FACES / "astronaut.jpg", root / "locked" / "b.jpg")
    locked = str(root / "locked")
    real_scandir, real_listdir = os.scandir, os.listdir

    def denied(path):  # as root, chmod 000 alone does not stop listing: the listing itself fails
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", lambda path=".": denied(path) if str(path) == locked else real_scandir(path))
    monkeypatch.setattr(os, "listdir", lambda path=".": denied(path) if str(path) == locked else real_listdir(path))
    files, names = list_images(root)
    assert names == ["a.jpg", "locked"]
    with pytest.raises(ImageReadError, match="locked: folder cannot be read \\(Permission denied\\)") as caught:
        load_input_image(files[1], names[1])
    assert caught.value.status == "unreadable"
    monkeypatch.setattr(os, "scandir", lambda path=".": denied(path))
    from facedetail.engine.inputs import InputError

    with pytest.raises(InputError, match="cannot read image folder .*photos: Permission denied"):
        list_images(root)


def test_inference_pipeline_reads_local_partitions_by_path_so_os_errors_are_rows(tmp_path):
    from kedro_datasets.partitions import PartitionedDataset

    from facedetail.engine.inputs import load_input_image
    from facedetail.io.images import ImageReadError
    from facedetail.pipelines.inference.nodes import _local_path_or_loader

    folder = tmp_path / "faces"
    folder.mkdir()
    shutil.copy(SAMPLE_FACES / "astronaut.jpg", folder / "ok.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    partitions = PartitionedDataset(path=str(folder), dataset="facedetail.datasets.RawBytesDataset").load()
    inputs = {name: _local_path_or_loader(loader) for name, loader in partitions.items()}
    assert inputs["ok.jpg"] == folder / "ok.jpg" and load_input_image(inputs["ok.jpg"], "ok.jpg").shape[2] == 3
    with pytest.raises(ImageReadError, match="broken symbolic link"):
        load_input_image(inputs["dangling.jpg"], "dangling.jpg")
    with pytest.raises(ImageReadError, match="symbolic link loop"):
        load_input_image(inputs["loop.jpg"], "loop.jpg")


def test_the_mlflow_database_is_created_atomically(tmp_path, monkeypatch):
    """A run killed while MLflow built its schema left a half-built mlruns.db that failed every later run
    ("table ... already exists"; found by benchmarks/fault_injection.py): the database is now built aside and renamed."""
    import mlflow.store.db.utils as db_utils
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from facedetail.hooks import ensure_tracking_database

    real = db_utils._initialize_tables

    def killed(engine):
        real(engine)
        raise KeyboardInterrupt("killed during the migrations")

    monkeypatch.setattr(db_utils, "_initialize_tables", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_tracking_database("sqlite:///mlruns.db", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left
    monkeypatch.setattr(db_utils, "_initialize_tables", real)
    assert ensure_tracking_database("sqlite:///mlruns.db", tmp_path) == tmp_path / "mlruns.db"
    assert ensure_tracking_database("sqlite:///mlruns.db", tmp_path) is None  # exists: left alone
    store = SqlAlchemyStore(f"sqlite:///{tmp_path / 'mlruns.db'}", str(tmp_path / "artifacts"))
    assert store.create_experiment("faults") and [p.name for p in tmp_path.iterdir() if p.suffix == ".db"] == ["mlruns.db"]
