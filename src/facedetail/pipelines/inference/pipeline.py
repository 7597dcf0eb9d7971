"""inference pipeline (``kedro run --pipelines=inference``): photos + latest ``detail_model`` -> exports + report."""
from kedro.pipeline import Node, Pipeline

from .nodes import reconstruct_and_export, summarise_inference


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                reconstruct_and_export,
                inputs=[
                    "inference_images", "detail_model", "params:inference", "params:face_model", "params:weights",
                    "params:data_prep", "params:estimation", "params:uv_maps", "params:device",
                ],
                outputs="inference_report",
                name="reconstruct_and_export",
                tags=["inference"],
            ),
            Node(
                summarise_inference,
                inputs="inference_report",
                outputs="inference_metrics",
                name="summarise_inference",
                tags=["inference"],
            ),
        ]
    )
