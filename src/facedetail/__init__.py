"""facedetail: detailed 3D face reconstruction from single images (self-supervised attribute learning)."""

__version__ = "0.1.0"

import os as _os

# On a busy machine OpenMP threads that spin-wait for each other make torch 10-100x slower;
# passive waiting costs nothing otherwise. Must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
