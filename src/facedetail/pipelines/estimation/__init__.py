"""estimation pipeline: 68 landmarks, face masks, FaceNet features and cached 3DMM coefficients."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
