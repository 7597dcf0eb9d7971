"""The per-face preprocessing chain as shard stages (design card: align -> landmarks -> masks ->
FaceNet -> 3DMM coefficients -> expression maps + UV textures).

Each stage wraps the library function of its step (the same ones inference uses) and turns shard
``k`` of its inputs into shard ``k`` of its output, keeping every face in its place: a face that
failed upstream, or fails here, is a record with ``status``/``reason`` and no arrays.

Records per stage (arrays as stored; ``face_id``, ``face_sha256``, ``status``, ``reason`` always):

* ``aligned_faces``: ``image`` (224,224,3) uint8, ``landmarks5`` (5,2) crop px,
  ``landmarks5_original`` (5,2), ``trans_params`` (5,), ``bbox`` (4,), ``score``, ``source_image``,
  ``source_sha256``
* ``face_landmarks``: ``landmarks68`` (68,2) crop px, ``dense478`` (478,2) (MediaPipe),
  ``blendshapes`` (52,) (MediaPipe; names in ``facedetail.detect.landmarks.BLENDSHAPE_NAMES``)
* ``face_masks``: ``mask`` (224,224) bool, ``mask_source``
* ``facenet_embeddings``: ``facenet_embedding`` (512,) float32
* ``face_coefficients``: ``coefficients`` (K,) float32, ``fitted_landmarks68`` (68,2) crop px,
  ``fitted_landmarks68_original`` (68,2) photo px, ``landmark_nme``, ``fit_loss``, ``overlay_jpeg``
* ``uv_maps``: ``expression_map`` (3,S,S) float16 model units, ``uv_texture`` (3,S,S) uint8,
  ``texture_valid`` (1,S,S) bool, ``expression_valid`` (S,S) bool
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import cv2
import numpy as np
import pandas as pd
import torch

from facedetail.detect.faces import detect_and_align
from facedetail.estimation.estimator import estimate_coefficients, mask_options, optional_weights_path
from facedetail.io.face_ids import make_face_id
from facedetail.io.images import ImageReadError, read_image

from facedetail.data.stages import ShardInput, ShardStage
from facedetail.utils import resolve_device, settings_hash

if TYPE_CHECKING:
    from facedetail.detect.mtcnn import MtcnnFaceDetector

logger = logging.getLogger(__name__)
OK = "ok"


def _ok(record: Mapping[str, Any]) -> bool:
    return str(record.get("status", OK)) == OK


def _carry_failure(records: tuple[Mapping[str, Any], ...]) -> dict[str, Any] | None:
    """The failure record of a face that failed in any input stage, else None."""
    for record in records:
        if not _ok(record):
            return {"face_id": record["face_id"], "face_sha256": records[0].get("face_sha256", ""),
                    "status": str(record["status"]), "reason": str(record.get("reason", ""))}
    return None


def _zip(inputs: list[list[dict[str, Any]]]):
    from facedetail.data.shards import zip_shard_records

    return list(zip_shard_records(*inputs))


def _base(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"face_id": record["face_id"], "face_sha256": record.get("face_sha256", ""), "status": OK, "reason": ""}


class _BatchedStage(ShardStage):
    """A stage that processes the faces still ok in all its inputs, ``batch_size`` at a time."""

    def __init__(self, params: Mapping[str, Any], device: str = "auto") -> None:
        self.params = dict(params)
        self.device = str(device)

    def settings(self) -> dict[str, Any]:
        return {"params": self.params, "version": 1}

    def process(self, state, shard: ShardInput, inputs):
        rows = _zip(inputs)
        out: list[dict[str, Any] | None] = [_carry_failure(r) for r in rows]
        todo = [i for i, record in enumerate(out) if record is None]
        batch_size = max(1, int(self.params.get("batch_size", 8)))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for i, record in zip(batch, self.process_batch(state, [rows[i] for i in batch])):
                out[i] = record
        return out, []

    def process_batch(self, state, rows: list[tuple[dict[str, Any], ...]]) -> list[dict[str, Any]]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- align
#: Columns of the data_prep manifest: one row per face, plus one row per image without a face.
MANIFEST_COLUMNS = [
    "image", "source_path", "sha256", "status", "reason", "face_id", "face_index", "bbox", "score",
    "landmarks5", "trans_params", "image_width", "image_height", "grayscale", "had_alpha", "bit_depth",
    "exif_transposed", "file_bytes", "detection_scale", "faces_in_image", "detection_status", "detection_source",
    "frames",
]


def image_row(partition_id: str, source_path: str, data: bytes, status: str, reason: str) -> dict[str, Any]:
    """A manifest row describing the image as a whole (no face)."""
    return {
        "image": partition_id,
        "source_path": source_path,
        "sha256": hashlib.sha256(data).hexdigest(),
        "status": status,
        "reason": reason,
        "face_id": "",
        "face_index": -1,
        "bbox": None,
        "score": np.nan,
        "landmarks5": None,
        "trans_params": None,
        "image_width": pd.NA,
        "image_height": pd.NA,
        "grayscale": pd.NA,
        "had_alpha": pd.NA,
        "bit_depth": pd.NA,
        "exif_transposed": pd.NA,
        "file_bytes": len(data),
        "detection_scale": np.nan,
        "faces_in_image": 0,
        "detection_status": "",
        "detection_source": "",
        "frames": pd.NA,
    }


def process_image(
    partition_id: str,
    source_path: str,
    data: bytes,
    face_stem: str,
    detector: "MtcnnFaceDetector",
    params: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read, detect and align one file; returns (manifest rows, aligned face records).

    Never raises for a bad file: the failure becomes a manifest row with a status and a reason.
    """
    alignment = params["alignment"]
    try:
        loaded = read_image(data, max_pixels=int(params["max_image_pixels"]))
    except ImageReadError as error:
        reason = error.reason.replace("<bytes>", source_path)
        return [image_row(partition_id, source_path, data, error.status, reason)], []
    facts = {
        "image_width": loaded.width,
        "image_height": loaded.height,
        "grayscale": loaded.was_grayscale,
        "had_alpha": loaded.had_alpha,
        "bit_depth": loaded.bit_depth,
        "exif_transposed": loaded.exif_transposed,
        "frames": loaded.frames,
    }
    frames_note = f" ({loaded.frames_note})" if loaded.frames_note else ""
    try:
        found = detect_and_align(loaded.rgb, detector, int(alignment["crop_size"]), float(alignment["rescale_factor"]))
        if not found.faces:
            row = image_row(partition_id, source_path, data, found.status, found.reason + frames_note)
            row.update(facts, detection_scale=found.detection_scale)
            return [row], []
        rows, records = [], []
        sha256 = hashlib.sha256(data).hexdigest()
        min_probability = float(params["detection"].get("min_probability", 0.95)) if "detection" in params else 0.95
        for found_face in found.faces:
            index, face, aligned = found_face.index, found_face.detection, found_face.aligned
            face_id = make_face_id(face_stem, index)
            rows.append(
                {
                    **image_row(partition_id, source_path, data, "ok", f"face {index + 1} of {len(found.faces)}"
                                 + found_face.describe(min_probability) + frames_note + found.rejections),
                    **facts,
                    "face_id": face_id,
                    "face_index": index,
                    "bbox": [float(v) for v in face.bbox],
                    "score": face.score,
                    "landmarks5": [float(v) for v in face.landmarks5.reshape(-1)],
                    "trans_params": [float(v) for v in aligned.trans_params],
                    "detection_scale": found.detection_scale,
                    "faces_in_image": len(found.faces),
                    "detection_status": found_face.detection_status,
                    "detection_source": found_face.detection_source,
                }
            )
            records.append(
                {
                    "face_id": face_id,
                    "image": aligned.image,
                    "landmarks5": aligned.landmarks5,
                    "landmarks5_original": face.landmarks5.astype(np.float32),
                    "trans_params": aligned.trans_params,
                    "bbox": face.bbox.astype(np.float32),
                    "score": np.float32(face.score),
                    "source_sha256": sha256,
                    "source_image": partition_id,
                }
            )
        return rows, records
    except Exception as error:  # noqa: BLE001 - one bad image must not lose the others' results
        logger.exception("data_prep failed on %s", source_path)
        row = image_row(partition_id, source_path, data, "error", f"{source_path}: {type(error).__name__}: {error}")
        row.update(facts)
        return [row], []


