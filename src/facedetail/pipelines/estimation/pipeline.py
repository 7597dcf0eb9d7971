"""estimation pipeline: aligned crops -> 68 landmarks -> face masks -> 3DMM coefficients (cached per face);
FaceNet embeddings beside them. One node per step, each writing its own sharded, versioned dataset."""
from kedro.pipeline import Node, Pipeline

from .nodes import detect_landmarks, embed_faces, estimation_contact_sheet, fit_face_coefficients, make_face_masks

RUN = ["params:device", "params:execution"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(detect_landmarks, inputs=["aligned_faces", "params:estimation", "params:weights", *RUN], outputs="face_landmarks",
                 name="detect_landmarks"),
            Node(make_face_masks, inputs=["aligned_faces", "face_landmarks", "params:estimation", "params:weights", *RUN],
                 outputs="face_masks", name="make_face_masks"),
            Node(embed_faces, inputs=["aligned_faces", "params:estimation", "params:weights", *RUN],
                 outputs="facenet_embeddings", name="embed_faces"),
            Node(
                fit_face_coefficients,
                inputs=["aligned_faces", "face_landmarks", "face_masks", "params:estimation", "params:face_model", "params:weights", *RUN],
                outputs=["face_coefficients", "estimation_report", "estimation_metrics"],
                name="fit_face_coefficients",
            ),
            Node(estimation_contact_sheet, inputs=["face_coefficients", "face_masks"], outputs="estimation_contact_sheet",
                 name="estimation_contact_sheet"),
        ],
        tags=["estimation"],
    )
