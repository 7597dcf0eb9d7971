"""Wiring of the ``data_prep`` pipeline (``kedro run --pipeline=data_prep``)."""
from __future__ import annotations

from kedro.pipeline import Pipeline, node, pipeline

from .nodes import detect_and_align_faces, make_contact_sheet, summarise_manifest


def create_pipeline(**kwargs) -> Pipeline:
    """raw_faces -> face_manifest + aligned_faces (sharded) -> contact sheet, MLflow metrics and manifest report."""
    return pipeline(
        [
            node(
                detect_and_align_faces,
                inputs=["raw_faces", "params:data_prep", "params:device", "params:execution"],
                outputs=["face_manifest", "aligned_faces"],
                name="detect_and_align_faces",
            ),
            node(
                make_contact_sheet,
                inputs=["aligned_faces", "params:data_prep"],
                outputs="data_prep_contact_sheet",
                name="make_data_prep_contact_sheet",
            ),
            node(
                summarise_manifest,
                inputs="face_manifest",
                outputs=["data_prep_metrics", "data_prep_manifest_report"],
                name="summarise_data_prep",
            ),
        ],
        tags=["data_prep"],
    )