class AlignStage(ShardStage):
    """Raw photos -> every face detected (MTCNN) and aligned the Deng et al. way; one manifest row per face or image."""

    name = "aligned_faces"
    index_columns = ("source_image", "score")

    def __init__(self, params: Mapping[str, Any], device: str = "auto") -> None:
        self.params = dict(params)
        self.device = str(device)

    def settings(self) -> dict[str, Any]:
        keep = {k: self.params[k] for k in ("detection", "alignment", "max_image_pixels") if k in self.params}
        # version 2: detection_status / detection_source / frames columns, every file a row (issue 11)
        return {"params": keep, "version": 2}

    def setup(self):
        from facedetail.detect.faces import detector_from_params

        return detector_from_params(self.params, self.device)

    def process(self, detector, shard: ShardInput, inputs):
        records, report = [], []
        for partition_id, source_path, stem, *_ in shard.items:
            try:
                data = Path(source_path).read_bytes()
            except OSError as error:  # permissions, broken link, loop, I/O error: a row, never a crash
                report.append(image_row(partition_id, source_path, b"", "unreadable", f"{source_path}: {error}"))
                continue
            rows, faces = process_image(partition_id, source_path, data, stem, detector, self.params)
            report.extend(rows)
            for face in faces:
                image = np.ascontiguousarray(face["image"], dtype=np.uint8)
                records.append({
                    "face_id": face["face_id"], "face_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
                    "status": OK, "reason": "", "image": image,
                    "landmarks5": np.asarray(face["landmarks5"], np.float32),
                    "landmarks5_original": np.asarray(face["landmarks5_original"], np.float32),
                    "trans_params": np.asarray(face["trans_params"], np.float32),
                    "bbox": np.asarray(face["bbox"], np.float32), "score": np.float32(face["score"]),
                    "source_image": str(face["source_image"]), "source_sha256": str(face["source_sha256"]),
                })
        return records, report

    def failed(self, shard: ShardInput, reason: str):
        return [], [image_row(item[0], item[1], b"", "error", reason) for item in shard.items]


