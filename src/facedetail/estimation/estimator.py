"""Per-face estimation: 68 landmarks, photometric mask, FaceNet embedding and 3DMM coefficients.

One :class:`FaceEstimator` serves the ``estimation`` pipeline, the ``facedetail fit`` command and
inference. Results are cached per face content (:class:`facedetail.estimation.cache.FaceCache`): a rerun over
the same crops computes nothing, a changed crop or setting recomputes only what changed, and
each face is stored as soon as its batch is done (a crash loses at most one batch).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from facedetail.estimation.cache import FaceCache
from facedetail.detect.landmarks import LandmarkDetector
from facedetail.geometry.face_model import FaceModel
from facedetail.geometry.face_uv import fitted_screen_vertices
from facedetail.estimation.fitting import FitSettings, expression_from_blendshapes, fit_coefficients
from facedetail.parsing.skin_mask import face_mask

logger = logging.getLogger(__name__)


@dataclass
class EstimationResult:
    """Arrays of the faces estimated successfully, plus one report row per input face."""

    arrays: dict[str, np.ndarray]
    report: list[dict[str, Any]] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0


def _optional_path(path: str | os.PathLike | None) -> Path | None:
    """A configured weights path, or None when it is empty or the file does not exist."""
    if path is None or str(path).strip() in ("", "None", "null"):
        return None
    return Path(path) if Path(path).is_file() else None


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


class FaceEstimator:
    """Landmarks → mask → coefficients (+ FaceNet embedding) for aligned 224x224 crops.

    Args:
        face_model: the morphable model to fit (ICT by default, BFM with licensed files).
        device: torch device.
        params: the ``estimation`` parameters (``landmarks``, ``masks``, ``fitting``, ``batch_size``,
            ``use_blendshape_init``).
        weights: the ``weights`` parameters (``bisenet``, ``deng_regressor``); missing files fall back
            to the open defaults, and the choice is reported in ``sources``.
        cache_root: folder of the per-face cache (None disables caching).
        embedder: optional frozen FaceNet (adds ``facenet_embeddings``).
    """

    def __init__(
        self,
        face_model: FaceModel,
        device: torch.device,
        params: Mapping[str, Any],
        weights: Mapping[str, Any] | None = None,
        cache_root: str | os.PathLike | None = None,
        embedder: torch.nn.Module | None = None,
        face_model_id: str = "",
    ) -> None:
        self.face_model = face_model
        self.device = device
        self.params = dict(params)
        weights = dict(weights or {})
        self.embedder = embedder
        self.fit_settings = FitSettings(**dict(self.params.get("fitting", {})))
        self.mask_params = dict(self.params.get("masks", {}))
        self.batch_size = int(self.params.get("batch_size", 8))
        bisenet_path = _optional_path(weights.get("bisenet"))
        self.parser = None
        if bisenet_path is not None:
            from facedetail.parsing.bisenet import load_bisenet

            self.parser = load_bisenet(bisenet_path, device=device)
        self.regressor = None
        deng_path = _optional_path(weights.get("deng_regressor"))
        if face_model.kind == "bfm" and deng_path is not None and self.params.get("bfm_use_regressor", True):
            from facedetail.models.deng_regressor import load_deng_regressor

            self.regressor = load_deng_regressor(deng_path, device=device)
        landmark_backend = str(self.params.get("landmarks", {}).get("backend", "mediapipe"))
        self.landmarks = LandmarkDetector(backend=landmark_backend, device=device)
        self.sources = {
            "landmarks": self.landmarks.backend,
            "mask": "bisenet" if self.parser is not None else "landmarks+skin_gmm",
            "coefficients": "deng_regressor" if self.regressor is not None else f"fitting:{face_model.kind}",
            "facenet": getattr(embedder, "source", "none") if embedder is not None else "none",
        }
        cache_settings = {
            "face_model": face_model_id or face_model.kind,
            "fitting": self.fit_settings.to_dict(),
            "masks": self.mask_params,
            "landmarks": landmark_backend,
            "bisenet": str(bisenet_path),
            "regressor": str(deng_path) if self.regressor is not None else None,
            "blendshape_init": bool(self.params.get("use_blendshape_init", False)),
            "facenet": self.sources["facenet"],
            "version": 2,
        }
        self.cache = FaceCache(cache_root, "estimation", cache_settings) if cache_root is not None else None

    def close(self) -> None:
        self.landmarks.close()

    def __enter__(self) -> "FaceEstimator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one batch
    def _estimate_batch(self, crops: np.ndarray) -> list[dict[str, np.ndarray] | str]:
        """Estimate a batch of crops; per face a dict of arrays, or a string (the reason it failed)."""
        detected = self.landmarks.detect(crops)
        results: list[dict[str, np.ndarray] | str] = ["no_landmarks: the 68-point detector found no face in the crop"] * len(crops)
        found = np.flatnonzero(np.asarray(detected.found))
        if len(found) == 0:
            return results
        masks, sources = [], []
        for i in found:
            dense = None if detected.dense is None else detected.dense[i]
            mask, source = face_mask(crops[i], dense, self.parser, **mask_options(self.mask_params))
            masks.append(mask)
            sources.append(source)
        masks_np = np.stack(masks)
        lmk = np.asarray(detected.landmarks68)[found]
        blendshapes = None
        if detected.blendshapes is not None:
            blendshapes = (list(detected.blendshape_names), np.asarray(detected.blendshapes)[found])
        fit = estimate_coefficients(
            self.face_model, crops[found], lmk, masks_np, self.fit_settings, regressor=self.regressor,
            blendshapes=blendshapes if self.params.get("use_blendshape_init", False) else None,
        )
        coefficients, fitted, overlays, losses = fit["coefficients"], fit["fitted_landmarks68"], fit["overlays"], fit["losses"]
        embeddings = None
        if self.embedder is not None:
            with torch.no_grad():
                images = torch.from_numpy(crops[found]).permute(0, 3, 1, 2).float().div(255).to(self.device)
                embeddings = self.embedder(images).cpu().numpy()
        for j, i in enumerate(found):
            entry = {
                "landmarks68": lmk[j].astype(np.float32),
                "fitted_landmarks68": fitted[j].astype(np.float32),
                "mask": masks_np[j].astype(bool),
                "mask_source": np.asarray(sources[j]),
                "coefficients": coefficients[j].astype(np.float32),
                "overlay": overlays[j],
                "landmark_nme": np.float32(losses.get("landmark_nme", np.full(len(found), np.nan))[j]),
                "fit_loss": np.float32(losses.get("total", np.full(len(found), np.nan))[j]),
            }
            if embeddings is not None:
                entry["facenet_embedding"] = embeddings[j].astype(np.float32)
            results[i] = entry
        return results

    # ------------------------------------------------------------------ many faces
    def estimate(self, crops: np.ndarray, face_ids: list[str], face_sha256: list[str]) -> EstimationResult:
        """Estimate every crop (cached per face content); failed faces are reported, not raised."""
        per_face: list[dict[str, np.ndarray] | str | None] = [None] * len(crops)
        todo = []
        for k, sha in enumerate(face_sha256):
            cached = self.cache.get(sha) if self.cache is not None else None
            if cached is not None:
                per_face[k] = cached if "failure" not in cached else str(cached["failure"])
            else:
                todo.append(k)
        starts = range(0, len(todo), self.batch_size)
        for start in tqdm(starts, desc="estimate faces", unit="batch", total=len(starts), disable=not todo):
            batch = todo[start : start + self.batch_size]
            for k, result in zip(batch, self._estimate_batch(crops[batch])):
                per_face[k] = result
                if self.cache is not None:
                    self.cache.put(face_sha256[k], result if isinstance(result, dict) else {"failure": np.asarray(result)})
        report, ok = [], []
        for k, result in enumerate(per_face):
            if isinstance(result, dict):
                ok.append(k)
                report.append({"face_id": face_ids[k], "status": "ok", "reason": "", "mask_source": str(result["mask_source"]),
                               "landmark_nme": float(result["landmark_nme"]), "fit_loss": float(result["fit_loss"])})
            else:
                status, _, reason = str(result).partition(": ")
                report.append({"face_id": face_ids[k], "status": status, "reason": reason, "mask_source": "",
                               "landmark_nme": float("nan"), "fit_loss": float("nan")})
        arrays = self._stack([per_face[k] for k in ok], [face_ids[k] for k in ok], [face_sha256[k] for k in ok])
        hits = self.cache.hits if self.cache is not None else 0
        misses = self.cache.misses if self.cache is not None else len(crops)
        return EstimationResult(arrays, report, hits, misses)

    def _stack(self, entries: list[dict[str, np.ndarray]], face_ids: list[str], shas: list[str]) -> dict[str, np.ndarray]:
        n_coeffs = self.face_model.layout.total
        size = 224
        def stacked(key: str, empty_shape: tuple, dtype) -> np.ndarray:
            return np.stack([np.asarray(e[key]) for e in entries]).astype(dtype) if entries else np.zeros(empty_shape, dtype)
        arrays = {
            "face_ids": np.asarray(face_ids, dtype=str),
            "face_sha256": np.asarray(shas, dtype=str),
            "landmarks68": stacked("landmarks68", (0, 68, 2), np.float32),
            "fitted_landmarks68": stacked("fitted_landmarks68", (0, 68, 2), np.float32),
            "masks": stacked("mask", (0, size, size), bool),
            "mask_source": np.asarray([str(e["mask_source"]) for e in entries], dtype=str),
            "coefficients": stacked("coefficients", (0, n_coeffs), np.float32),
            "overlays": stacked("overlay", (0, size, size, 3), np.uint8),
            "landmark_nme": stacked("landmark_nme", (0,), np.float32),
            "fit_loss": stacked("fit_loss", (0,), np.float32),
            "face_model_kind": np.asarray(self.face_model.kind),
        }
        if entries and all("facenet_embedding" in e for e in entries):
            arrays["facenet_embeddings"] = stacked("facenet_embedding", (0, 512), np.float32)
        return arrays
