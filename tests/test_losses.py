"""Losses on hand-computed cases, empty masks, gradients, and the detail-regularisation schedule."""
from __future__ import annotations

import math

import pytest
import torch

from facedetail.losses import (
    detail_regularization,
    displacement_lowpass_regularization,
    lsgan_d_loss,
    lsgan_g_loss,
    masked_gradient_photometric_loss,
    masked_photometric_loss,
    perceptual_cosine_loss,
    validate_schedule,
    weight_at,
)
from tests.conftest import REPO_ROOT



def _two_by_two_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RGB differences per pixel: (0,0) = (3,4,0), (0,1) = (1,0,0), (1,0) = (0,0,2), (1,1) = (10,10,10) masked out."""
    target = torch.full((1, 3, 2, 2), 0.5)
    difference = torch.zeros(1, 3, 2, 2)
    difference[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])
    difference[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    difference[0, :, 1, 0] = torch.tensor([0.0, 0.0, 2.0])
    difference[0, :, 1, 1] = torch.tensor([10.0, 10.0, 10.0])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    return target + difference, target, mask


# ------------------------------------------------------------------------------------ photometric
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("l2_norm", (5.0 + 1.0 + 2.0) / 3),  # Euclidean RGB norms 5, 1, 2 over 3 masked pixels
        ("mse", ((9 + 16) / 3 + 1 / 3 + 4 / 3) / 3),  # channel-mean squares
        ("l1", ((3 + 4) / 3 + 1 / 3 + 2 / 3) / 3),  # channel-mean absolutes
    ],
)
def test_photometric_hand_computed(kind: str, expected: float) -> None:
    render, target, mask = _two_by_two_pair()
    assert masked_photometric_loss(render, target, mask, kind=kind).item() == pytest.approx(expected, rel=1e-6)


def test_photometric_soft_mask_and_batch_area_normalisation() -> None:
    render, target, mask = _two_by_two_pair()
    soft = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])  # (B, H, W) form: 5 * 1 + 1 * 0.5 over area 1.5
    assert masked_photometric_loss(render, target, soft).item() == pytest.approx(5.5 / 1.5)
    # Two images: normalised by the batch's total mask area (3 + 1 pixels), not per image.
    render2 = torch.cat([render, target + 6.0])  # second image: difference (6,6,6), norm 6*sqrt(3)
    mask2 = torch.cat([mask, torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])])
    expected = (8.0 + 6.0 * math.sqrt(3.0)) / 4
    assert masked_photometric_loss(render2, torch.cat([target, target]), mask2).item() == pytest.approx(expected, rel=1e-6)


def test_photometric_empty_mask_is_zero_with_gradient_path() -> None:
    render, target, _ = _two_by_two_pair()
    render.requires_grad_(True)
    loss = masked_photometric_loss(render, target, torch.zeros(1, 1, 2, 2))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(render.grad, torch.zeros_like(render))


def test_photometric_gradient_finite_at_zero_difference_and_masked_out() -> None:
    render, target, mask = _two_by_two_pair()
    render = render.clone()
    render[0, :, 0, 1] = target[0, :, 0, 1]  # one masked pixel with exactly zero difference
    render.requires_grad_(True)
    masked_photometric_loss(render, target, mask).backward()
    assert torch.isfinite(render.grad).all()
    assert torch.equal(render.grad[0, :, 0, 1], torch.zeros(3))
    assert torch.equal(render.grad[0, :, 1, 1], torch.zeros(3))  # outside the mask
    # d/dr of ||r - t|| / area at pixel (0,0): (3,4,0)/5/3
    assert torch.allclose(render.grad[0, :, 0, 0], torch.tensor([3.0, 4.0, 0.0]) / 5 / 3)


def test_gradient_photometric_hand_computed() -> None:
    """Forward differences of (render - target) along y and x, RGB norm, weighted by mask[p] * mask[p + e]."""
    target = torch.full((1, 1, 2, 2), 0.25)
    render = target + torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    # x: 2-1 = 1, 8-4 = 4; y: 4-1 = 3, 8-2 = 6 -> 14 / 4 pairs
    assert masked_gradient_photometric_loss(render, target, torch.ones(1, 1, 2, 2)).item() == pytest.approx(3.5)
    # pixel (1, 1) masked out: only the x pair of row 0 (1) and the y pair of column 0 (3) count
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    assert masked_gradient_photometric_loss(render, target, mask).item() == pytest.approx(2.0)
    # soft mask: pair weights 0.5 * 1 -> (0.5 * 1 + 0.5 * 3) / (0.5 + 0.5)
    soft = torch.tensor([[[[0.5, 1.0], [1.0, 0.0]]]])
    assert masked_gradient_photometric_loss(render, target, soft).item() == pytest.approx(2.0)
    # RGB: the x difference (3, 4, 0) has norm 5
    rgb_render = torch.zeros(1, 3, 1, 2)
    rgb_render[0, :, 0, 1] = torch.tensor([3.0, 4.0, 0.0])
    assert masked_gradient_photometric_loss(rgb_render, torch.zeros_like(rgb_render), torch.ones(1, 1, 1, 2)).item() == pytest.approx(5.0)


def test_gradient_photometric_ignores_a_smooth_offset_and_empty_masks() -> None:
    """A constant (low-frequency) difference costs nothing, unlike in the plain photometric loss; an empty mask
    gives exactly 0 with a finite gradient path."""
    target = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    render = (target + 0.1).requires_grad_(True)
    mask = torch.ones(2, 1, 5, 6)
    assert masked_gradient_photometric_loss(render, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_photometric_loss(render, target, mask).item() > 0.1
    loss = masked_gradient_photometric_loss(render, target, torch.zeros(2, 1, 5, 6))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(render.grad).all()
    with pytest.raises(ValueError, match="equal shapes"):
        masked_gradient_photometric_loss(render, target[:, :2], mask)


def test_photometric_rejects_bad_shapes() -> None:
    render, target, mask = _two_by_two_pair()
    with pytest.raises(ValueError, match="mask must be"):
        masked_photometric_loss(render, target, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="equal shapes"):
        masked_photometric_loss(render, target[:, :2], mask)
    with pytest.raises(ValueError, match="kind must be"):
        masked_photometric_loss(render, target, mask, kind="l3")


# ------------------------------------------------------------------------------------- perceptual
def test_perceptual_cosine_hand_computed() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [-2.0, 0.0], [6.0, 8.0]])
    # 1 - cos: orthogonal 1, opposite 2, parallel 0 -> mean 1
    assert perceptual_cosine_loss(a, b).item() == pytest.approx(1.0)
    assert perceptual_cosine_loss(a[2:], b[2:]).item() == pytest.approx(0.0, abs=1e-7)


def test_perceptual_zero_embedding_no_nan() -> None:
    a = torch.zeros(1, 4, requires_grad=True)
    loss = perceptual_cosine_loss(a, torch.ones(1, 4))
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="equal shapes"):
        perceptual_cosine_loss(torch.ones(2, 4), torch.ones(2, 5))


# ------------------------------------------------------------------------------------ adversarial
def test_lsgan_hand_computed() -> None:
    d_real = torch.tensor([1.0, 0.0])  # mean (d-1)^2 = 0.5
    d_fake = torch.tensor([0.0, 2.0])  # mean d^2 = 2
    assert lsgan_d_loss(d_real, d_fake).item() == pytest.approx(0.5 * (0.5 + 2.0))
    assert lsgan_g_loss(d_fake).item() == pytest.approx((1.0 + 1.0) / 2)
    assert lsgan_d_loss(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 0.0
    assert lsgan_g_loss(torch.ones(2, 1, 3, 3)).item() == 0.0


def test_lsgan_gradients() -> None:
    d_fake = torch.tensor([0.0, 2.0], requires_grad=True)
    lsgan_g_loss(d_fake).backward()
    assert torch.allclose(d_fake.grad, torch.tensor([-1.0, 1.0]))  # 2 (d - 1) / n
    d_fake.grad = None
    lsgan_d_loss(torch.ones(2), d_fake).backward()
    assert torch.allclose(d_fake.grad, torch.tensor([0.0, 1.0]))  # 0.5 * 2 d / n


# -------------------------------------------------------------------------------- regularisation
def test_detail_regularization_hand_computed() -> None:
    coarse = torch.zeros(2, 2, 3)
    refined = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    # sample 0: (5 + 0) / 2 = 2.5; sample 1: (1 + 2) / 2 = 1.5 (not sqrt(1 + 4) / 2); batch mean 2.0
    assert detail_regularization(coarse, refined).item() == pytest.approx(2.0)
    assert detail_regularization(coarse + 7.0, refined + 7.0).item() == pytest.approx(2.0)
    # masks: (N,) shared, then (B, N)
    assert detail_regularization(coarse, refined, torch.tensor([1.0, 0.0])).item() == pytest.approx((5.0 + 1.0) / 2)
    per_sample_mask = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert detail_regularization(coarse, refined, per_sample_mask).item() == pytest.approx((0.0 + 2.0) / 2)


def test_detail_regularization_zero_distance_and_empty_mask() -> None:
    refined = torch.zeros(1, 3, 3, requires_grad=True)
    loss = detail_regularization(torch.zeros(1, 3, 3), refined)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(refined.grad).all()
    refined.grad = None
    loss = detail_regularization(torch.zeros(1, 3, 3), refined + 1.0, torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(refined.grad, torch.zeros_like(refined))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        detail_regularization(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="mask must be"):
        detail_regularization(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), torch.ones(4))


# -------------------------------------------------------------------------------------- schedule
SCHEDULE = {"start": 10.0, "end": 0.1, "decay_steps": 100}


@pytest.mark.parametrize(
    ("kind", "at_0", "at_25", "at_50", "at_100"),
    [
        ("linear", 10.0, 10.0 - 9.9 * 0.25, 5.05, 0.1),
        ("exponential", 10.0, 10.0 * 0.01**0.25, 1.0, 0.1),  # 10 * (0.1 / 10) ** t
        ("cosine", 10.0, 0.1 + 9.9 * 0.5 * (1 + math.cos(math.pi / 4)), 5.05, 0.1),
        ("constant", 10.0, 10.0, 10.0, 10.0),
    ],
)
def test_schedule_values(kind: str, at_0: float, at_25: float, at_50: float, at_100: float) -> None:
    config = {**SCHEDULE, "kind": kind}
    assert weight_at(0, config) == pytest.approx(at_0)
    assert weight_at(25, config) == pytest.approx(at_25)
    assert weight_at(50, config) == pytest.approx(at_50)
    assert weight_at(100, config) == pytest.approx(at_100)
    assert weight_at(10_000, config) == pytest.approx(at_100)
    values = [weight_at(step, config) for step in range(0, 120, 7)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:]))


def test_schedule_zero_decay_steps_and_errors() -> None:
    assert weight_at(0, {**SCHEDULE, "decay_steps": 0, "kind": "linear"}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="missing keys \\['kind'\\]"):
        weight_at(0, SCHEDULE)
    with pytest.raises(ValueError, match="kind must be one of"):
        weight_at(0, {**SCHEDULE, "kind": "step"})
    with pytest.raises(ValueError, match="exponential decay needs"):
        weight_at(0, {**SCHEDULE, "end": 0.0, "kind": "exponential"})
    assert weight_at(100, {**SCHEDULE, "end": 0.0, "kind": "linear"}) == 0.0
    with pytest.raises(ValueError, match="step must be >= 0"):
        weight_at(-1, {**SCHEDULE, "kind": "linear"})


@pytest.mark.parametrize("conf_file", ["conf/base/parameters_train.yml", "conf/gpu/parameters_train.yml"])
def test_project_schedule_parameters_are_valid(conf_file: str) -> None:
    import yaml

    path = REPO_ROOT / conf_file
    if not path.exists():
        pytest.skip(f"{path} not found")
    config = yaml.safe_load(path.read_text())["train"]["detail_regularization"]
    validate_schedule(config)
    assert weight_at(0, config) > weight_at(int(config["decay_steps"]), config)


def test_displacement_lowpass_hand_computed_and_blind_to_wrinkles() -> None:
    """Mean |masked Gaussian low-pass| over the valid texels: a constant map costs its height, two isolated valid
    texels (farther apart than the kernel radius) their own values, a +-a checkerboard almost nothing."""
    valid = torch.ones(1, 1, 12, 12)
    assert displacement_lowpass_regularization(torch.full((2, 1, 12, 12), -0.05), valid, 2.0).item() == pytest.approx(0.05)
    isolated = torch.zeros(1, 1, 12, 12)
    isolated[0, 0, 0, 0] = isolated[0, 0, 11, 11] = 1.0
    d = torch.zeros(1, 1, 12, 12)
    d[0, 0, 0, 0], d[0, 0, 11, 11], d[0, 0, 5, 5] = 0.2, -0.4, 9.0  # (5, 5) is not valid: ignored
    assert displacement_lowpass_regularization(d, isolated, 1.0).item() == pytest.approx(0.3)
    checker = 0.1 * (1 - 2 * ((torch.arange(12)[:, None] + torch.arange(12)[None]) % 2)).float().view(1, 1, 12, 12)
    assert displacement_lowpass_regularization(checker, valid, 2.0).item() < 0.002
    d = torch.full((1, 1, 12, 12), 0.1, requires_grad=True)
    displacement_lowpass_regularization(d, valid, 2.0).backward()
    assert torch.isfinite(d.grad).all() and float(d.grad.sum()) > 0
    with pytest.raises(ValueError, match="sigma"):
        displacement_lowpass_regularization(d, valid, 0.0)
