"""Nodes of the ``data_prep`` pipeline: raw photos -> face manifest + aligned 224x224 crops.

Every input file gets a manifest row, whatever happens to it; a bad file never stops the run.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from facedetail.data.execution import run_face_stage, worker_count
from facedetail.data.face_stages import MANIFEST_COLUMNS, AlignStage, image_items
from facedetail.data.shards import FaceShards
from facedetail.data.stages import ShardInput
from facedetail.io.face_ids import image_stems
from facedetail.io.images import ImageReadError, contact_sheet, draw_points, read_image
from facedetail.utils import SettingError

logger = logging.getLogger(__name__)

def _source_path(partition_id: str, loader: Callable[[], bytes]) -> str:
    """Path of a partition's file (taken from the partition's dataset when it exposes ``filepath``)."""
    dataset = getattr(loader, "__self__", None)
    return str(getattr(dataset, "filepath", partition_id))


def select_image_partitions(
    partitions: dict[str, Callable[[], bytes]], extensions: list[str], folder_hint: str = "the raw faces folder"
) -> dict[str, Callable[[], bytes]]:
    """EVERY partition, sorted by id: images are recognised by content when read, and a file that is not an image
    gets its manifest row (``not_an_image``) like any other failure. ``extensions`` only spares a look inside
    (Pillow reads the header) while checking that the folder holds at least one image.

    Raises:
        SettingError: (a ValueError) when no partition is an image by extension or content (an empty folder is an error, not a no-op).
    """
    from facedetail.engine.inputs import looks_like_image

    selected = {pid: partitions[pid] for pid in sorted(partitions)}
    if not any(looks_like_image(pid, extensions, _source_path(pid, loader)) for pid, loader in selected.items()):
        example = next(iter(partitions.values()), None)
        where = str(PurePosixPath(_source_path("", example)).parent) if example else folder_hint
        raise SettingError(
            f"data_prep found no images in '{where}' ({len(partitions)} file(s), none of them an image Pillow can "
            "read); put photos there or point FACEDETAIL_RAW_FACES at a folder of images"
        )
    return selected


def _as_bool(value: Any) -> Any:
    """A manifest flag as True/False, or ``pd.NA`` when unknown (rows of files that are not images; cached reports
    may hand the flags back as numpy bools, strings or None)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    return pd.NA


def make_face_ids(partition_ids: list[str]) -> dict[str, str]:
    """Map each partition id to its unique, file-name-safe stem (:func:`facedetail.io.face_ids.image_stems`, the
    rule the engine uses too); face ids are ``<stem>__f<k>``."""
    return dict(zip(partition_ids, image_stems(partition_ids)))


def images_per_shard(n_images: int, shard_size: int, workers: int) -> int:
    """At most ``shard_size`` images per shard; a folder of fewer than ``workers x shard_size`` images is split
    evenly so that every worker gets a shard (the run's peak memory is then the same at every folder size:
    every worker holds its models; with one 40-photo shard one of two workers stayed idle, measured)."""
    return max(1, min(int(shard_size), math.ceil(n_images / max(1, int(workers)))))


