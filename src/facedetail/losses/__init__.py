"""facedetail.losses (plain module, knows nothing of Kedro)."""