def image_items(partition_paths: Mapping[str, str], stems: Mapping[str, str]) -> list[tuple[str, str, str, int, int]]:
    """``(partition id, path, face-id stem, size, mtime_ns)`` per image: the task key sees content changes."""
    items = []
    for partition_id, path in partition_paths.items():
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        items.append((partition_id, str(path), stems[partition_id], size, mtime))
    return items


# ------------------------------------------------------------------------------------ landmarks
class LandmarkStage(_BatchedStage):
    """68 iBUG landmarks (dlib's iBUG-trained predictor, MediaPipe -> iBUG-68, or FAN) plus MediaPipe's dense
    points and blendshapes."""

    name = "face_landmarks"

    @classmethod
    def from_estimation(
        cls, estimation: Mapping[str, Any], device: str = "auto", weights: Mapping[str, Any] | None = None
    ) -> "LandmarkStage":
        path = optional_weights_path((weights or {}).get("dlib_landmarks"), "dlib_landmarks")
        landmarks = estimation.get("landmarks") or {}
        params = {"backend": landmarks.get("backend", "mediapipe"), "blend_inner": bool(landmarks.get("blend_inner", True)),
                  "mirror_average": bool(landmarks.get("mirror_average", True)),
                  "dlib_box": str(landmarks.get("dlib_box", "mediapipe")),
                  "batch_size": estimation.get("batch_size", 8), "dlib_predictor": str(path) if path else None}
        return cls(params, device)

    def setup(self):
        from facedetail.detect.landmarks import LandmarkDetector

        return LandmarkDetector(backend=str(self.params.get("backend", "mediapipe")), device=resolve_device(self.device),
                                dlib_predictor=self.params.get("dlib_predictor"), blend_inner=bool(self.params.get("blend_inner", True)),
                                mirror_average=bool(self.params.get("mirror_average", True)),
                                dlib_box=str(self.params.get("dlib_box", "mediapipe")))

    def process_batch(self, detector, rows):
        crops = np.stack([r[0]["image"] for r in rows])
        detected = detector.detect(crops)
        out = []
        for j, (aligned,) in enumerate(rows):
            if not bool(detected.found[j]):
                out.append({**_base(aligned), "status": "no_landmarks", "reason": "the 68-point detector found no face in the crop"})
                continue
            record = {**_base(aligned), "landmarks68": np.asarray(detected.landmarks68[j], np.float32)}
            if detected.dense is not None:
                record["dense478"] = np.asarray(detected.dense[j], np.float32)
            if detected.blendshapes is not None:
                record["blendshapes"] = np.asarray(detected.blendshapes[j], np.float32)
            out.append(record)
        return out


