"""train pipeline (the training step only; the registry chains data_prep → estimation → uv_maps → train → evaluate)."""
from kedro.pipeline import Node, Pipeline

from .nodes import MODEL_PARAMETER_GROUPS, register_model, train_detail_generator


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_detail_generator,
                inputs=[
                    "aligned_faces",
                    "face_masks",
                    "face_coefficients",
                    "uv_maps",
                    "params:train",
                    "params:face_model",
                    "params:weights",
                    "params:device",
                    "params:seed",
                ],
                outputs=["detail_model", "training_history", "train_split"],
                name="train_detail_generator",
                tags=["train"],
            ),
            Node(
                register_model,
                inputs=["detail_model", "training_history", "train_split", "params:train", *(f"params:{group}" for group in MODEL_PARAMETER_GROUPS)],
                outputs="model_registration",
                name="register_model",
                tags=["train"],
            ),
        ]
    )
