"""The estimation steps' library functions: which weights to use, mask options, 3DMM coefficients.

The stages that run them (over shards in the pipelines, over crops in memory for the engine)
live in :mod:`facedetail.data.face_stages`; the fit itself in :mod:`facedetail.estimation.fitting`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from facedetail.geometry.face_model import FaceModel
from facedetail.utils import SettingError
from facedetail.geometry.face_uv import fitted_screen_vertices
from facedetail.estimation.fitting import FitSettings, expression_from_blendshapes, fit_coefficients

logger = logging.getLogger(__name__)


#: The environment variable that overrides each ``weights.*`` setting (conf/base/parameters.yml), for messages.
WEIGHTS_ENV = {"bisenet": "FACEDETAIL_BISENET_WEIGHTS", "deng_regressor": "FACEDETAIL_DENG_WEIGHTS",
               "facenet": "FACEDETAIL_FACENET_WEIGHTS"}


def optional_weights_path(path: str | os.PathLike | None, setting: str = "") -> Path | None:
    """A configured weights path, or None when it is empty (the open default of that component).

    Args:
        setting: the key under ``weights`` (``bisenet``, ``deng_regressor``...), named in the error.

    Raises:
        SettingError: the path is set but is not a file (a typo must not silently fall back to the default).
    """
    if path is None or str(path).strip() in ("", "None", "null"):
        return None
    if not Path(path).is_file():
        name = f"weights.{setting}" if setting else "the weights setting"
        env = f" / {WEIGHTS_ENV[setting]}" if setting in WEIGHTS_ENV else ""
        raise SettingError(f"weights file not found: '{path}' (set by {name}{env}); fix the path, or set it to \"\" "
                           "to use the open default")
    return Path(path)


def mask_options(mask_params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``estimation.masks`` settings that :func:`face_mask` takes."""
    return {k: v for k, v in mask_params.items() if k in ("mask_labels", "skin_threshold", "hole_margin", "min_skin_fraction")}


def estimate_coefficients(
    face_model: FaceModel,
    crops: np.ndarray,
    landmarks68: np.ndarray,
    masks: np.ndarray,
    settings: FitSettings,
    regressor: torch.nn.Module | None = None,
    blendshapes: tuple[list[str], np.ndarray] | None = None,
) -> dict[str, Any]:
    """3DMM coefficients of a batch of aligned crops: the Deng regressor when given, else the ICT/BFM fit.

    Args:
        crops: (B, 224, 224, 3) uint8 aligned crops.
        landmarks68: (B, 68, 2) detected points in crop pixels (integer pixel centres).
        masks: (B, 224, 224) bool photometric masks.
        settings: the analysis-by-synthesis schedule.
        regressor: a loaded Deng et al. regressor (BFM layout), or None to fit.
        blendshapes: (names, (B, 52) scores) to initialise ICT expressions from, or None.

    Returns:
        ``coefficients`` (B, K), ``fitted_landmarks68`` (B, 68, 2) crop pixels, ``overlays`` (B, 224, 224, 3)
        uint8 and ``losses`` (``landmark_nme``, ``total`` arrays of B).
    """
    if regressor is not None:
        device = next(regressor.parameters()).device
        with torch.no_grad():
            images = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255).to(device)
            coefficients = regressor(images).cpu().numpy()
        screen = fitted_screen_vertices(face_model, torch.from_numpy(coefficients).to(device), crops.shape[1])
        fitted = screen[:, face_model.lmk68, :2].cpu().numpy() - 0.5  # continuous -> integer pixel centres
        return {"coefficients": coefficients, "fitted_landmarks68": fitted, "overlays": crops.copy(),
                "losses": {"landmark_nme": np.full(len(crops), np.nan)}}
    exp_init = None
    if blendshapes is not None and face_model.kind == "ict":
        names, values = blendshapes
        scores = [dict(zip(names, row.tolist())) for row in np.asarray(values)]
        exp_init = expression_from_blendshapes(scores, list(face_model.exp_names))
    # Detectors and alignment use integer pixel centres; the camera/renderer continuous
    # coordinates (pixel c covers [c, c+1)): shift by half a pixel in and out.
    fit = fit_coefficients(face_model, crops, landmarks68 + 0.5, masks, settings, exp_init=exp_init)
    return {"coefficients": fit.coefficients.numpy(), "fitted_landmarks68": fit.landmarks68.numpy() - 0.5,
            "overlays": fit.overlay, "losses": fit.losses}
