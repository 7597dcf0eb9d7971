"""facedetail.detect (plain module, knows nothing of Kedro)."""
