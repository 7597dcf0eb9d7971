"""estimation pipeline: aligned crops → landmarks, masks, FaceNet features, 3DMM coefficients (cached)."""
from kedro.pipeline import Node, Pipeline

from .nodes import estimate_faces, estimation_contact_sheet


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                estimate_faces,
                inputs=["aligned_faces", "params:estimation", "params:face_model", "params:weights", "params:device"],
                outputs=["face_estimates", "estimation_report", "estimation_metrics"],
                name="estimate_faces",
                tags=["estimation"],
            ),
            Node(estimation_contact_sheet, inputs="face_estimates", outputs="estimation_contact_sheet",
                 name="estimation_contact_sheet", tags=["estimation"]),
        ]
    )
