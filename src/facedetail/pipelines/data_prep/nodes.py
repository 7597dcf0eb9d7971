"""Nodes of the ``data_prep`` pipeline: raw photos -> face manifest + aligned 224x224 crops.

Every input file gets a manifest row, whatever happens to it; a bad file never stops the run.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from facedetail.detect.faces import detect_and_align, detector_from_params
from facedetail.detect.mtcnn import MtcnnFaceDetector
from facedetail.io.face_ids import image_stems, make_face_id
from facedetail.io.images import ImageReadError, contact_sheet, draw_points, read_image

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "image", "source_path", "sha256", "status", "reason", "face_id", "face_index", "bbox", "score",
    "landmarks5", "trans_params", "image_width", "image_height", "grayscale", "had_alpha", "bit_depth",
    "exif_transposed", "file_bytes", "detection_scale", "faces_in_image",
]


def _source_path(partition_id: str, loader: Callable[[], bytes]) -> str:
    """Path of a partition's file (taken from the partition's dataset when it exposes ``filepath``)."""
    dataset = getattr(loader, "__self__", None)
    return str(getattr(dataset, "filepath", partition_id))


def select_image_partitions(
    partitions: dict[str, Callable[[], bytes]], extensions: list[str], folder_hint: str = "the raw faces folder"
) -> dict[str, Callable[[], bytes]]:
    """Keep partitions whose file name ends with one of ``extensions`` (any case), sorted by id.

    Raises:
        ValueError: when no partition has an image extension (an empty folder is an error, not a no-op).
    """
    wanted = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)
    selected = {pid: partitions[pid] for pid in sorted(partitions) if pid.lower().endswith(wanted)}
    ignored = sorted(set(partitions) - set(selected))
    if ignored:
        logger.info("data_prep ignores %d file(s) without an image extension: %s", len(ignored), ignored[:10])
    if not selected:
        example = next(iter(partitions.values()), None)
        where = str(PurePosixPath(_source_path("", example)).parent) if example else folder_hint
        raise ValueError(
            f"data_prep found no images in '{where}' ({len(partitions)} file(s), none ending in "
            f"{', '.join(wanted)}); put photos there or point FACEDETAIL_RAW_FACES at a folder of images"
        )
    return selected


def make_face_ids(partition_ids: list[str]) -> dict[str, str]:
    """Map each partition id to its unique, file-name-safe stem (:func:`facedetail.io.face_ids.image_stems`, the
    rule the engine uses too); face ids are ``<stem>__f<k>``."""
    return dict(zip(partition_ids, image_stems(partition_ids)))


def _image_row(partition_id: str, source_path: str, data: bytes, status: str, reason: str) -> dict[str, Any]:
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
    }


def process_image(
    partition_id: str,
    source_path: str,
    data: bytes,
    face_stem: str,
    detector: MtcnnFaceDetector,
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
        return [_image_row(partition_id, source_path, data, error.status, reason)], []
    facts = {
        "image_width": loaded.width,
        "image_height": loaded.height,
        "grayscale": loaded.was_grayscale,
        "had_alpha": loaded.had_alpha,
        "bit_depth": loaded.bit_depth,
        "exif_transposed": loaded.exif_transposed,
    }
    try:
        found = detect_and_align(loaded.rgb, detector, int(alignment["crop_size"]), float(alignment["rescale_factor"]))
        if not found.faces:
            row = _image_row(partition_id, source_path, data, found.status, found.reason)
            row.update(facts, detection_scale=found.detection_scale)
            return [row], []
        rows, records = [], []
        sha256 = hashlib.sha256(data).hexdigest()
        for index, face, aligned in ((f.index, f.detection, f.aligned) for f in found.faces):
            face_id = make_face_id(face_stem, index)
            rows.append(
                {
                    **_image_row(partition_id, source_path, data, "ok", f"face {index + 1} of {len(found.faces)}"
                                 + found.rejections),
                    **facts,
                    "face_id": face_id,
                    "face_index": index,
                    "bbox": [float(v) for v in face.bbox],
                    "score": face.score,
                    "landmarks5": [float(v) for v in face.landmarks5.reshape(-1)],
                    "trans_params": [float(v) for v in aligned.trans_params],
                    "detection_scale": found.detection_scale,
                    "faces_in_image": len(found.faces),
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
        row = _image_row(partition_id, source_path, data, "error", f"{source_path}: {type(error).__name__}: {error}")
        row.update(facts)
        return [row], []


def bundle_aligned_faces(records: list[dict[str, Any]], crop_size: int) -> dict[str, np.ndarray]:
    """Stack per-face records into the ``aligned_faces`` bundle (axis 0 follows ``face_ids``)."""
    count = len(records)

    def stack(key: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if count == 0:
            return np.zeros((0, *shape), dtype=dtype)
        return np.stack([np.asarray(record[key], dtype=dtype) for record in records])

    images = stack("image", (crop_size, crop_size, 3), np.uint8)
    return {
        "face_ids": np.array([r["face_id"] for r in records], dtype=str).reshape(count),
        "images": images,
        "landmarks5": stack("landmarks5", (5, 2), np.float32),
        "landmarks5_original": stack("landmarks5_original", (5, 2), np.float32),
        "trans_params": stack("trans_params", (5,), np.float32),
        "bbox": stack("bbox", (4,), np.float32),
        "scores": stack("score", (), np.float32),
        "source_images": np.array([r["source_image"] for r in records], dtype=str).reshape(count),
        "source_sha256": np.array([r["source_sha256"] for r in records], dtype=str).reshape(count),
        "face_sha256": np.array([hashlib.sha256(image.tobytes()).hexdigest() for image in images], dtype=str)
        .reshape(count),
    }


def detect_and_align_faces(
    raw_faces: dict[str, Callable[[], bytes]], params: dict[str, Any], device: str
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Detect every face in every raw image and align it the Deng et al. way.

    Args:
        raw_faces: ``PartitionedDataset`` of ``RawBytesDataset``: partition id -> loader of the file's bytes.
        params: ``params:data_prep`` (image_extensions, max_image_pixels, detection, alignment).
        device: ``params:device`` ("auto", "cpu", "cuda", ...).

    Returns:
        ``face_manifest`` (one row per face, plus one row per image without faces) and the
        ``aligned_faces`` bundle.
    """
    images = select_image_partitions(raw_faces, list(params["image_extensions"]))
    detector = detector_from_params(params, device)
    stems = make_face_ids(list(images))
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    statuses: Counter[str] = Counter()
    progress = tqdm(images.items(), total=len(images), desc="data_prep: detect + align", unit="image")
    for partition_id, loader in progress:
        source_path = _source_path(partition_id, loader)
        try:
            data = loader()
        except Exception as error:  # noqa: BLE001 - unreadable from disk (permissions, broken link)
            image_rows = [_image_row(partition_id, source_path, b"", "unreadable", f"{source_path}: {error}")]
            image_records: list[dict[str, Any]] = []
        else:
            image_rows, image_records = process_image(partition_id, source_path, data, stems[partition_id], detector, params)
        rows.extend(image_rows)
        records.extend(image_records)
        statuses[image_rows[0]["status"]] += 1
        progress.set_postfix(faces=len(records), **{k: v for k, v in statuses.items() if k != "ok"})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for column in ("image_width", "image_height", "bit_depth"):
        manifest[column] = manifest[column].astype("Int64")
    for column in ("grayscale", "had_alpha", "exif_transposed"):
        manifest[column] = manifest[column].astype("boolean")
    logger.info("data_prep: %d image(s), %d face(s), image statuses %s", len(images), len(records), dict(statuses))
    return manifest, bundle_aligned_faces(records, int(params["alignment"]["crop_size"]))


def make_contact_sheet(aligned_faces: dict[str, np.ndarray], params: dict[str, Any]) -> Image.Image:
    """A PNG-ready sheet of the aligned crops (first ``contact_sheet.max_faces``) with their 5 points drawn."""
    sheet_params = params.get("contact_sheet", {})
    limit = int(sheet_params.get("max_faces", 48))
    images = aligned_faces["images"][:limit]
    points = aligned_faces["landmarks5"][:limit]
    tiles = [draw_points(image, landmarks, radius=2.5) for image, landmarks in zip(images, points)]
    labels = [str(face_id) for face_id in aligned_faces["face_ids"][:limit]]
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
            "" if values is None else " ".join(f"{float(v):.3f}" for v in values) for values in report[column]
        ]
    return metrics, report
