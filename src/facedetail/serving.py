"""The trained model as an MLflow pyfunc: registered by the train pipeline, loadable anywhere.

``mlflow.pyfunc.load_model("models:/facedetail-detail-generator/latest")`` returns a model whose
``predict`` takes a DataFrame with an ``image`` column (file paths or raw encoded bytes) and
returns one row per detected face: coefficients, 68 landmarks in original-image pixels, the UV
displacement map and the mask source. The model's artifacts carry everything it needs: the
detail-generator checkpoint, the face model file (ICT-FaceKit, MIT; a licensed BFM is referenced
by path, never copied) and the parameters it was trained with.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd
import torch

ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_FACE_MODEL = "face_model"
ARTIFACT_PARAMS = "params"
OUTPUT_COLUMNS = ["image", "face_id", "mask_source", "coefficients", "landmarks68", "displacement", "uv_size"]


class FaceDetailPyfunc(mlflow.pyfunc.PythonModel):
    """Image in, detailed face parameters out (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from facedetail.engine.reconstructor import Reconstructor

        params = json.loads(Path(context.artifacts[ARTIFACT_PARAMS]).read_text())
        if ARTIFACT_FACE_MODEL in context.artifacts:
            key = "ict_path" if params["face_model"]["kind"] == "ict" else "bfm_path"
            params["face_model"][key] = context.artifacts[ARTIFACT_FACE_MODEL]
        params.setdefault("estimation", {})["cache"] = False
        device = os.environ.get("FACEDETAIL_DEVICE", params.get("device", "auto"))
        self.reconstructor = Reconstructor.from_params(context.artifacts[ARTIFACT_CHECKPOINT], params, device=device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" not in model_input:
            raise ValueError(f"model input needs an 'image' column (paths or encoded bytes); got {list(model_input.columns)}")
        images = list(model_input["image"])
        names = [str(x) if isinstance(x, str) else f"image_{i}" for i, x in enumerate(images)]
        faces = self.reconstructor.reconstruct_images(images, names)
        rows = [
            {
                "image": face.image,
                "face_id": face.face_id,
                "mask_source": face.mask_source,
                "coefficients": np.asarray(face.coefficients, np.float32).tolist(),
                "landmarks68": np.asarray(face.landmarks68_original, np.float32).tolist(),
                "displacement": np.asarray(face.displacement, np.float32).tolist(),
                "uv_size": int(np.asarray(face.displacement).shape[-1]),
            }
            for face in faces
        ]
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def register_detail_model(
    checkpoint: Mapping[str, Any], parameters: Mapping[str, Any], registered_model_name: str, alias: str | None = "latest_trained"
) -> dict[str, Any]:
    """Log the pyfunc model into the active MLflow run and register a new version of it.

    Returns a small record (model URI, name, version) for the catalog.
    """
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    keep = ("face_model", "weights", "data_prep", "estimation", "uv_maps", "device")
    params = {k: parameters[k] for k in keep if k in parameters}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_path = Path(folder) / "detail_generator.pt"
        torch.save(dict(checkpoint), checkpoint_path)
        params_path = Path(folder) / "params.json"
        params_path.write_text(json.dumps(params, indent=2, default=str))
        artifacts = {ARTIFACT_CHECKPOINT: str(checkpoint_path), ARTIFACT_PARAMS: str(params_path)}
        face_model = params["face_model"]
        if face_model["kind"] == "ict":  # MIT licensed: the model travels with the artifact
            artifacts[ARTIFACT_FACE_MODEL] = str(face_model["ict_path"])
        signature = infer_signature(
            pd.DataFrame({"image": ["face.jpg"]}),
            pd.DataFrame({"image": ["face.jpg"], "face_id": ["face__f0"], "mask_source": ["landmarks+skin_gmm"],
                          "coefficients": [[0.0]], "landmarks68": [[[0.0, 0.0]]], "displacement": [[[0.0]]], "uv_size": [64]}),
        )
        info = mlflow.pyfunc.log_model(
            name="detail_model",
            python_model=FaceDetailPyfunc(),
            artifacts=artifacts,
            signature=signature,
            registered_model_name=registered_model_name,
            pip_requirements=["facedetail", "torch", "mlflow", "pandas", "numpy"],
        )
    version = getattr(info, "registered_model_version", None)
    if version is not None and alias:
        MlflowClient().set_registered_model_alias(registered_model_name, alias, str(version))
    return {"model_uri": info.model_uri, "registered_model_name": registered_model_name, "version": str(version), "alias": alias}
