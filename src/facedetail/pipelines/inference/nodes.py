"""Nodes of the inference pipeline (thin wiring around :mod:`facedetail.engine`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from facedetail.engine.export import export_face
from facedetail.engine.fitter import REPORT_COLUMNS
from facedetail.engine.inputs import looks_like_image
from facedetail.engine.reconstructor import Reconstructor

logger = logging.getLogger(__name__)

#: Columns of ``inference_report``: the status columns, then the written files (empty when not ok).
FILE_COLUMNS = ["json", "coarse_obj", "detail_obj", "texture", "displacement_png", "normal_object_png", "normal_tangent_png", "glb", "coefficients_npz", "strip_png"]


def select_images(partitions: dict[str, Callable[[], bytes]], extensions: list[str]) -> dict[str, Callable[[], bytes]]:
    """EVERY partition, sorted by id (images are recognised by content; a non-image gets its report row).

    Raises:
        ValueError: no partition is an image by extension or content (an empty or wrong folder is an error).
    """
    selected = {name: partitions[name] for name in sorted(partitions)}

    def path_of(loader: Callable[[], bytes]) -> str | None:
        path = getattr(getattr(loader, "__self__", None), "filepath", None)
        return None if path is None else str(path)

    if not any(looks_like_image(name, extensions, path_of(loader)) for name, loader in selected.items()):
        raise ValueError(
            f"inference found no images ({len(partitions)} file(s), none of them an image Pillow can read); put "
            "photos in data/01_raw/faces or point FACEDETAIL_INFERENCE_IMAGES at a folder of images"
        )
    return selected


def _local_path_or_loader(loader: Callable[[], bytes]) -> Path | Callable[[], bytes]:
    """A local partition's file path (its read errors become the same rows as ``facedetail fit``/``reconstruct``'s:
    permission denied, broken link, link loop...), else the partition's loader."""
    filepath = getattr(getattr(loader, "__self__", None), "filepath", None)
    if filepath is None or "://" in str(filepath):
        return loader
    return Path(filepath)


def reconstruct_and_export(
    inference_images: dict[str, Callable[[], bytes]],
    detail_model: dict[str, Any],
    inference_params: dict[str, Any],
    face_model_params: dict[str, Any],
    weights_params: dict[str, Any],
    data_prep_params: dict[str, Any],
    estimation_params: dict[str, Any],
    uv_params: dict[str, Any],
    device: str,
) -> pd.DataFrame:
    """Reconstruct every face of every image and write its exports under ``inference.output_dir``.

    Returns:
        ``inference_report``: one row per face (status ``ok`` + the written files) and one per image that gave
        no face (status, reason).
    """
    images = select_images(inference_images, list(data_prep_params["image_extensions"]))
    params = {
        "face_model": face_model_params, "weights": weights_params, "data_prep": data_prep_params,
        "estimation": estimation_params, "uv_maps": uv_params, "inference": inference_params, "device": device,
    }
    out_dir = Path(inference_params["output_dir"])
    files: dict[str, dict[str, str]] = {}
    with Reconstructor.from_params(detail_model, params, device) as reconstructor:
        for rec in reconstructor.iter_reconstructions([_local_path_or_loader(loader) for loader in images.values()], list(images),
                                                      chunk_size=int(inference_params.get("chunk_size", 8))):
            files[rec.face_id] = export_face(rec, out_dir, reconstructor.face_model,
                                           units=inference_params.get("export_units"))
        rows = [{**row, **{k: files.get(row["face_id"], {}).get(k, "") for k in FILE_COLUMNS}} for row in reconstructor.last_report]
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS + FILE_COLUMNS)
    logger.info("inference: %d face(s) from %d image(s) written to %s", len(files), len(images), out_dir)
    return report


def summarise_inference(inference_report: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Counts for MLflow (``MlflowMetricsHistoryDataset`` format): images, faces and rows per status."""
    counts = {"images": float(inference_report["image"].nunique()), "faces": float((inference_report["status"] == "ok").sum())}
    for status, number in inference_report["status"].value_counts().items():
        if status != "ok":
            counts[f"rows_{status}"] = float(number)
    return {name: {"value": value, "step": 0} for name, value in counts.items()}