# ---------------------------------------------------------------------------------------- masks
class MaskStage(_BatchedStage):
    """Photometric face mask: BiSeNet when its weights are configured, else landmarks + skin colour model."""

    name = "face_masks"
    index_columns = ("mask_source",)

    @classmethod
    def from_estimation(cls, estimation: Mapping[str, Any], weights: Mapping[str, Any], device: str = "auto") -> "MaskStage":
        return cls({**(estimation.get("masks") or {}), "batch_size": estimation.get("batch_size", 8)}, weights, device)

    def __init__(self, params, weights: Mapping[str, Any], device: str = "auto") -> None:
        super().__init__(params, device)
        path = optional_weights_path(weights.get("bisenet"), "bisenet")
        self.bisenet_path = str(path) if path is not None else None

    def settings(self) -> dict[str, Any]:
        digest = settings_hash(os.stat(self.bisenet_path).st_mtime_ns) if self.bisenet_path else None
        return {**super().settings(), "bisenet": self.bisenet_path, "bisenet_mtime": digest}

    def setup(self):
        if self.bisenet_path is None:
            return None
        from facedetail.parsing.bisenet import load_bisenet

        return load_bisenet(self.bisenet_path, device=resolve_device(self.device))

    def process_batch(self, parser, rows):
        from facedetail.parsing.skin_mask import face_mask

        out = []
        for aligned, landmarks in rows:
            mask, source = face_mask(aligned["image"], landmarks.get("dense478"), parser, **mask_options(self.params))
            out.append({**_base(aligned), "mask": np.asarray(mask, bool), "mask_source": str(source)})
        return out


# -------------------------------------------------------------------------------------- FaceNet
class FaceNetStage(_BatchedStage):
    """FaceNet (Inception-ResNet-v1) identity embedding of each aligned crop."""

    name = "facenet_embeddings"

    @classmethod
    def from_estimation(cls, estimation: Mapping[str, Any], weights: Mapping[str, Any], device: str = "auto") -> "FaceNetStage":
        params = {"facenet_embeddings": estimation.get("facenet_embeddings", True), "batch_size": estimation.get("batch_size", 8)}
        return cls(params, weights, device)

    def __init__(self, params, weights: Mapping[str, Any], device: str = "auto") -> None:
        super().__init__(params, device)
        self.weights = {"facenet": weights.get("facenet") or None, "facenet_cache": weights.get("facenet_cache")}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "weights": self.weights}

    def setup(self):
        from facedetail.models.facenet import load_face_embedder

        if not self.params.get("facenet_embeddings", True):
            return None
        embedder, _ = load_face_embedder(self.weights["facenet"], self.weights["facenet_cache"], resolve_device(self.device))
        return embedder

    def process_batch(self, embedder, rows):
        if embedder is None:
            return [{**_base(a), "status": "skipped", "reason": "estimation.facenet_embeddings is false"} for (a,) in rows]
        device = next(embedder.parameters()).device
        images = torch.from_numpy(np.stack([a["image"] for (a,) in rows])).permute(0, 3, 1, 2).float().div(255).to(device)
        with torch.no_grad():
            embeddings = embedder(images).cpu().numpy().astype(np.float32)
        return [{**_base(a), "facenet_embedding": e} for (a,), e in zip(rows, embeddings)]


