"""Small helpers shared by the plain modules (no Kedro)."""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a device setting into a ``torch.device``.

    ``"auto"`` (or ``None``) picks CUDA when available, else the CPU. Asking for CUDA on a machine
    without it raises a clear error instead of failing deep inside a kernel.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or str(name).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was requested but CUDA is not available on this machine; use 'auto' or 'cpu'")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def settings_hash(settings: Any) -> str:
    """A short stable hash of JSON-serialisable settings (used as part of cache keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
