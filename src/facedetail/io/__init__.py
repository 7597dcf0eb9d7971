"""facedetail.io (plain module, knows nothing of Kedro)."""
