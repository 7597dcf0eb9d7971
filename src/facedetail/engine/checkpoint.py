"""THE detail-checkpoint format, written and read in one place.

The train pipeline's ``detail_model`` dataset (a Kedro versioned ``.pt`` file, also the registered MLflow pyfunc's
``checkpoint`` artifact) is a dict::

    {"generator": state_dict, "model_config": DetailGenerator.config, "uv_size": int,
     "face_model_kind": "ict" | "bfm", "step": int, "albedo_blur_sigma": float}

:func:`make_detail_checkpoint` builds it (train pipeline); :func:`load_detail_checkpoint` /
:func:`generator_from_checkpoint` read it (evaluation, inference, serving, CLI).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from facedetail.models.detail_model import DetailGenerator
from facedetail.training.checkpoint import CheckpointError, load_checkpoint
from facedetail.utils import resolve_device

#: Name of the checkpoint file inside a Kedro versioned folder (``data/06_models/detail_generator.pt/<version>/``).
CHECKPOINT_FILE = "detail_generator.pt"
_REQUIRED_CHECKPOINT_KEYS = ("generator", "model_config", "uv_size")


def make_detail_checkpoint(
    generator: DetailGenerator, uv_size: int, face_model_kind: str, step: int, albedo_blur_sigma: float = 2.0
) -> dict[str, Any]:
    """The checkpoint dict of a trained generator (weights copied to the CPU); see the module docstring."""
    return {
        "generator": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "model_config": generator.config,
        "uv_size": int(uv_size),
        "face_model_kind": face_model_kind,
        "step": step,
        "albedo_blur_sigma": float(albedo_blur_sigma),
    }


def latest_versioned_file(path: str | os.PathLike) -> Path:
    """Resolve a checkpoint location to one file.

    ``path`` may be the file itself, or a Kedro versioned dataset folder (``.../detail_generator.pt/`` holding
    ``<version>/detail_generator.pt``): the latest version (versions are timestamps that sort as text) wins.

    Raises:
        CheckpointError: nothing there, or a folder without any version file.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a .pt file or a Kedro versioned folder)")
    candidates = sorted(p for p in path.glob(f"*/{path.name}") if p.is_file())
    if not candidates:
        candidates = sorted(p for p in path.glob(f"*/{CHECKPOINT_FILE}") if p.is_file())
    if not candidates:
        raise CheckpointError(
            f"checkpoint folder {path} holds no '<version>/{path.name}' file; train a model first "
            "(kedro run --pipelines=train) or pass --checkpoint PATH"
        )
    return candidates[-1]


def load_detail_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[DetailGenerator, dict[str, Any]]:
    """Build the trained :class:`DetailGenerator` (eval mode, on ``device``) and return it with the checkpoint's meta.

    Args:
        path_or_dict: a checkpoint file, a Kedro versioned folder (latest version), or the loaded dict
            ``{"generator", "model_config", "uv_size", "face_model_kind", "step", "albedo_blur_sigma"}``.
        device: torch device (or "auto").

    Returns:
        ``(generator, meta)``; ``meta`` holds every key but ``generator`` plus ``source`` (the file or "<dict>"),
        with defaults ``face_model_kind`` None, ``step`` -1, ``albedo_blur_sigma`` 2.0.

    Raises:
        CheckpointError: missing/unreadable file, missing keys, or weights that do not fit the config.
    """
    torch_device = resolve_device(device)
    if isinstance(path_or_dict, Mapping):
        state, source = dict(path_or_dict), "<dict>"
    else:
        file = latest_versioned_file(path_or_dict)
        state, source = load_checkpoint(file, map_location="cpu"), str(file)
    missing = [key for key in _REQUIRED_CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{source} is not a facedetail detail-generator checkpoint: missing {missing} "
            f"(expected keys {list(_REQUIRED_CHECKPOINT_KEYS)} + face_model_kind, step, albedo_blur_sigma)"
        )
    try:
        generator = DetailGenerator.from_config(dict(state["model_config"]))
        generator.load_state_dict(state["generator"], strict=True)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: the generator weights do not match its model_config: {error}") from error
    uv_size = int(state["uv_size"])
    multiple = 2 ** int(generator.config["num_downs"])
    if uv_size <= 0 or uv_size % multiple:
        raise CheckpointError(f"{source}: uv_size {uv_size} is not a positive multiple of 2**num_downs = {multiple}")
    meta = {key: value for key, value in state.items() if key != "generator"}
    meta.update(uv_size=uv_size, source=source)
    meta.setdefault("face_model_kind", None)
    meta.setdefault("step", -1)
    meta.setdefault("albedo_blur_sigma", 2.0)
    return generator.to(torch_device).eval(), meta


def generator_from_checkpoint(checkpoint: Mapping[str, Any], device: str | torch.device = "cpu") -> DetailGenerator:
    """The trained generator (eval mode, on ``device``) of a checkpoint dict, file or versioned folder."""
    return load_detail_checkpoint(checkpoint, device)[0]