def detect_and_align_faces(
    raw_faces: dict[str, Callable[[], bytes]], params: dict[str, Any], device: str, execution: dict[str, Any]
) -> tuple[pd.DataFrame, FaceShards]:
    """Detect every face in every raw image and align it the Deng et al. way, shard by shard.

    Args:
        raw_faces: ``PartitionedDataset`` of ``RawBytesDataset`` (only the file paths are used here:
            the workers read the files).
        params: ``params:data_prep`` (image_extensions, max_image_pixels, detection, alignment, shard_size).
        device: ``params:device``.
        execution: ``params:execution`` (Dask scheduler, work folder).

    Returns:
        ``face_manifest`` (one row per face, plus one row per image without faces) and the sharded
        ``aligned_faces`` dataset (shard k holds the faces of images ``k*shard_size ...``).
    """
    images = select_image_partitions(raw_faces, list(params["image_extensions"]))
    stems = make_face_ids(list(images))
    items = image_items({pid: _source_path(pid, loader) for pid, loader in images.items()}, stems)
    size = images_per_shard(len(items), int(params.get("shard_size", 256)), worker_count(execution))
    shards = [ShardInput(number=k, items=tuple(items[start : start + size])) for k, start in enumerate(range(0, len(items), size))]
    stage = AlignStage(params, device)
    aligned, report = run_face_stage(stage, shards, execution, meta={"crop_size": int(params["alignment"]["crop_size"])})
    # the manifest rows stayed on disk (one parquet part per shard, appended by the stage runner): read them as columns
    rows = report.frame() if len(report) else pd.DataFrame()
    manifest = rows.reindex(columns=MANIFEST_COLUMNS) if len(rows) else pd.DataFrame([], columns=MANIFEST_COLUMNS)
    del rows
    for column in ("bbox", "landmarks5", "trans_params"):  # list columns as plain lists (None where no face), as before
        manifest[column] = [value.tolist() if isinstance(value, np.ndarray) else value for value in manifest[column]]
    manifest = manifest.replace({None: pd.NA}) if len(manifest) else manifest
    for column in ("image_width", "image_height", "bit_depth", "frames"):
        manifest[column] = pd.to_numeric(manifest[column], errors="coerce").astype("Int64")
    for column in ("grayscale", "had_alpha", "exif_transposed"):
        manifest[column] = pd.array([_as_bool(value) for value in manifest[column]], dtype="boolean")
    for column in ("score", "detection_scale"):
        manifest[column] = pd.to_numeric(manifest[column], errors="coerce").astype(float)
    statuses = manifest.drop_duplicates("image")["status"].value_counts().to_dict() if len(manifest) else {}
    logger.info("data_prep: %d image(s), %d face(s) in %d shard(s), image statuses %s", len(images), len(aligned), aligned.num_shards, statuses)
    return manifest, aligned


def make_contact_sheet(aligned_faces: FaceShards, params: dict[str, Any]) -> Image.Image:
    """A PNG-ready sheet of the first aligned crops (``contact_sheet.max_faces``) with their 5 points drawn."""
    sheet_params = params.get("contact_sheet", {})
    limit = int(sheet_params.get("max_faces", 48))
    tiles, labels = [], []
    for face in aligned_faces.iter_faces():
        if len(tiles) >= limit:
            break
        if face.get("status", "ok") == "ok":
            tiles.append(draw_points(face["image"], face["landmarks5"], radius=2.5))
            labels.append(str(face["face_id"]))
    sheet = contact_sheet(tiles, labels, tile_size=int(sheet_params.get("tile_size", 160)))
    return Image.fromarray(sheet)


def summarise_manifest(face_manifest: pd.DataFrame) -> tuple[dict[str, dict[str, float]], pd.DataFrame]:
    """Counts for MLflow and a CSV-friendly copy of the manifest for the run's artifacts.

    Counts: ``images``, ``faces`` and ``images_<status>`` (an image with at least one face counts as ``ok``),
    in the ``MlflowMetricsHistoryDataset`` format ``{name: {"value": v, "step": 0}}``. In the report, list
    columns (bbox, landmarks5, trans_params) become space-separated numbers.
    """
    per_image = face_manifest.drop_duplicates("image")
    counts: dict[str, float] = {
        "images": float(len(per_image)),
        "faces": float((face_manifest["status"] == "ok").sum()),
    }
    for status, number in per_image["status"].value_counts().items():
        counts[f"images_{status}"] = float(number)
    metrics = {name: {"value": value, "step": 0} for name, value in counts.items()}
    report = face_manifest.copy()
    for column in ("bbox", "landmarks5", "trans_params"):
        report[column] = [
            " ".join(f"{float(v):.3f}" for v in values) if isinstance(values, (list, tuple, np.ndarray)) else ""
            for values in report[column]
        ]
    return metrics, report
