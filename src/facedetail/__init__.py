"""facedetail: detailed 3D face reconstruction from single images (self-supervised attribute learning)."""

__version__ = "0.1.0"
