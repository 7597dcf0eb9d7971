"""facedetail.losses (plain module, knows nothing of Kedro)."""
from facedetail.losses.adversarial import lsgan_d_loss, lsgan_g_loss
from facedetail.losses.perceptual import perceptual_cosine_loss
from facedetail.losses.photometric import masked_gradient_photometric_loss, masked_photometric_loss
from facedetail.losses.regularization import detail_regularization, displacement_lowpass_regularization
from facedetail.losses.schedules import validate_schedule, weight_at

__all__ = [
    "detail_regularization",
    "displacement_lowpass_regularization",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "masked_gradient_photometric_loss",
    "masked_photometric_loss",
    "perceptual_cosine_loss",
    "validate_schedule",
    "weight_at",
]
