"""Shared test assets: where they are, and markers that skip a test when one is missing.

Test modules import the paths and markers from here (``from tests.conftest import ICT_PATH, needs_ict``), so no
asset path is defined in more than one place. The shared assets live next to the project checkout
(``../shared/assets``: the ICT-FaceKit model and photos, see its README).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: The project checkout (holds conf/, data/, pyproject.toml).
REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"
#: The built-in sample photos (``data/01_raw/faces``).
SAMPLE_FACES = REPO_ROOT / "data" / "01_raw" / "faces"
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"
#: The ICT-FaceKit face model (face-only, 9409 vertices).
ICT_PATH = SHARED_ASSETS / "ict_facekit" / "ict_face_only_9409.npz"
#: The shared photos: ``portraits/``, ``celeba_examples/``, ``expressions_one_person/``, ``in_the_wild/``, ...
FACES = SHARED_ASSETS / "faces"
PORTRAITS = FACES / "portraits"
OBAMA = PORTRAITS / "obama.jpg"
TWO_PEOPLE = PORTRAITS / "two_people.jpg"
EXPRESSIONS = FACES / "expressions_one_person"
CELEBA = FACES / "celeba_examples"

needs_ict = pytest.mark.skipif(not ICT_PATH.is_file(), reason=f"ICT-FaceKit asset missing at {ICT_PATH}")
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"shared face photos not found at {FACES}")
needs_assets = pytest.mark.skipif(
    not (OBAMA.is_file() and TWO_PEOPLE.is_file() and ICT_PATH.is_file()),
    reason=f"needs ../shared/assets ({OBAMA.name}, {TWO_PEOPLE.name}, ICT face model); not present on this machine",
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project checkout."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def ict_path() -> Path:
    """The ICT-FaceKit model file (the test is skipped when it is missing)."""
    if not ICT_PATH.is_file():
        pytest.skip(f"ICT-FaceKit asset missing at {ICT_PATH}")
    return ICT_PATH


@pytest.fixture(scope="module", autouse=True)
def _restore_mlflow_uris():
    """Give each test module back the MLflow tracking/registry URIs it started with.

    A Kedro session with kedro-mlflow (``tests/pipelines/``) sets them process-wide (module globals and the
    ``MLFLOW_*_URI`` environment variables), which would point later modules at a deleted temporary database.
    """
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {key: os.environ.get(key) for key in keys}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