# --------------------------------------------------------------------------------- coefficients
class CoefficientStage(_BatchedStage):
    """3DMM coefficients: analysis-by-synthesis fit (ICT/BFM) or the Deng regressor; cached per face."""

    name = "face_coefficients"
    index_columns = ("landmark_nme", "fit_loss")

    def __init__(self, params, face_model_params: Mapping[str, Any], weights: Mapping[str, Any], device: str = "auto") -> None:
        super().__init__(params, device)
        self.face_model_params = dict(face_model_params)
        deng = optional_weights_path(weights.get("deng_regressor"), "deng_regressor")
        self.deng_path = str(deng) if deng is not None else None

    def _model_path(self) -> str:
        kind = str(self.face_model_params.get("kind", "ict")).lower()
        return str(self.face_model_params.get(f"{kind}_path", ""))

    def settings(self) -> dict[str, Any]:
        use_regressor = self.face_model_params.get("kind") == "bfm" and self.deng_path and self.params.get("bfm_use_regressor", True)
        keep = {k: self.params.get(k) for k in ("fitting", "use_blendshape_init", "bfm_use_regressor")}
        return {"params": keep, "face_model": self.face_model_params.get("kind"), "model_file": settings_hash(self._model_path()),
                "regressor": self.deng_path if use_regressor else None, "version": 1}

    @classmethod
    def from_estimation(cls, estimation: Mapping[str, Any], face_model_params, weights, device: str = "auto") -> "CoefficientStage":
        """The stage of the ``estimation`` parameters (the pipeline node and the engine build it the same way)."""
        params = {k: estimation.get(k) for k in ("fitting", "use_blendshape_init", "bfm_use_regressor", "cache", "cache_dir")}
        params["batch_size"] = estimation.get("fit_batch_size", estimation.get("batch_size", 8))
        return cls(params, face_model_params, weights, device)

    def setup(self):
        from facedetail.geometry.face_model import load_face_model_from_params

        return self.state_for(load_face_model_from_params(self.face_model_params, resolve_device(self.device)))

    def state_for(self, face_model) -> dict[str, Any]:
        """The stage's state around an already loaded face model (regressor, fit settings, per-face cache)."""
        from facedetail.estimation.cache import FaceCache
        from facedetail.estimation.fitting import FitSettings

        regressor = None
        if self.settings()["regressor"]:
            from facedetail.models.deng_regressor import load_deng_regressor

            regressor = load_deng_regressor(self.deng_path, device=face_model.device)
        cache_dir = self.params.get("cache_dir") if self.params.get("cache", True) else None
        return {
            "face_model": face_model,
            "regressor": regressor,
            "fit_settings": FitSettings(**dict(self.params.get("fitting", {}))),
            "cache": FaceCache(cache_dir, self.name, self.settings()) if cache_dir else None,
        }

    def process_batch(self, state, rows):
        from facedetail.detect.align import aligned_to_original
        from facedetail.detect.landmarks import BLENDSHAPE_NAMES
        cache = state["cache"]
        results: list[dict[str, Any] | None] = [cache.get(r[0]["face_sha256"]) if cache is not None else None for r in rows]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            crops = np.stack([rows[i][0]["image"] for i in todo])
            landmarks = np.stack([rows[i][1]["landmarks68"] for i in todo])
            masks = np.stack([rows[i][2]["mask"] for i in todo])
            blendshapes = None
            if self.params.get("use_blendshape_init", False) and all("blendshapes" in rows[i][1] for i in todo):
                blendshapes = (list(BLENDSHAPE_NAMES), np.stack([rows[i][1]["blendshapes"] for i in todo]))
            fit = estimate_coefficients(state["face_model"], crops, landmarks, masks, state["fit_settings"],
                                        regressor=state["regressor"], blendshapes=blendshapes)
            nan = np.full(len(todo), np.nan)
            for j, i in enumerate(todo):
                ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(fit["overlays"][j][..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
                results[i] = {
                    "coefficients": np.asarray(fit["coefficients"][j], np.float32),
                    "fitted_landmarks68": np.asarray(fit["fitted_landmarks68"][j], np.float32),
                    "landmark_nme": np.float32(fit["losses"].get("landmark_nme", nan)[j]),
                    "fit_loss": np.float32(fit["losses"].get("total", nan)[j]),
                    "overlay_jpeg": jpeg.reshape(-1) if ok else np.zeros(0, np.uint8),
                }
                if cache is not None:
                    cache.put(rows[i][0]["face_sha256"], results[i])
        out = []
        for (aligned, *_), result in zip(rows, results):
            record = {**_base(aligned), **result}
            if "trans_params" in aligned:
                original = aligned_to_original(result["fitted_landmarks68"], aligned["trans_params"], aligned["image"].shape[0])
                record["fitted_landmarks68_original"] = np.asarray(original, np.float32)
            out.append(record)
        return out


# ------------------------------------------------------------------------------------- UV maps
class UVMapStage(_BatchedStage):
    """Expression map (B·β baked into UV) and the photo unwrapped into UV with its visibility."""

    name = "uv_maps"

    def __init__(self, params, face_model_params: Mapping[str, Any], device: str = "auto") -> None:
        super().__init__(params, device)
        self.face_model_params = dict(face_model_params)

    def settings(self) -> dict[str, Any]:
        kind = str(self.face_model_params.get("kind", "ict")).lower()
        return {**super().settings(), "face_model": kind, "model_file": settings_hash(str(self.face_model_params.get(f"{kind}_path")))}

    def setup(self):
        from facedetail.geometry.face_model import load_face_model_from_params

        return load_face_model_from_params(self.face_model_params, resolve_device(self.device))

    def process_batch(self, face_model, rows):
        from facedetail.geometry.face_uv import generator_inputs

        images = torch.from_numpy(np.stack([a["image"] for a, _ in rows])).permute(0, 3, 1, 2).to(face_model.device)
        coefficients = torch.from_numpy(np.stack([c["coefficients"] for _, c in rows])).to(face_model.device)
        maps = generator_inputs(face_model, coefficients, images, int(self.params["uv_size"]), self.params.get("backend", "auto"))
        return [
            {**_base(a), "expression_map": maps["expression_maps"][j], "uv_texture": maps["uv_textures"][j],
             "texture_valid": maps["texture_valid"][j], "expression_valid": maps["expression_valid"]}
            for j, (a, _) in enumerate(rows)
        ]


# --------------------------------------------------------------------------- crops in memory
@dataclass
class EstimationResult:
    """Arrays of the faces estimated successfully, plus one report row per input face."""

    arrays: dict[str, np.ndarray]
    report: list[dict[str, Any]] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0


class FaceEstimator:
    """The estimation stages (landmarks -> mask -> coefficients, + FaceNet) on crops held in memory.

    The inference engine (``facedetail fit``/``reconstruct``, the registered model) runs exactly the
    code the pipeline's shard tasks run, with the same per-face coefficient cache: a face the
    pipeline fitted is a cache hit here.

    Args:
        face_model: the loaded morphable model (shared with the caller).
        face_model_params: the ``face_model`` parameters (part of the cache key).
        device: torch device.
        estimation: the ``estimation`` parameters.
        weights: the ``weights`` parameters.
        cache_root: per-face coefficient cache folder (None: no cache).
        embedder: optional frozen FaceNet (adds ``facenet_embeddings``).
    """

    def __init__(self, face_model, face_model_params: Mapping[str, Any], device, estimation: Mapping[str, Any],
                 weights: Mapping[str, Any] | None = None, cache_root: str | os.PathLike | None = None, embedder=None) -> None:
        weights = dict(weights or {})
        device = str(device)
        estimation = {**dict(estimation), "cache": cache_root is not None, "cache_dir": str(cache_root) if cache_root else None}
        self.face_model = face_model
        self.landmark_stage = LandmarkStage.from_estimation(estimation, device, weights)
        self.mask_stage = MaskStage.from_estimation(estimation, weights, device)
        self.coefficient_stage = CoefficientStage.from_estimation(estimation, face_model_params, weights, device)
        self.embedder = embedder
        self.states = {
            "landmarks": self.landmark_stage.setup(),
            "masks": self.mask_stage.setup(),
            "coefficients": self.coefficient_stage.state_for(face_model),
        }

    def close(self) -> None:
        self.states["landmarks"].close()

    def __enter__(self) -> "FaceEstimator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def estimate(self, crops: np.ndarray, face_ids: list[str], face_sha256: list[str]) -> EstimationResult:
        """Estimate every crop (coefficients cached per face content); failed faces are reported, not raised."""
        from facedetail.data.stages import ShardInput

        aligned = [{"face_id": f, "face_sha256": h, "status": OK, "reason": "", "image": np.asarray(c, np.uint8)}
                   for f, h, c in zip(face_ids, face_sha256, crops)]
        shard = ShardInput(0, face_ids=tuple(face_ids))
        landmarks, _ = self.landmark_stage.process(self.states["landmarks"], shard, [aligned])
        masks, _ = self.mask_stage.process(self.states["masks"], shard, [aligned, landmarks])
        cache = self.states["coefficients"]["cache"]
        hits_before = cache.hits if cache is not None else 0
        coefficients, _ = self.coefficient_stage.process(self.states["coefficients"], shard, [aligned, landmarks, masks])
        ok = [k for k, record in enumerate(coefficients) if record["status"] == OK]
        embeddings = None
        if self.embedder is not None and ok:
            with torch.no_grad():
                images = torch.from_numpy(np.stack([crops[k] for k in ok])).permute(0, 3, 1, 2).float().div(255)
                embeddings = self.embedder(images.to(next(self.embedder.parameters()).device)).cpu().numpy().astype(np.float32)
        report = [
            {"face_id": c["face_id"], "status": c["status"], "reason": c.get("reason", ""), "mask_source": str(m.get("mask_source", "")),
             "landmark_nme": float(c.get("landmark_nme", np.nan)), "fit_loss": float(c.get("fit_loss", np.nan))}
            for c, m in zip(coefficients, masks)
        ]
        size = crops.shape[1] if len(crops) else 224

        def stacked(records, key, empty_shape, dtype):
            return np.stack([np.asarray(records[k][key]) for k in ok]).astype(dtype) if ok else np.zeros(empty_shape, dtype)

        arrays = {
            "face_ids": np.asarray([face_ids[k] for k in ok], dtype=str),
            "face_sha256": np.asarray([face_sha256[k] for k in ok], dtype=str),
            "landmarks68": stacked(landmarks, "landmarks68", (0, 68, 2), np.float32),
            "fitted_landmarks68": stacked(coefficients, "fitted_landmarks68", (0, 68, 2), np.float32),
            "masks": stacked(masks, "mask", (0, size, size), bool),
            "mask_source": np.asarray([str(masks[k]["mask_source"]) for k in ok], dtype=str),
            "coefficients": stacked(coefficients, "coefficients", (0, self.face_model.layout.total), np.float32),
            "overlays": np.stack([_decode_overlay(coefficients[k], crops[k]) for k in ok]) if ok else np.zeros((0, size, size, 3), np.uint8),
            "landmark_nme": stacked(coefficients, "landmark_nme", (0,), np.float32),
            "fit_loss": stacked(coefficients, "fit_loss", (0,), np.float32),
            "face_model_kind": np.asarray(self.face_model.kind),
        }
        if embeddings is not None:
            arrays["facenet_embeddings"] = embeddings
        hits = (cache.hits - hits_before) if cache is not None else 0
        return EstimationResult(arrays, report, hits, len(ok) - hits)


def _decode_overlay(record: Mapping[str, Any], crop: np.ndarray) -> np.ndarray:
    """The fit overlay stored as JPEG, decoded to uint8 RGB (the crop itself when there is none)."""
    jpeg = np.asarray(record.get("overlay_jpeg", np.zeros(0, np.uint8)), np.uint8)
    if jpeg.size == 0:
        return np.asarray(crop, np.uint8)
    return np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1])
