"""uv_maps pipeline: per-face expression maps (B·β in UV) and unwrapped UV textures."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
