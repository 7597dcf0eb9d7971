"""Project pipelines.

Every folder under ``facedetail/pipelines`` defines one pipeline (``create_pipeline``). ``train``
(and the default pipeline) chain everything from raw photos to a registered, evaluated model, so
one command suffices: data_prep → estimation → uv_maps → train → evaluate. ``preprocess`` chains
the per-face stages alone (data_prep → estimation → uv_maps).

The composition imports the stage pipelines explicitly: Kedro 1.7 loads only the requested
pipeline folders through ``find_pipelines``, so a composite built from its result would silently
lose its upstream stages.
"""
from __future__ import annotations

import importlib
import pkgutil

from kedro.pipeline import Pipeline

import facedetail.pipelines as pipelines_package

#: Order of the stages chained by ``train``.
TRAIN_CHAIN = ("data_prep", "estimation", "uv_maps", "train", "evaluate")
#: The per-face stages (run shard by shard on the Dask cluster), chained by ``preprocess``.
PREPROCESS_CHAIN = ("data_prep", "estimation", "uv_maps")


def _stage_pipelines() -> dict[str, Pipeline]:
    stages = {}
    for module_info in pkgutil.iter_modules(pipelines_package.__path__):
        if module_info.ispkg:
            module = importlib.import_module(f"facedetail.pipelines.{module_info.name}")
            stages[module_info.name] = module.create_pipeline()
    return stages


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    stages = _stage_pipelines()
    registry = dict(stages)
    registry["train"] = sum((stages[name] for name in TRAIN_CHAIN if name in stages), Pipeline([]))
    registry["preprocess"] = sum((stages[name] for name in PREPROCESS_CHAIN if name in stages), Pipeline([]))
    registry["__default__"] = registry["train"]
    return registry
