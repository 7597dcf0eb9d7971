"""facedetail.parsing (plain module, knows nothing of Kedro)."""
