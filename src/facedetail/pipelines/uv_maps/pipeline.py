"""uv_maps pipeline: per-face expression maps (B·β in UV) and unwrapped UV textures (input of train)."""
from kedro.pipeline import Node, Pipeline

from .nodes import build_uv_maps, uv_maps_preview


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_uv_maps,
                inputs=["aligned_faces", "face_coefficients", "params:uv_maps", "params:face_model", "params:device", "params:execution"],
                outputs="uv_maps",
                name="build_uv_maps",
            ),
            Node(uv_maps_preview, inputs="uv_maps", outputs="uv_maps_preview", name="preview_uv_maps"),
        ],
        tags=["uv_maps"],
    )
