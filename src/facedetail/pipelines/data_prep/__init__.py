"""``data_prep``: raw photos -> face manifest, aligned 224x224 crops, contact sheet and MLflow counts."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
