"""Evaluation of a trained detail generator on held-out faces (plain module: no Kedro, no MLflow).

Per face: masked photometric error (mean L1 of [0, 1] RGB over the face mask) of the coarse and
of the detailed render, FaceNet cosine similarity of each render (composited over the photo) to
the photo, and the landmark error of the coarse fit (normalised by the outer-eye-corner distance).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from facedetail.geometry.face_model import FaceModel  # noqa: E402
from facedetail.losses.photometric import masked_photometric_loss  # noqa: E402
from facedetail.models.detail_model import DetailGenerator  # noqa: E402
from facedetail.render.detail import DetailRenderer  # noqa: E402
from facedetail.data.faces import FaceTensors  # noqa: E402

METRICS = ("photometric_l1", "facenet_cosine")


@torch.no_grad()
def evaluate_faces(
    generator: DetailGenerator,
    data: FaceTensors | Iterable[FaceTensors],
    face_model: FaceModel,
    embedder: torch.nn.Module | None,
    device: torch.device,
    albedo_blur_sigma: float = 2.0,
    batch_size: int = 8,
    landmark_nme: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """One row per face: coarse vs. detailed photometric error and FaceNet similarity.

    Args:
        data: the faces, in memory (split into ``batch_size`` batches) or as a stream of batches
            (e.g. :class:`facedetail.data.streaming.ShardBatches` over the validation split).
        landmark_nme: the coarse fit's landmark error by face id (added as a column when given).
    """
    if isinstance(data, FaceTensors):
        data = [data.subset(index) for index in torch.arange(len(data)).split(batch_size)]
    renderer = None
    rows = []
    for batch in data:
        batch = batch.to(device).as_float()
        if renderer is None:
            renderer = DetailRenderer(face_model.to(device), batch.uv_textures.shape[-1], batch.images.shape[-1], albedo_blur_sigma=albedo_blur_sigma)
        scene = renderer.prepare(batch.coefficients, batch.uv_textures, batch.texture_valid)
        out = generator(batch.uv_textures, batch.texture_valid, batch.expression_maps)
        _, detailed_normals = renderer.detailed_maps(scene, out["displacement"])
        renders = {"coarse": renderer.render(scene, scene.normal_map), "detailed": renderer.render(scene, detailed_normals)}
        mask = scene.render_mask * batch.masks
        real_embedding = embedder(batch.images) if embedder is not None else None
        for j, face_id in enumerate(batch.face_ids):
            row: dict[str, Any] = {"face_id": face_id}
            for name, render in renders.items():
                row[f"photometric_l1_{name}"] = float(masked_photometric_loss(render[j : j + 1], batch.images[j : j + 1], mask[j : j + 1], kind="l1"))
                if real_embedding is not None:
                    composite = mask[j : j + 1] * render[j : j + 1] + (1 - mask[j : j + 1]) * batch.images[j : j + 1]
                    row[f"facenet_cosine_{name}"] = float(F.cosine_similarity(embedder(composite), real_embedding[j : j + 1]).item())
            row["displacement_abs_mean"] = float(out["displacement"][j].abs().mean())
            if landmark_nme is not None:
                row["landmark_nme"] = float(landmark_nme.get(face_id, np.nan))
            rows.append(row)
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Means of every numeric column, plus the relative photometric improvement of the details."""
    summary = {f"mean_{c}": float(table[c].mean()) for c in table.columns if c != "face_id" and len(table)}
    if len(table) and "photometric_l1_coarse" in table:
        coarse, detailed = table["photometric_l1_coarse"].mean(), table["photometric_l1_detailed"].mean()
        summary["photometric_improvement"] = float((coarse - detailed) / max(coarse, 1e-12))
    return summary


def comparison_figure(table: pd.DataFrame) -> plt.Figure:
    """Per-metric bars, coarse vs. detailed, one group per face."""
    metrics = [m for m in METRICS if f"{m}_coarse" in table]
    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6 * max(1, len(metrics)), 4), squeeze=False)
    x = np.arange(len(table))
    for ax, metric in zip(axes[0], metrics):
        ax.bar(x - 0.2, table[f"{metric}_coarse"], width=0.4, label="coarse")
        ax.bar(x + 0.2, table[f"{metric}_detailed"], width=0.4, label="detailed")
        ax.set_xticks(x, table["face_id"], rotation=45, ha="right", fontsize=7)
        ax.set_title(metric.replace("_", " ") + (" (lower is better)" if metric == "photometric_l1" else " (higher is better)"))
        ax.legend()
    figure.tight_layout()
    return figure
