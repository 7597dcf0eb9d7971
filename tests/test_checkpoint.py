import random

import numpy as np
import pytest
import torch

from facedetail.training.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
)


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    atomic_torch_save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"generator": {"w": torch.ones(2)}, "model_config": {}}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import facedetail.utils

    monkeypatch.setattr(facedetail.utils.os, "fsync", disk_full)  # fails after the temp file was written
    with pytest.raises(OSError):
        atomic_torch_save({"generator": {"w": torch.zeros(2)}, "model_config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["generator"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_latest_and_prune(tmp_path):
    for step in (5, 20, 10):
        atomic_torch_save({"generator": {}, "model_config": {}, "step": step}, checkpoint_path(tmp_path, step))
    assert latest_checkpoint(tmp_path).name == "step_00000020.pt"
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010.pt", "step_00000020.pt"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_wrong_or_missing_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a facedetail"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "garbage.pt")
