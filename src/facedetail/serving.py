"""The trained model as an MLflow pyfunc: registered by the train pipeline, loadable anywhere.

``mlflow.pyfunc.load_model("models:/facedetail-detail-generator@champion")`` returns a model whose
``predict`` takes a DataFrame with an ``image`` column and returns one row per detected face:
coefficients, 68 landmarks in original-image pixels, the UV displacement map and the mask source.

* **Models from code**: the model is logged from :mod:`facedetail.serving_model` (a file that calls
  ``mlflow.models.set_model``), so loading it unpickles nothing; the checkpoint artifact is read
  with ``torch.load(weights_only=True)`` and the configuration is JSON.
* **Input**: the ``image`` column is MLflow type ``binary``: the encoded bytes of a JPEG/PNG (REST
  clients send them base64-encoded, as MLflow does for every binary column). In Python a column of
  file paths (``str``) is accepted as well. The input example is a tiny generated PNG (in bytes), so
  it never references a path that exists only on the training machine.
* **Artifacts**: the detail-generator checkpoint, the face model file (ICT-FaceKit, MIT; a licensed
  BFM is referenced by path, never copied), the parameters it was trained with, and a wheel of this
  package (``wheel/facedetail-<version>-py3-none-any.whl``).
* **Environment**: ``requirements.txt`` pins ``facedetail==<version>`` and every runtime dependency at
  the version installed when the model was registered (see :func:`pinned_requirements`).
* **Aliases**: every registered version gets ``candidate``; the evaluate pipeline moves ``champion``
  only when the version beats the current champion (:func:`promote_if_better`).
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch

PACKAGE = "facedetail"
ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_FACE_MODEL = "face_model"
ARTIFACT_PARAMS = "params"
ARTIFACT_WHEEL = "wheel"
MODEL_CODE = Path(__file__).with_name("serving_model.py")
OUTPUT_COLUMNS = ["image", "face_id", "mask_source", "coefficients", "landmarks68", "displacement", "uv_size"]
#: Alias set on every newly registered version.
CANDIDATE_ALIAS = "candidate"
#: Alias of the best evaluated version; moved by :func:`promote_if_better`.
CHAMPION_ALIAS = "champion"
#: Packages imported at inference that are pinned even if they are not direct dependencies of this package.
EXTRA_PINNED = ("mlflow", "torch", "pandas", "numpy", "cloudpickle")


class RegistrationRefused(RuntimeError):
    """The trained model is not fit to be registered (non-finite weights or loss)."""


def decode_image_input(value: Any) -> Any:
    """One ``image`` cell as the reconstructor takes it: a path (``str``/``PathLike``) or encoded bytes.

    ``bytes``/``bytearray``/``memoryview`` pass through as bytes; a ``data:image/...;base64,`` string is decoded.
    """
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value:
        return base64.b64decode(value.split(";base64,", 1)[1])
    return value


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
        # the path is handed on; load_detail_checkpoint reads it with torch.load(weights_only=True)
        self.reconstructor = Reconstructor.from_params(context.artifacts[ARTIFACT_CHECKPOINT], params, device=device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" not in model_input:
            raise ValueError(f"model input needs an 'image' column (encoded bytes or paths); got {list(model_input.columns)}")
        images = [decode_image_input(x) for x in model_input["image"]]
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


# ---------------------------------------------------------------------------------------------- environment


def _distribution_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def pinned_requirements() -> list[str]:
    """``name==version`` for this package and every runtime dependency (plus :data:`EXTRA_PINNED`), as installed now.

    Optional extras (``extra == "dev"``) are left out; a dependency that is not installed is left out too.
    """
    from packaging.requirements import Requirement

    names: list[str] = []
    for text in importlib.metadata.requires(PACKAGE) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        names.append(requirement.name)
    pins = [f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}"]
    seen = {PACKAGE}
    for name in [*names, *EXTRA_PINNED]:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_package_wheel(folder: str | os.PathLike) -> Path:
    """Write a pure-Python wheel of the installed ``facedetail`` (the code that trained the model) into ``folder``.

    The wheel holds every file of the package directory (no ``__pycache__``), the distribution's
    metadata (``Requires-Dist`` as installed) and a ``RECORD``; ``pip install`` accepts it offline
    (its dependencies come from the index or ``--find-links`` folders you give pip).
    """
    import facedetail

    version = importlib.metadata.version(PACKAGE)
    package_dir = Path(facedetail.__file__).resolve().parent
    dist_info = f"{PACKAGE}-{version}.dist-info"
    metadata = importlib.metadata.metadata(PACKAGE)
    lines = ["Metadata-Version: 2.1", f"Name: {PACKAGE}", f"Version: {version}"]
    for key in ("Summary", "Requires-Python", "License"):
        if metadata.get(key):
            lines.append(f"{key}: {metadata[key]}")
    lines += [f"Provides-Extra: {extra}" for extra in metadata.get_all("Provides-Extra") or []]
    lines += [f"Requires-Dist: {req}" for req in metadata.get_all("Requires-Dist") or []]
    files: dict[str, bytes] = {}
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files[f"{PACKAGE}/{path.relative_to(package_dir).as_posix()}"] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = ("\n".join(lines) + "\n").encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: facedetail.serving\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist_info}/top_level.txt"] = f"{PACKAGE}\n".encode()
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items()) + f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    target = Path(folder) / f"{PACKAGE}-{version}-py3-none-any.whl"
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_DEFLATED)
    from facedetail.utils import atomic_write_bytes

    atomic_write_bytes(target, buffer.getvalue())
    return target


def example_image_bytes(size: int = 32) -> bytes:
    """A tiny generated PNG (a gradient, no face): the model's input example, valid on any machine."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1), np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- registration


