"""facedetail: detailed 3D face reconstruction from single images (self-supervised attribute learning)."""

__version__ = "0.2.0"

import os as _os

# On a busy machine OpenMP threads that spin-wait for each other make torch 10-100x slower;
# passive waiting costs nothing otherwise. Must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Environment variables that silence the native (C++) logging of MediaPipe (glog) and TFLite/TensorFlow.
QUIET_NATIVE_LOGGING = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}


def native_logging(verbose: bool = False) -> None:
    """Quiet (default) or verbose MediaPipe/TFLite native logging; effective for modules imported afterwards.

    Quiet keeps a value the user set; verbose (``facedetail ... --verbose`` or ``FACEDETAIL_VERBOSE=1``) turns it on.
    """
    for name, quiet in QUIET_NATIVE_LOGGING.items():
        if verbose:
            _os.environ[name] = "0"
        else:
            _os.environ.setdefault(name, quiet)
    try:  # absl (MediaPipe's Python logging) only when already installed; imported lazily by MediaPipe anyway
        from absl import logging as _absl_logging

        _absl_logging.set_verbosity(_absl_logging.INFO if verbose else _absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with mediapipe
        pass


native_logging(verbose=_os.environ.get("FACEDETAIL_VERBOSE", "") not in ("", "0"))
