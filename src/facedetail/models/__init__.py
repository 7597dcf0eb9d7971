"""facedetail.models (plain module, knows nothing of Kedro)."""
