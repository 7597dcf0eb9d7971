"""evaluate pipeline (also chained at the end of train)."""
from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_detail_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_detail_model,
                inputs=[
                    "detail_model", "aligned_faces", "face_masks", "face_coefficients", "uv_maps", "train_split", "model_registration",
                    "params:evaluate", "params:face_model", "params:weights", "params:device",
                ],
                outputs=["evaluation_table", "evaluation_plot", "evaluation_metrics"],
                name="evaluate_detail_model",
                tags=["evaluate"],
            )
        ]
    )