def non_finite_problems(checkpoint: Mapping[str, Any], history: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """Why a trained checkpoint must not be registered: non-finite generator weights or final training loss ([] if fine).

    ``history`` is the training history (one row per step with ``loss_total``; the validation row,
    at ``step == checkpoint["step"]``, is ignored). Steps the trainer skipped as non-finite leave no
    row, so a history without any training row means no step ended on a finite loss.
    """
    problems = [
        f"generator weight {name} has {int((~torch.isfinite(value)).sum())} non-finite value(s)"
        for name, value in dict(checkpoint.get("generator", {})).items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if history is not None:
        rows = history.to_dict("records") if isinstance(history, pd.DataFrame) else [dict(row) for row in history]
        final_step = int(checkpoint.get("step", -1))
        losses = [row.get("loss_total") for row in rows if final_step < 0 or int(row.get("step", -1)) < final_step]
        losses = [loss for loss in losses if loss is not None]
        if not losses:
            problems.append("no training step recorded a loss")
        elif not math.isfinite(float(losses[-1])):
            problems.append(f"the final training loss is {losses[-1]}")
    return problems


def version_description(
    checkpoint: Mapping[str, Any], parameters: Mapping[str, Any], history: pd.DataFrame | None, split: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Markdown for the registered model version: data, training steps, final losses, where the evaluation is."""
    train = dict(parameters.get("train", {}) or {})
    face_model = dict(parameters.get("face_model", {}) or {})
    split = dict(split or {})
    lines = [
        f"facedetail {importlib.metadata.version(PACKAGE)} detail generator.",
        f"- data: {len(split.get('train', []))} training / {len(split.get('validation', []))} validation faces "
        f"(the run's dataset inputs list the shard digests); face model: {face_model.get('kind', '?')}; UV size {checkpoint.get('uv_size')}",
        f"- training: {checkpoint.get('step')} steps, batch size {train.get('batch_size', '?')}, seed {parameters.get('seed', '?')}",
    ]
    if history is not None and len(history) and "loss_total" in history:
        losses = history["loss_total"].dropna()
        if len(losses):
            lines.append(f"- final training loss_total {float(losses.iloc[-1]):.5g} (first {float(losses.iloc[0]):.5g})")
    lines.append("- evaluation: see the `evaluate.*` tags (written by the evaluate pipeline); "
                 f"`{CHAMPION_ALIAS}` marks the best evaluated version, `{CANDIDATE_ALIAS}` the newest.")
    return "\n".join(lines)


def register_detail_model(
    checkpoint: Mapping[str, Any],
    parameters: Mapping[str, Any],
    registered_model_name: str,
    history: pd.DataFrame | None = None,
    split: Mapping[str, Sequence[str]] | None = None,
    alias: str | None = CANDIDATE_ALIAS,
) -> dict[str, Any]:
    """Log the models-from-code pyfunc into the active MLflow run and register a new version of it.

    Raises:
        RegistrationRefused: the checkpoint holds non-finite weights or the training ended on a non-finite loss.

    Returns a small record (model URI, name, version, alias) for the catalog.
    """
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    problems = non_finite_problems(checkpoint, history)
    if problems:
        raise RegistrationRefused("the trained model is not registered: " + "; ".join(problems))
    keep = ("face_model", "weights", "data_prep", "estimation", "uv_maps", "device", "inference")
    params = {k: parameters[k] for k in keep if k in parameters}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_path = Path(folder) / "detail_generator.pt"
        torch.save(dict(checkpoint), checkpoint_path)
        params_path = Path(folder) / "params.json"
        params_path.write_text(json.dumps(params, indent=2, default=str))
        wheel = build_package_wheel(Path(folder) / "wheel")
        artifacts = {ARTIFACT_CHECKPOINT: str(checkpoint_path), ARTIFACT_PARAMS: str(params_path), ARTIFACT_WHEEL: str(wheel)}
        face_model = params["face_model"]
        if face_model["kind"] == "ict":  # MIT licensed: the model travels with the artifact
            artifacts[ARTIFACT_FACE_MODEL] = str(face_model["ict_path"])
        example = pd.DataFrame({"image": [example_image_bytes()]})
        with warnings.catch_warnings():
            # MLflow hints that integer columns cannot hold missing values; uv_size is never missing
            warnings.filterwarnings("ignore", message=r"Hint: Inferred schema contains integer column", category=UserWarning)
            signature = infer_signature(
                example,
                pd.DataFrame({"image": ["image_0"], "face_id": ["image_0__f0"], "mask_source": ["landmarks+skin_gmm"],
                              "coefficients": [[0.0]], "landmarks68": [[[0.0, 0.0]]], "displacement": [[[0.0]]], "uv_size": [64]}),
            )
        info = mlflow.pyfunc.log_model(
            name="detail_model",
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            signature=signature,
            input_example=example,
            registered_model_name=registered_model_name,
            pip_requirements=pinned_requirements(),
        )
    version = getattr(info, "registered_model_version", None)
    client = MlflowClient()
    if version is not None:
        client.update_model_version(registered_model_name, str(version), description=version_description(checkpoint, parameters, history, split))
        if alias:
            client.set_registered_model_alias(registered_model_name, alias, str(version))
    return {"model_uri": info.model_uri, "registered_model_name": registered_model_name, "version": str(version), "alias": alias}


# ---------------------------------------------------------------------------------------------- aliases

#: Evaluation tags compared by :func:`promote_if_better`, in order of preference: (tag, higher is better).
CHAMPION_METRICS = (("evaluate.photometric_improvement", True), ("evaluate.mean_photometric_l1_detailed", False))


def _tag_value(tags: Mapping[str, str], key: str) -> float | None:
    try:
        value = float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def promote_if_better(name: str, version: str, client: Any | None = None) -> bool:
    """Move ``champion`` to ``version`` when its evaluation beats the current champion's (or there is none).

    Compares the first of :data:`CHAMPION_METRICS` both versions carry (finite values only); a version
    without any evaluation tag never becomes champion. Returns whether the alias moved.
    """
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    mine = client.get_model_version(name, str(version)).tags
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return False
    for key, higher_is_better in CHAMPION_METRICS:
        value = _tag_value(mine, key)
        if value is None:
            continue
        if current is None:
            better = True
        else:
            incumbent = _tag_value(current.tags, key)
            if incumbent is None:
                continue
            better = value > incumbent if higher_is_better else value < incumbent
        if better:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
        return better
    if current is not None and not any(_tag_value(current.tags, k) is not None for k, _ in CHAMPION_METRICS):
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))  # the incumbent was never evaluated
        return True
    return False
