"""facedetail.parsing (plain module, knows nothing of Kedro): BiSeNet face parsing and the open face/skin mask."""
from facedetail.parsing.bisenet import (
    DEFAULT_MASK_LABELS,
    LABEL_NAMES,
    BiSeNet,
    BiSeNetCheckpointError,
    FaceParser,
    labels_to_mask,
    load_bisenet,
)
from facedetail.parsing.skin_mask import MASK_SOURCES, face_mask, landmark_face_mask, skin_probability

__all__ = [
    "BiSeNet",
    "BiSeNetCheckpointError",
    "DEFAULT_MASK_LABELS",
    "FaceParser",
    "LABEL_NAMES",
    "MASK_SOURCES",
    "face_mask",
    "labels_to_mask",
    "landmark_face_mask",
    "load_bisenet",
    "skin_probability",
]
