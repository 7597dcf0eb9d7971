"""Content-addressed per-face cache for expensive per-face stages (landmarks, masks, 3DMM fits).

A face's result is stored under ``<root>/<stage>/<key>.npz`` where ``key`` hashes the face's
content hash (sha256 of the aligned crop), the stage name and the stage's settings. A rerun over
the same images therefore recomputes nothing, a changed image or setting recomputes only what
changed, and results survive a crash of a later face (each face is written as soon as it is done,
atomically: write to a temporary file, then rename).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from facedetail.utils import atomic_write_bytes, settings_hash


class FaceCache:
    """A folder of ``.npz`` files, one per (face content, stage, settings)."""

    def __init__(self, root: str | os.PathLike, stage: str, settings: Mapping[str, Any], enabled: bool = True) -> None:
        self.root = Path(root) / stage
        self.stage = stage
        from facedetail import __version__

        # an upgrade of facedetail (new code, same settings) does not reuse older results
        self.settings_key = settings_hash({**dict(settings), "facedetail_version": __version__})
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def key(self, face_sha256: str) -> str:
        """The cache key of one face for this stage and these settings."""
        return hashlib.sha256(f"{face_sha256}:{self.stage}:{self.settings_key}".encode()).hexdigest()[:32]

    def path(self, face_sha256: str) -> Path:
        return self.root / f"{self.key(face_sha256)}.npz"

    def get(self, face_sha256: str) -> dict[str, np.ndarray] | None:
        """The cached arrays of a face, or ``None`` (a corrupt entry counts as a miss and is removed)."""
        if not self.enabled:
            self.misses += 1
            return None
        path = self.path(face_sha256)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                result = {k: data[k] for k in data.files}
        except Exception:  # noqa: BLE001 - a truncated file from a killed run is just a miss
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return result

    def put(self, face_sha256: str, arrays: Mapping[str, Any]) -> None:
        """Store a face's arrays atomically (temporary file + rename)."""
        if not self.enabled:
            return
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(self.path(face_sha256), buffer.getvalue())
