"""MLflow run hygiene (facedetail.tracking, RunTrackingHooks) and the labelled training grid."""
from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facedetail import tracking


def test_run_name_is_pipeline_and_utc_timestamp():
    when = dt.datetime(2026, 1, 2, 4, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert tracking.run_name(["train"], when) == "train-20260102T030405Z"
    assert tracking.run_name(["data_prep", "estimation"], when) == "data_prep+estimation-20260102T030405Z"
    assert tracking.run_name(None, when) == "__default__-20260102T030405Z"


def test_git_tags_commit_and_dirty_flag(tmp_path):
    assert tracking.git_tags(tmp_path) == {}  # not a checkout: no tags, no error
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-qm", "one")
    tags = tracking.git_tags(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"] == head and tags["git.dirty"] == "false" and tags["mlflow.source.git.commit"] == head
    (tmp_path / "a.txt").write_text("2")
    assert tracking.git_tags(tmp_path)["git.dirty"] == "true"


def test_runner_tag_is_a_class_name():
    assert tracking.runner_name("<kedro.runner.sequential_runner.SequentialRunner object at 0x7f00aa>") == "SequentialRunner"
    assert tracking.runner_name("ParallelRunner") == "ParallelRunner"
    assert tracking.runner_name("None") == tracking.runner_name(None) == "SequentialRunner"  # KedroSession.run's default


@pytest.fixture()
def client(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(None)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_runs_of_dead_processes_are_marked_killed(client):
    experiment = client.create_experiment("reap")
    host = socket.gethostname()
    dead = client.create_run(experiment, tags={tracking.TAG_PID: str(_dead_pid()), tracking.TAG_HOST: host}).info.run_id
    mine = client.create_run(experiment, tags={tracking.TAG_PID: str(os.getpid()), tracking.TAG_HOST: host}).info.run_id
    elsewhere = client.create_run(experiment, tags={tracking.TAG_PID: "1234567", tracking.TAG_HOST: "other-host"}).info.run_id
    untagged = client.create_run(experiment).info.run_id
    finished = client.create_run(experiment, tags={tracking.TAG_PID: str(_dead_pid()), tracking.TAG_HOST: host}).info.run_id
    client.set_terminated(finished, "FINISHED")
    assert tracking.reap_stale_runs(client, [experiment]) == [dead]
    status = {run_id: client.get_run(run_id).info.status for run_id in (dead, mine, elsewhere, untagged, finished)}
    assert status == {dead: "KILLED", mine: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING", finished: "FINISHED"}
    assert "was gone" in client.get_run(dead).data.tags["facedetail.reaped"]


def test_hooks_reap_name_and_tag_a_run(client, tmp_path):
    import mlflow

    from facedetail.hooks import RunTrackingHooks

    experiment = client.create_experiment("hooked")
    stale = client.create_run(experiment, tags={tracking.TAG_PID: str(_dead_pid()), tracking.TAG_HOST: socket.gethostname()}).info.run_id
    config = SimpleNamespace(tracking=SimpleNamespace(experiment=SimpleNamespace(name="hooked"), run=SimpleNamespace(id=None, name=None)))
    hooks = RunTrackingHooks()
    hooks.after_context_created(SimpleNamespace(mlflow=config))
    assert client.get_run(stale).info.status == "KILLED"
    run_params = {"pipeline_names": ["train"], "project_path": str(tmp_path), "runner": "<kedro.runner.SequentialRunner object at 0x1>"}
    hooks.before_pipeline_run(run_params, None, None)
    assert config.tracking.run.name.startswith("train-20") and config.tracking.run.name.endswith("Z")
    with mlflow.start_run(experiment_id=experiment, run_name=config.tracking.run.name) as run:
        mlflow.set_tag("runner", run_params["runner"])  # what kedro-mlflow writes
        hooks.tag_started_run(run_params)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["runner"] == "SequentialRunner" and tags[tracking.TAG_PID] == str(os.getpid())
    assert tags[tracking.TAG_HOST] == socket.gethostname() and "git.commit" not in tags  # tmp_path is no checkout


def test_image_grid_has_a_labelled_header_row():
    from facedetail.training.loop import GRID_COLUMNS, make_image_grid

    size, rows = 64, 2
    grid = make_image_grid(torch.zeros(3, 3, size, size), torch.zeros(3, 3, size, size), torch.zeros(3, 3, size, size),
                           torch.zeros(3, 1, 16, 16), torch.zeros(3, 4, 16, 16), max_rows=rows)
    header = max(12, size // 8)
    assert grid.shape == (header + rows * size, len(GRID_COLUMNS) * size, 3) and grid.dtype == np.uint8
    strip = grid[:header].astype(int)
    for column in range(len(GRID_COLUMNS)):  # every column has light label pixels on the dark strip
        assert (strip[:, column * size:(column + 1) * size] > 200).any(), GRID_COLUMNS[column]
    assert (grid[header:, : 3 * size] == 0).all()  # the images below are untouched (black inputs stay black)
