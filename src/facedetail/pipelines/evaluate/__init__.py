"""evaluate pipeline: coarse vs. detailed renders of the validation faces."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
