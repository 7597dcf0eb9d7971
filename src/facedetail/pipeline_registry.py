"""Project pipelines.

Every folder under ``facedetail/pipelines`` defines one pipeline; ``train`` and the default
pipeline chain everything from raw photos to a registered model, so one command suffices.
"""
from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    pipelines = find_pipelines(raise_errors=True)
    upstream = [pipelines[name] for name in ("data_prep", "estimation", "uv_maps") if name in pipelines]
    if "train" in pipelines:
        chain = sum(upstream, Pipeline([])) + pipelines["train"]
        if "evaluate" in pipelines:
            chain = chain + pipelines["evaluate"]
        pipelines["train"] = chain
    pipelines["__default__"] = pipelines.get("train", sum(pipelines.values(), Pipeline([])))
    return pipelines
