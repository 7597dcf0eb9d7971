"""DRConv: straight-through region masks, hand-computed cases, one-region equivalence, gradients, devices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facedetail.models.drconv import DRConv2d, apply_region_filters, straight_through_region_masks


def _module_with_known_filters(filters: torch.Tensor, biases: torch.Tensor) -> DRConv2d:
    """DRConv with E = R, a 1x1 identity guide (region = argmax of the embedding channels) and fixed
    filters (filter head weight 0, its bias = the wanted filters), so outputs can be computed by hand."""
    regions, out_channels, in_channels, k, _ = filters.shape
    layer = DRConv2d(in_channels, out_channels, guide_channels=regions, num_regions=regions, kernel_size=k, guide_kernel_size=1)
    with torch.no_grad():
        layer.guide.weight.copy_(torch.eye(regions).reshape(regions, regions, 1, 1))
        layer.guide.bias.zero_()
        layer.filter_head.weight.zero_()
        layer.filter_head.bias.copy_(torch.cat([filters.reshape(-1), biases.reshape(-1)]))
    return layer


def test_straight_through_masks_are_exact_one_hot_with_softmax_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    masks = straight_through_region_masks(logits)
    assert torch.equal(masks.sum(dim=1), torch.ones(2, 5, 6))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masks.argmax(dim=1), logits.argmax(dim=1))

    upstream = torch.randn_like(masks)
    (masks * upstream).sum().backward()
    logits_ref = logits.detach().clone().requires_grad_(True)
    soft = logits_ref.softmax(dim=1)
    hard = F.one_hot(soft.argmax(dim=1), 4).permute(0, 3, 1, 2).to(soft.dtype)
    ((hard + soft - soft.detach()) * upstream).sum().backward()
    assert torch.allclose(logits.grad, logits_ref.grad, atol=1e-7)
    assert logits.grad.abs().sum() > 0


def test_apply_region_filters_hand_computed_1x1() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # left column region 0
    weights = torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1, 1, 1)
    bias = torch.tensor([[[0.5], [10.0]]])
    out = apply_region_filters(x, masks, weights, bias)
    expected = torch.tensor([[[[1 * 2 + 0.5, 2 * -1 + 10.0], [3 * 2 + 0.5, 4 * -1 + 10.0]]]])
    assert torch.equal(out, expected)


def test_apply_region_filters_hand_computed_3x3_zero_padding() -> None:
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    box = torch.ones(1, 1, 1, 1, 3, 3)
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 1, 1, 3, 3)
    weights = torch.cat([box, laplace], dim=1)  # region 0: 3x3 box sum, region 1: Laplacian
    masks = torch.zeros(1, 2, 3, 3)
    masks[:, 0] = 1.0
    masks[:, 0, 1, 1] = 0.0
    masks[:, 1, 1, 1] = 1.0  # centre pixel in region 1
    out = apply_region_filters(x, masks, weights)[0, 0]
    # Box sums with zero padding: corner (0,0) = 1+2+4+5 = 12; edge (0,1) = 1+2+3+4+5+6 = 21;
    # corner (2,2) = 5+6+8+9 = 28. Centre: Laplacian = 2+4+6+8 - 4*5 = 0.
    assert out[0, 0].item() == 12.0
    assert out[0, 1].item() == 21.0
    assert out[2, 2].item() == 28.0
    assert out[1, 1].item() == 0.0
    assert out[1, 0].item() == 1 + 2 + 4 + 5 + 7 + 8


def test_module_hand_computed_regions_follow_embedding() -> None:
    filters = torch.tensor([3.0, -2.0]).reshape(2, 1, 1, 1, 1)  # 1x1 filters: x3 in region 0, x(-2) in region 1
    biases = torch.tensor([1.0, 0.0])
    layer = _module_with_known_filters(filters, biases)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    embedding = torch.zeros(1, 2, 2, 2)
    embedding[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # diagonal -> region 0
    embedding[0, 1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # anti-diagonal -> region 1
    out, masks = layer.forward_with_masks(x, embedding)
    assert torch.equal(masks.argmax(dim=1)[0], torch.tensor([[0, 1], [1, 0]]))
    assert torch.allclose(out, torch.tensor([[[[1 * 3 + 1.0, 2 * -2.0], [3 * -2.0, 4 * 3 + 1.0]]]]))

    swapped = embedding.flip(1)  # swap the two channels: every pixel changes region
    out_swapped, masks_swapped = layer.forward_with_masks(x, swapped)
    assert torch.equal(masks_swapped.argmax(dim=1)[0], torch.tensor([[1, 0], [0, 1]]))
    assert torch.allclose(out_swapped, torch.tensor([[[[1 * -2.0, 2 * 3 + 1.0], [3 * 3 + 1.0, 4 * -2.0]]]]))


def test_soft_regions_blend_the_candidates_by_the_softmax_hand_computed() -> None:
    """``soft_regions``: each pixel is the softmax-weighted sum of the region candidates (continuous in the embedding)."""
    filters = torch.tensor([3.0, -2.0]).reshape(2, 1, 1, 1, 1)
    biases = torch.tensor([1.0, 0.0])
    layer = _module_with_known_filters(filters, biases)
    layer.soft_regions = True
    x = torch.tensor([[[[1.0, 2.0]]]])
    embedding = torch.zeros(1, 2, 1, 2)
    embedding[0, 0, 0] = torch.tensor([0.0, 2.0])  # pixel 0: equal logits; pixel 1: region 0 by a margin of 2
    out, masks = layer.forward_with_masks(x, embedding)
    p1 = 1.0 / (1.0 + torch.exp(torch.tensor(-2.0)))  # softmax weight of region 0 at pixel 1
    assert torch.allclose(masks[0, :, 0, 0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(masks[0, 0, 0, 1], p1)
    expected = torch.stack([torch.tensor(0.5 * (1 * 3 + 1.0) + 0.5 * (1 * -2.0)), p1 * (2 * 3 + 1.0) + (1 - p1) * (2 * -2.0)])
    assert torch.allclose(out[0, 0, 0], expected)
    layer.soft_regions = False  # the paper's one-hot: pixel 1 takes region 0 only
    assert torch.allclose(layer(x, embedding)[0, 0, 0, 1], torch.tensor(7.0))


def test_one_region_equals_dynamic_convolution() -> None:
    torch.manual_seed(1)
    layer = DRConv2d(3, 2, guide_channels=5, num_regions=1, kernel_size=3, filter_init_scale=1.0)
    x = torch.randn(3, 3, 9, 7)
    embedding = torch.randn(3, 5, 9, 7)
    out, masks = layer.forward_with_masks(x, embedding)
    assert torch.equal(masks, torch.ones(3, 1, 9, 7))
    weights, bias = layer.regress_filters(embedding)
    assert weights.shape == (3, 1, 2, 3, 3, 3) and bias.shape == (3, 1, 2)
    for b in range(3):
        reference = F.conv2d(x[b : b + 1], weights[b, 0], bias[b, 0], padding=1)
        assert torch.allclose(out[b : b + 1], reference, atol=1e-5)
    # Different samples get different filters (it is a dynamic convolution, not a shared one).
    assert not torch.allclose(weights[0], weights[1])


def test_batch_samples_are_independent() -> None:
    torch.manual_seed(2)
    layer = DRConv2d(3, 1, guide_channels=4, num_regions=3)
    x = torch.randn(4, 3, 8, 8)
    embedding = torch.randn(4, 4, 8, 8)
    together = layer(x, embedding)
    for b in range(4):
        alone = layer(x[b : b + 1], embedding[b : b + 1])
        assert torch.allclose(together[b : b + 1], alone, atol=1e-6)


def test_gradients_reach_guide_filter_branches_and_inputs() -> None:
    torch.manual_seed(3)
    layer = DRConv2d(3, 1, guide_channels=6, num_regions=4, kernel_size=3)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    embedding = torch.randn(2, 6, 12, 12, requires_grad=True)
    out = layer(x, embedding)
    (out * torch.randn_like(out)).sum().backward()
    for name in ("guide.weight", "guide.bias", "filter_features.0.weight", "filter_head.weight", "filter_head.bias"):
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_guide_gradient_is_the_softmax_straight_through_gradient() -> None:
    """The guide branch gets exactly the gradient of sum_r (onehot + softmax - softmax.detach())_r * out_r."""
    torch.manual_seed(4)
    layer = DRConv2d(3, 1, guide_channels=4, num_regions=3)
    x, embedding = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    layer(x, embedding).sum().backward()
    got = layer.guide.weight.grad.clone()

    layer.zero_grad()
    soft = layer.region_logits(embedding).softmax(dim=1)
    hard = F.one_hot(soft.argmax(dim=1), 3).permute(0, 3, 1, 2).to(soft.dtype)
    weights, bias = layer.regress_filters(embedding)
    apply_region_filters(x, hard + soft - soft.detach(), weights, bias).sum().backward()
    assert torch.allclose(got, layer.guide.weight.grad, atol=1e-6)


def test_region_assignment_changes_with_embedding() -> None:
    torch.manual_seed(5)
    layer = DRConv2d(3, 1, guide_channels=8, num_regions=4)
    x = torch.randn(1, 3, 16, 16)
    emb_a, emb_b = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    out_a, masks_a = layer.forward_with_masks(x, emb_a)
    out_b, masks_b = layer.forward_with_masks(x, emb_b)
    changed = (masks_a.argmax(1) != masks_b.argmax(1)).float().mean().item()
    assert changed > 0.3
    assert not torch.allclose(out_a, out_b)


def test_bad_inputs_raise_clear_errors() -> None:
    layer = DRConv2d(3, 1, guide_channels=4, num_regions=2)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.zeros(1, 2, 8, 8), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="guide_features must be"):
        layer(torch.zeros(1, 3, 8, 8), torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="share batch size"):
        layer(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        DRConv2d(3, 1, guide_channels=4, num_regions=2, kernel_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(6)
    layer = DRConv2d(3, 2, guide_channels=4, num_regions=3)
    x, embedding = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16)
    cpu_out = layer(x, embedding)
    cuda_out = layer.to("cuda")(x.cuda(), embedding.cuda())
    assert cuda_out.abs().sum() > 0
    assert torch.allclose(cpu_out, cuda_out.cpu(), rtol=1e-2, atol=1e-3)  # cuDNN may use TF32
