"""BiSeNet face parsing (19 CelebAMask-HQ classes) compatible with the published ``79999_iter.pth``.

Architecture (written from the BiSeNet paper and the key layout of zllrunning/face-parsing.PyTorch's
checkpoint, so that its state dict loads key for key):

* context path ``cp``: a ResNet-18 (``cp.resnet.*``: conv1/bn1, layer1..layer4 of two basic blocks, no fc)
  giving 1/8, 1/16 and 1/32 features; a global-average "context" vector (``cp.conv_avg``); attention
  refinement modules ``cp.arm32`` / ``cp.arm16`` (3x3 conv-bn-relu, then a channel attention from the pooled
  feature: 1x1 conv, bn, sigmoid); upsampling heads ``cp.conv_head32`` / ``cp.conv_head16``.
* spatial path: as in the published checkpoint, the ResNet's 1/8 feature (layer2, 128 channels) serves as
  the spatial-path feature (that checkpoint has no separate ``sp.*`` convolutions).
* feature fusion ``ffm``: concat(spatial, context) -> 1x1 conv-bn-relu (``ffm.convblk``) -> channel
  attention (``ffm.conv1`` reduce 4x, relu, ``ffm.conv2``, sigmoid); output = feat * attention + feat.
* heads ``conv_out`` (256 -> 256 -> 19) and auxiliary ``conv_out16`` / ``conv_out32`` (128 -> 64 -> 19),
  each a 3x3 conv-bn-relu then a 1x1 conv without bias; logits upsampled bilinearly to the input size.

Input: RGB resized to 512x512, scaled to [0, 1] and normalised with ImageNet mean/std. Labels
(:data:`LABEL_NAMES`): 0 bg, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses, 7/8 ears, 9 earring, 10 nose, 11 mouth,
12/13 lips, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facedetail.utils import SettingError, resolve_device, torch_load_problem

N_CLASSES = 19
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_NAMES: tuple[str, ...] = (
    "background", "skin", "left_brow", "right_brow", "left_eye", "right_eye", "eyeglasses", "left_ear",
    "right_ear", "earring", "nose", "mouth", "upper_lip", "lower_lip", "neck", "necklace", "cloth", "hair", "hat",
)
# Photometric region: skin, both brows, nose, both lips.
DEFAULT_MASK_LABELS: tuple[int, ...] = (1, 2, 3, 10, 12, 13)


class BiSeNetCheckpointError(SettingError):
    """The file is not a BiSeNet face-parsing state dict of the expected layout."""


class ConvBnRelu(nn.Module):
    """Convolution (no bias) + batch norm + ReLU; submodules ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn, identity or 1x1-conv-bn (``downsample.0/1``) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two residual blocks, the first one changing resolution/width."""
    return nn.Sequential(ResidualBlock(in_channels, out_channels, stride), ResidualBlock(out_channels, out_channels, 1))


class ResNet18Features(nn.Module):
    """ResNet-18 trunk returning the 1/8 (128 ch), 1/16 (256 ch) and 1/32 (512 ch) feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinement(nn.Module):
    """ARM: 3x3 conv-bn-relu, then reweight channels by sigmoid(bn(conv1x1(global average)))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBnRelu(in_channels, out_channels, 3)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * attention


class ContextPath(nn.Module):
    """ResNet-18 + global context + two ARMs; returns (1/8 ResNet feature, 1/8 context, 1/16 context)."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBnRelu(128, 128, 3)
        self.conv_head16 = ConvBnRelu(128, 128, 3)
        self.conv_avg = ConvBnRelu(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))  # (B, 128, 1, 1), broadcast over 1/32 map
        sum32 = self.arm32(feat32) + context
        up32 = self.conv_head32(F.interpolate(sum32, size=feat16.shape[2:], mode="nearest"))
        sum16 = self.arm16(feat16) + up32
        up16 = self.conv_head16(F.interpolate(sum16, size=feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    """FFM: fuse spatial and context features with a squeeze-excitation style channel attention."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convblk = ConvBnRelu(in_channels, out_channels, 1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * attention


class SegmentationHead(nn.Module):
    """3x3 conv-bn-relu followed by a 1x1 classifier (``conv`` / ``conv_out``)."""

    def __init__(self, in_channels: int, mid_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBnRelu(in_channels, mid_channels, 3)
        self.conv_out = nn.Conv2d(mid_channels, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser; ``forward`` returns the main logits (B, n_classes, H, W) at the input size.

    ``forward(x, with_auxiliary=True)`` also returns the two auxiliary logits (training-time heads).
    """

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegmentationHead(256, 256, n_classes)
        self.conv_out16 = SegmentationHead(128, 64, n_classes)
        self.conv_out32 = SegmentationHead(128, 64, n_classes)

    def forward(self, x: torch.Tensor, with_auxiliary: bool = False):
        size = x.shape[2:]
        spatial, context8, context16 = self.cp(x)
        logits = F.interpolate(self.conv_out(self.ffm(spatial, context8)), size, mode="bilinear", align_corners=True)
        if not with_auxiliary:
            return logits
        aux16 = F.interpolate(self.conv_out16(context8), size, mode="bilinear", align_corners=True)
        aux32 = F.interpolate(self.conv_out32(context16), size, mode="bilinear", align_corners=True)
        return logits, aux16, aux32


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    """First ``limit`` keys, comma separated, with a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (plain, {'state_dict': ...} / {'model': ...}; 'module.' stripped)."""
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "net"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        kind = type(obj).__name__
        raise BiSeNetCheckpointError(f"{path}: expected a BiSeNet state dict (dict of tensors), got {kind}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint") -> None:
    """Raise :class:`BiSeNetCheckpointError` listing missing / unexpected / mis-shaped keys, if any."""
    expected = model.state_dict()
    # Batch-norm step counters are not needed for inference and absent from checkpoints of old torch versions.
    missing = {k for k in set(expected) - set(state_dict) if not k.endswith("num_batches_tracked")}
    unexpected = set(state_dict) - set(expected)
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched[:5])}")
        raise BiSeNetCheckpointError(
            f"{source} is not a BiSeNet face-parsing checkpoint (expected the key layout of "
            f"zllrunning/face-parsing.PyTorch's 79999_iter.pth, {len(expected)} tensors): " + " | ".join(parts)
        )


