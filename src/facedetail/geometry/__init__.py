"""facedetail.geometry (plain module, knows nothing of Kedro)."""
