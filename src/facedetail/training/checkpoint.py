"""Crash-safe checkpoints: atomic writes, ``weights_only=True`` loads, full RNG state for exact resume, and an
exclusive lock per checkpoint folder so two concurrent runs never share (or resume from) a live checkpoint."""
from __future__ import annotations

import errno
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facedetail.utils import SettingError, atomic_torch_save, torch_load_problem

__all__ = ["atomic_torch_save", "capture_rng_state", "restore_rng_state", "checkpoint_path", "latest_checkpoint",
           "load_checkpoint", "prune_checkpoints", "CheckpointError", "CheckpointLock", "CheckpointLockedError",
           "pack_history", "unpack_history"]

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
LOCK_FILE = ".lock"


class CheckpointError(SettingError, RuntimeError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


class CheckpointLockedError(CheckpointError):
    """The checkpoint folder is held by another live training run."""


class CheckpointLock:
    """Exclusive lock of a checkpoint folder for the life of one training run (a context manager).

    ``fcntl.flock`` on ``<folder>/.lock``, which holds the owner's PID. The kernel drops the lock when its
    process ends, however it ends (``kill -9`` included), so a lock left by a killed run is stale by
    construction: the next run takes it over and logs the dead run's PID. A second live run on the same
    folder fails at once with :class:`CheckpointLockedError` naming the folder and the other PID.
    Without ``fcntl`` (Windows) the lock is a no-op.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "CheckpointLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            logger.debug("no fcntl: checkpoint folder %s is not locked", self.directory)
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            owner = _read_pid(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CheckpointError(f"cannot lock the checkpoint folder {self.directory}: {error}") from error
            raise CheckpointLockedError(
                f"checkpoint folder {self.directory} is in use by another training run (PID {owner or 'unknown'}) with the "
                f"same settings; wait for it to finish, or give this run another train.checkpoint_dir"
            ) from error
        previous = _read_pid(fd)
        if previous and previous != str(os.getpid()):
            logger.warning("checkpoint folder %s: stale lock of PID %s (that run ended without releasing it, e.g. killed) "
                           "taken over", self.directory, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no owner behind (an owner PID means "stale")
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain values (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def pack_history(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Training-history rows (``{"step": int, name: float, ...}``) as compact columns for a checkpoint.

    ``{"columns": [names], "values": float64 (rows, columns), "present": bool (rows, columns)}``: a few bytes per
    value (100k steps x 12 metrics = 10 MB) and loadable with ``weights_only=True``.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    shape = (len(rows), len(columns))
    values = torch.tensor([[float(row.get(key, 0.0)) for key in columns] for row in rows], dtype=torch.float64).reshape(shape)
    present = torch.tensor([[key in row for key in columns] for row in rows], dtype=torch.bool).reshape(shape)
    return {"columns": columns, "values": values, "present": present}


def unpack_history(packed: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Inverse of :func:`pack_history` (``step`` back to ``int``); ``None`` (older checkpoints) gives ``[]``."""
    if not packed:
        return []
    columns, values, present = packed["columns"], packed["values"].tolist(), packed["present"].tolist()
    return [{key: (int(value) if key == "step" else value) for key, value, here in zip(columns, row, mask) if here}
            for row, mask in zip(values, present)]


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (``None`` if there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the path and the cause
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a facedetail checkpoint "
                              f"({torch_load_problem(error)})") from error
    if not isinstance(state, dict) or "generator" not in state or "model_config" not in state:
        keys = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a facedetail detail-generator checkpoint (expected keys 'generator', 'model_config'; found {keys})"
        )
    return state


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Remove all but the ``keep`` most recent step checkpoints."""
    directory = Path(directory)
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)))
    for _, path in found[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
