"""facedetail.render (plain module, knows nothing of Kedro)."""
