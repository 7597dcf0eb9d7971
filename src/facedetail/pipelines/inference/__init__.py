"""inference pipeline: reconstruct every photo of ``inference_images`` with the trained detail model and export."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
