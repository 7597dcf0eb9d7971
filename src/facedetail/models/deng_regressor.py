"""Deng et al. 2019 3DMM coefficient regressor (ResNet-50), loading Deep3DFaceRecon_pytorch's ``epoch_20.pth``.

Architecture (module and key layout of Deep3DFaceRecon_pytorch's ``ReconNetWrapper`` with
``net_recon='resnet50'`` and ``use_last_fc=False``, written here from scratch):

* ``backbone``: torchvision ResNet-50 without its ``fc`` layer; after global average pooling the
  features are (B, 2048, 1, 1). Keys ``backbone.conv1.weight``, ``backbone.bn1.*``, ``backbone.layer1.0...``.
* ``final_layers``: seven 1x1 convolutions with bias (``final_layers.N.weight`` (C, 2048, 1, 1),
  ``final_layers.N.bias``), zero-initialised, for id 80, exp 64, tex 80, angles 3, gamma 27, trans xy 2,
  trans z 1; their outputs are concatenated into (B, 257) in that order.

The checkpoint is a dict ``{'net_recon': state_dict, 'opt_00': ..., 'sched_00': ...}``.

Input: the 224x224 aligned crop (Deng et al. 5-point alignment), **RGB in [0, 1]**, no mean/std
normalisation (Deep3DFaceRecon divides the uint8 RGB crop by 255).

Coefficient layout (``split_coefficients``): id[0:80] exp[80:144] tex[144:224] angles[224:227]
(radians) gamma[227:254] (SH, reshaped (B, 3, 9) by the renderer) trans[254:257].
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50

from facedetail.geometry.face_model import CoefficientLayout

INPUT_SIZE = 224
FEATURE_DIM = 2048
CHECKPOINT_NETWORK_KEY = "net_recon"
# (name, size) in Deng et al. order; trans is predicted as xy (2) then z (1).
HEAD_SIZES: tuple[tuple[str, int], ...] = (
    ("id", 80),
    ("exp", 64),
    ("tex", 80),
    ("angles", 3),
    ("gamma", 27),
    ("trans_xy", 2),
    ("trans_z", 1),
)
NUM_COEFFICIENTS = sum(size for _, size in HEAD_SIZES)  # 257
# The same layout object the BFM FaceModel uses (facedetail.geometry.face_model), so both agree.
BFM_LAYOUT = CoefficientLayout(n_id=80, n_exp=64, n_tex=80)
WEIGHTS_HELP = (
    "Get epoch_20.pth from the Deep3DFaceRecon_pytorch project (its README links the pretrained "
    "checkpoints/<name>/epoch_20.pth) and point the parameter weights.deng_regressor (or the environment "
    "variable FACEDETAIL_DENG_WEIGHTS) at it"
)


class DengRegressor(nn.Module):
    """ResNet-50 + seven zero-initialised 1x1 conv heads: (B, 3, 224, 224) RGB in [0, 1] -> (B, 257)."""

    def __init__(self) -> None:
        super().__init__()
        backbone = resnet50(weights=None)
        backbone.fc = nn.Identity()  # Deep3DFaceRecon's backbone has no fc layer (use_last_fc=False): no fc.* keys
        self.backbone = backbone
        self.final_layers = nn.ModuleList(nn.Conv2d(FEATURE_DIM, size, kernel_size=1, bias=True) for _, size in HEAD_SIZES)
        for layer in self.final_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Regress Deng et al. coefficients (B, 257) from aligned 224x224 RGB crops in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DengRegressor expects RGB images shaped (B, 3, 224, 224), got {tuple(images.shape)}")
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"DengRegressor expects the 224x224 aligned crop (Deng et al. alignment), got {tuple(images.shape[-2:])}"
            )
        features = self.backbone(images)[:, :, None, None]  # (B, 2048, 1, 1)
        return torch.cat([layer(features) for layer in self.final_layers], dim=1).flatten(1)


def split_coefficients(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split (B, 257) Deng et al. coefficients into id (80), exp (64), tex (80), angles (3), gamma (27), trans (3).

    Same as ``FaceModel.layout.split`` for the BFM model (``BFM_LAYOUT``).
    """
    if coefficients.shape[-1] != NUM_COEFFICIENTS:
        raise ValueError(
            f"expected {NUM_COEFFICIENTS} Deng et al. coefficients on the last axis, got {tuple(coefficients.shape)}"
        )
    return BFM_LAYOUT.split(coefficients)


def _describe_key_mismatch(expected: set[str], found: set[str], shapes_wrong: list[str]) -> str:
    """A short human-readable summary of missing / unexpected / wrong-shape keys."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    return (
        f"{len(missing)} missing keys (e.g. {missing[:4]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:4]}), "
        f"{len(shapes_wrong)} keys with wrong shapes (e.g. {shapes_wrong[:4]})"
    )


def load_deng_regressor(path: str | Path, device: str | torch.device = "cpu") -> DengRegressor:
    """Load Deep3DFaceRecon_pytorch's ``epoch_20.pth`` (key ``net_recon``) into a ``DengRegressor`` in eval mode.

    Raises:
        FileNotFoundError: the file is missing (the message says where to get it).
        ValueError: not a torch checkpoint, no ``net_recon`` state dict, or keys/shapes that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Deng et al. regressor weights not found: {path}. {WEIGHTS_HELP}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable torch checkpoint (expected Deep3DFaceRecon_pytorch's epoch_20.pth): {error}"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKPOINT_NETWORK_KEY), dict):
        found = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} has no '{CHECKPOINT_NETWORK_KEY}' state dict (found {found}); expected Deep3DFaceRecon_pytorch's "
            f"epoch_20.pth. {WEIGHTS_HELP}."
        )
    state_dict = checkpoint[CHECKPOINT_NETWORK_KEY]
    if state_dict and all(key.startswith("module.") for key in state_dict):  # saved from DataParallel
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    model = DengRegressor()
    expected = model.state_dict()
    shapes_wrong = sorted(
        key for key in set(expected) & set(state_dict)
        if not isinstance(state_dict[key], torch.Tensor) or state_dict[key].shape != expected[key].shape
    )
    if set(expected) != set(state_dict) or shapes_wrong:
        raise ValueError(
            f"{path}: '{CHECKPOINT_NETWORK_KEY}' does not match the Deng et al. ResNet-50 regressor: "
            f"{_describe_key_mismatch(set(expected), set(state_dict), shapes_wrong)}"
        )
    model.load_state_dict(state_dict, strict=True)
    return model.to(torch.device(device)).eval()
