"""train pipeline: self-supervised detail-generator training, tracked and registered in MLflow."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
