import random
from pathlib import Path

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
    with pytest.raises(OSError) as caught:
        atomic_torch_save({"generator": {"w": torch.zeros(2)}, "model_config": {}}, path)
    assert str(caught.value) == f"[Errno 28] No space left on device: '{path}'"  # the message names the file
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


def _hold_lock_in_subprocess(folder):
    import subprocess
    import sys

    code = ("import sys, time; from facedetail.training.checkpoint import CheckpointLock\n"
            f"lock = CheckpointLock({str(folder)!r}).__enter__(); print('locked', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_checkpoint_lock_names_the_other_pid_and_detects_stale_locks(tmp_path, caplog):
    import signal

    from facedetail.training.checkpoint import CheckpointLock, CheckpointLockedError

    folder = tmp_path / "ckpt" / "runkey"
    other = _hold_lock_in_subprocess(folder)
    try:
        with pytest.raises(CheckpointLockedError, match=rf"{folder} is in use by another training run \(PID {other.pid}\)"):
            with CheckpointLock(folder):
                pass
    finally:
        other.send_signal(signal.SIGKILL)  # kill -9: the lock file keeps the dead PID, the kernel drops the lock
        other.wait()
    with caplog.at_level("WARNING"):
        with CheckpointLock(folder):
            assert (folder / ".lock").read_text().strip() == str(__import__("os").getpid())
    assert f"stale lock of PID {other.pid}" in caplog.text
    assert (folder / ".lock").read_text() == ""  # a clean exit leaves no owner
    with CheckpointLock(folder):  # and is not reported as stale
        pass


def test_history_packs_into_a_weights_only_checkpoint(tmp_path):
    from facedetail.training.checkpoint import pack_history, unpack_history

    rows = [{"step": 0, "loss_total": 0.5, "seconds_per_step": 1.25}, {"step": 1, "loss_total": float("nan")},
            {"step": 2, "val_photometric_detailed": 0.125}]
    atomic_torch_save({"history": pack_history(rows)}, tmp_path / "h.pt")
    back = unpack_history(torch.load(tmp_path / "h.pt", weights_only=True)["history"])
    assert [row.keys() for row in back] == [row.keys() for row in rows]
    assert back[0] == rows[0] and back[2] == rows[2] and back[1]["step"] == 1 and back[1]["loss_total"] != back[1]["loss_total"]
    assert isinstance(back[1]["step"], int)
    assert unpack_history(None) == []