class FaceParser:
    """A loaded BiSeNet with pre/post-processing: uint8 images in, label maps at the input size out."""

    def __init__(self, net: BiSeNet, device: torch.device, batch_size: int = 8) -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.batch_size = int(batch_size)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, 512, 512)."""
        x = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, (INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Class scores (B, 19, H, W) at the input resolution for uint8 RGB images (B, H, W, 3)."""
        array = _check_batch(images)
        height, width = array.shape[1:3]
        chunks = []
        for start in range(0, len(array), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(array[start : start + self.batch_size]))
            scores = self.net(self._preprocess(batch))
            if (height, width) != (INPUT_SIZE, INPUT_SIZE):
                scores = F.interpolate(scores, (height, width), mode="bilinear", align_corners=False)
            chunks.append(scores)
        return torch.cat(chunks)

    def parse(self, images: np.ndarray) -> np.ndarray:
        """Label maps (B, H, W) uint8 (ids of :data:`LABEL_NAMES`) for uint8 RGB images (B, H, W, 3)."""
        return self.logits(images).argmax(dim=1).to(torch.uint8).cpu().numpy()

    def mask(self, images: np.ndarray, labels: Sequence[int] = DEFAULT_MASK_LABELS) -> np.ndarray:
        """Photometric masks (B, H, W) bool: pixels whose label is in ``labels``."""
        return labels_to_mask(self.parse(images), labels)


def _check_batch(images: np.ndarray) -> np.ndarray:
    """Return uint8 (B, H, W, 3) or raise a clear error."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"BiSeNet expects uint8 RGB images (B, H, W, 3), got {array.dtype} {array.shape}")
    return array


def labels_to_mask(labels: np.ndarray, mask_labels: Sequence[int] = DEFAULT_MASK_LABELS) -> np.ndarray:
    """Boolean mask of the pixels whose label id is in ``mask_labels`` (same shape as ``labels``)."""
    ids = np.asarray(list(mask_labels), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= N_CLASSES):
        raise ValueError(f"mask labels must be in [0, {N_CLASSES - 1}], got {ids.tolist()}")
    return np.isin(np.asarray(labels), ids)


def load_bisenet(path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 8) -> FaceParser:
    """Load ``79999_iter.pth`` (or a same-layout state dict) into a :class:`FaceParser` on ``device``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says where the file comes from).
        BiSeNetCheckpointError: the file is not a BiSeNet state dict (missing / unexpected keys listed).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"BiSeNet weights not found: {file}. Expected the CelebAMask-HQ face-parsing state dict "
            "'79999_iter.pth' of zllrunning/face-parsing.PyTorch (set weights.bisenet in conf/ to its path), "
            "or leave it unset to use the landmark + skin-colour mask."
        )
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip errors: not a torch checkpoint at all
        raise BiSeNetCheckpointError(f"BiSeNet weights '{file}' (weights.bisenet / FACEDETAIL_BISENET_WEIGHTS) cannot be read: "
                                     f"{torch_load_problem(error)}") from error
    state_dict = _extract_state_dict(raw, file)
    resolved = resolve_device(device)
    net = BiSeNet(N_CLASSES)
    check_state_dict(state_dict, net, source=str(file))
    net.load_state_dict(state_dict, strict=False)  # everything but BN step counters was checked above
    return FaceParser(net, resolved, batch_size=batch_size)
