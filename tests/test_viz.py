"""`kedro viz build` of this project (offline, in a scratch copy) and its rendering in headless Chromium.

The export must hold the `train` pipeline exactly as the registry composes it (data_prep →
estimation → uv_maps → train → …); Chromium, serving the export from a localhost port, must draw
every node and dataset of `train` in the flowchart. The screenshot is kept at
data/08_reporting/viz/kedro_viz_train.png. Without Chromium (Debian package `chromium`, installed
by .ci/run when root) the rendering test skips.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest

from facedetail.viz_check import (
    build_static_viz,
    find_chromium,
    read_pipeline_graph,
    render_viz_page,
    rendered_node_names,
    selected_pipeline_name,
)
from tests.conftest import REPO_ROOT

SCREENSHOT = REPO_ROOT / "data" / "08_reporting" / "viz" / "kedro_viz_train.png"
#: Nodes of the stages that `train` chains: one node per step of the design card's chain.
TRAIN_TASKS = {"detect_and_align_faces", "detect_landmarks", "make_face_masks", "embed_faces", "fit_face_coefficients",
               "build_uv_maps", "train_detail_generator"}
TRAIN_DATASETS = {"raw_faces", "aligned_faces", "face_manifest", "face_landmarks", "face_masks", "facenet_embeddings",
                  "face_coefficients", "uv_maps", "detail_model"}
#: The data flow raw photo → aligned crop → landmarks → masks → coefficients → UV maps → detail model, as edges.
TRAIN_FLOW = {
    ("raw_faces", "detect_and_align_faces"),
    ("detect_and_align_faces", "aligned_faces"),
    ("aligned_faces", "detect_landmarks"),
    ("detect_landmarks", "face_landmarks"),
    ("face_landmarks", "make_face_masks"),
    ("make_face_masks", "face_masks"),
    ("aligned_faces", "embed_faces"),
    ("embed_faces", "facenet_embeddings"),
    ("face_masks", "fit_face_coefficients"),
    ("fit_face_coefficients", "face_coefficients"),
    ("face_coefficients", "build_uv_maps"),
    ("build_uv_maps", "uv_maps"),
    ("uv_maps", "train_detail_generator"),
    ("train_detail_generator", "detail_model"),
}
#: Kedro-Viz layers of the per-face datasets (the Layers view).
LAYERS = {"raw_faces": "raw", "aligned_faces": "primary", "face_landmarks": "feature", "face_masks": "feature",
          "face_coefficients": "feature", "uv_maps": "model_input"}


@pytest.fixture(scope="module")
def viz_site(tmp_path_factory) -> Path:
    """Static Kedro-Viz site built from this repository (about 10 s)."""
    return build_static_viz(REPO_ROOT, tmp_path_factory.mktemp("viz"), timeout_s=240)


@pytest.fixture(scope="module")
def registered_train():
    """Node names and dataset names of the registry's `train` pipeline."""
    from facedetail.pipeline_registry import register_pipelines

    pipeline = register_pipelines()["train"]
    datasets = {name for name in pipeline.datasets() if not (name == "parameters" or name.startswith("params:"))}
    return {node.name for node in pipeline.nodes}, datasets


def test_build_leaves_repository_clean_and_writes_site(viz_site):
    assert (viz_site / "index.html").is_file()
    assert viz_site.parent.parent != REPO_ROOT and REPO_ROOT not in viz_site.parents
    for name in ("main", "pipelines/train", "pipelines/__default__", "version"):
        assert (viz_site / "api" / name).is_file(), name


def test_export_has_layers_for_the_layers_view(viz_site):
    graph = json.loads((viz_site / "api" / "pipelines" / "train").read_text())
    layer_of = {node["name"]: node.get("layer") for node in graph["nodes"]}
    for name, layer in LAYERS.items():
        assert layer_of.get(name) == layer, name
    assert {"raw", "primary", "feature", "model_input"} <= set(graph.get("layers", []))


def test_export_holds_train_pipeline_as_registered(viz_site, registered_train):
    tasks, datasets = registered_train
    graph = read_pipeline_graph(viz_site, "train")
    assert TRAIN_TASKS <= graph.tasks
    assert TRAIN_DATASETS <= graph.datasets
    assert TRAIN_FLOW <= graph.edges
    assert graph.tasks == tasks
    assert graph.datasets == datasets
    assert "params:device" in graph.parameters
    # every stage pipeline in the export is a part of the composite `train`
    for stage in ("data_prep", "estimation", "uv_maps"):
        stage_graph = read_pipeline_graph(viz_site, stage)
        assert stage_graph.tasks and stage_graph.tasks <= graph.tasks, stage
        assert stage_graph.datasets <= graph.datasets, stage


def test_main_response_is_default_pipeline_listing_train(viz_site, registered_train):
    tasks, datasets = registered_train
    main = json.loads((viz_site / "api" / "main").read_text())
    assert main["selected_pipeline"] == "__default__"
    assert {"train", "data_prep", "estimation", "uv_maps"} <= {p["id"] for p in main["pipelines"]}
    in_train = {(node["type"], node["name"]) for node in main["nodes"] if "train" in node["pipelines"]}
    assert {("task", name) for name in tasks} <= in_train
    assert {("data", name) for name in datasets} <= in_train


def test_missing_pipeline_and_non_project_fail_clearly(viz_site, tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline 'no_such_pipeline'.*train"):
        read_pipeline_graph(viz_site, "no_such_pipeline")
    with pytest.raises(FileNotFoundError, match="not a Kedro project: missing pyproject.toml"):
        build_static_viz(tmp_path, tmp_path / "work")


def test_dom_parsing_on_hand_written_snippet():
    dom = (
        '<div class="dropdown__label"><span>train</span></div><svg>'
        '<text class="pipeline-node__text" dy="5">raw_faces</text>'
        '<text class="pipeline-node__text" dx="14">a &amp; b</text><text class="other">x</text></svg>'
    )
    assert rendered_node_names(dom) == ["raw_faces", "a & b"]
    assert selected_pipeline_name(dom) == "train"
    assert selected_pipeline_name("<div></div>") is None


def test_chromium_renders_train_flowchart(viz_site, registered_train, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium; .ci/run installs it as root)")
    tasks, datasets = registered_train
    shot = tmp_path / "kedro_viz_train.png"
    dom = render_viz_page(viz_site, "train", shot, chromium, window_size=(1600, 1000), timeout_s=90)
    assert selected_pipeline_name(dom) == "train"
    shown = set(rendered_node_names(dom))
    assert TRAIN_TASKS <= shown
    assert shown == tasks | datasets
    image = cv2.imread(str(shot))
    assert image is not None and image.shape == (1000, 1600, 3)
    flowchart = image[:, 700:]  # right of sidebar, toolbar and minimap: dark background, light nodes
    assert flowchart.std() > 5 and (flowchart > 120).mean() > 0.002
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
