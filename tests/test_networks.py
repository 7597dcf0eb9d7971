"""U-Net generator, PatchGAN discriminator and DetailGenerator: shapes, structure, configs, gradients."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from facedetail.models.detail_model import DetailGenerator
from facedetail.models.discriminator import PatchDiscriminator, build_discriminator, patchgan_receptive_field
from facedetail.models.generator import UNetGenerator
from tests.conftest import REPO_ROOT

SMALL_MODEL = {"ngf": 8, "num_downs": 4, "norm": "instance", "embedding_channels": 6, "regions": 3, "kernel_size": 3,
               "filter_pool": 4, "max_displacement": 0.3}


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _small_inputs(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    texture = torch.rand(batch, 3, size, size, generator=generator)
    valid = (torch.rand(batch, 1, size, size, generator=generator) > 0.3).float()
    expression = torch.randn(batch, 3, size, size, generator=generator) * 0.5
    return texture, valid, expression


# ----------------------------------------------------------------------------------------- U-Net
def test_unet_shapes_and_tanh_bound() -> None:
    net = UNetGenerator(in_channels=4, out_channels=7, num_downs=5, ngf=8, norm="instance")
    out = net(torch.randn(2, 4, 64, 64) * 5)
    assert out.shape == (2, 7, 64, 64)
    assert out.abs().max() <= 1.0
    linear = UNetGenerator(in_channels=4, out_channels=7, num_downs=3, ngf=8, output_activation="none")
    assert not isinstance(linear.ups[0][-1], nn.Tanh)


def test_unet_pix2pix_structure() -> None:
    net = UNetGenerator(in_channels=3, out_channels=3, num_downs=8, ngf=64, norm="batch", dropout=0.5)
    convs = [block[-1] if isinstance(block[-1], nn.Conv2d) else block[-2] for block in net.downs]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    # No norm on the first (and innermost, 1x1) down block; LeakyReLU 0.2 before every other down conv.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.downs[0])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.downs[7])
    assert all(isinstance(net.downs[i][0], nn.LeakyReLU) and net.downs[i][0].negative_slope == 0.2 for i in range(1, 8))
    assert all(isinstance(net.downs[i][-1], nn.BatchNorm2d) for i in range(1, 7))
    # Up blocks: ReLU -> ConvTranspose 4x4 s2; skip concat doubles the input channels; dropout on 3 levels.
    assert all(isinstance(block[0], nn.ReLU) and isinstance(block[1], nn.ConvTranspose2d) for block in net.ups)
    assert net.ups[7][1].in_channels == 512 and net.ups[2][1].in_channels == 2 * 256 and net.ups[2][1].out_channels == 128
    assert [i for i, block in enumerate(net.ups) if any(isinstance(m, nn.Dropout) for m in block)] == [4, 5, 6]
    # pix2pix reports 54.414 M parameters for unet_256 (ngf 64, batch norm, 3 -> 3 channels).
    assert round(n_parameters(net) / 1e6, 3) == 54.414


def test_unet_skip_connection_carries_fine_detail() -> None:
    """Through the outermost skip, a single input pixel influences the output around it even when every
    deeper path is cut (the innermost block zeroed), which a plain encoder-decoder could not do."""
    torch.manual_seed(0)
    net = UNetGenerator(in_channels=1, out_channels=1, num_downs=3, ngf=4, norm="none", output_activation="none")
    with torch.no_grad():
        for p in net.ups[2].parameters():
            p.zero_()
        for p in net.ups[1].parameters():
            p.zero_()
    x = torch.zeros(1, 1, 16, 16, requires_grad=True)
    net(x)[0, 0, 8, 8].backward()
    assert x.grad[0, 0, 6:11, 6:11].abs().sum() > 0
    assert x.grad[0, 0, :3].abs().sum() == 0  # far rows unreachable through the 1-level skip path


def test_unet_rejects_bad_sizes() -> None:
    net = UNetGenerator(in_channels=4, out_channels=4, num_downs=5, ngf=4)
    with pytest.raises(ValueError, match="multiples of 2\\*\\*num_downs = 32"):
        net(torch.zeros(1, 4, 48, 48))
    with pytest.raises(ValueError, match="\\(B, 4, H, W\\)"):
        net(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="norm must be one of"):
        UNetGenerator(norm="group")


# ---------------------------------------------------------------------------------- discriminator
def test_patchgan_receptive_field_is_70_for_three_layers() -> None:
    assert patchgan_receptive_field(3) == 70
    assert patchgan_receptive_field(1) == 16
    assert patchgan_receptive_field(2) == 34


def test_patchgan_measured_receptive_field() -> None:
    """Back-propagate one output score (no norm layers, which would couple all pixels) and measure the
    extent of the input pixels that influence it."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=3, ndf=8, n_layers=3, norm="none")
    x = torch.randn(1, 3, 160, 160, requires_grad=True)
    scores = disc(x)
    assert scores.shape == (1, 1, 18, 18)
    scores[0, 0, 9, 9].backward()
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3))).flatten()
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2))).flatten()
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


def test_patchgan_structure_parameters_and_conditioning() -> None:
    disc = PatchDiscriminator(in_channels=6, ndf=64, n_layers=3, norm="batch")
    # Hand count (pix2pix reports 2.769 M): 6*64*16+64 + (64*128*16+256) + (128*256*16+512) + (256*512*16+1024) + 512*16+1
    assert n_parameters(disc) == 6208 + 131328 + 524800 + 2098176 + 8193
    first = disc.model[0]
    assert isinstance(first, nn.Conv2d) and isinstance(disc.model[1], nn.LeakyReLU)
    assert disc.model[1].negative_slope == 0.2
    last = disc.model[-1]
    assert last.out_channels == 1 and last.stride == (1, 1) and last.kernel_size == (4, 4)

    conditional = build_discriminator({"ndf": 8, "n_layers": 3, "conditional": True})
    image, condition = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224)
    scores = conditional(image, condition)
    assert scores.shape == (2, 1, 26, 26)
    assert torch.equal(scores, conditional(torch.cat([condition, image], 1)))
    with pytest.raises(ValueError, match="expected 6 input channels"):
        conditional(image)
    assert build_discriminator({"ndf": 8, "conditional": False}).in_channels == 3
    with pytest.raises(ValueError, match="unknown keys"):
        build_discriminator({"ndf": 8, "layers": 3})


# --------------------------------------------------------------------------------- detail model
def test_detail_generator_outputs() -> None:
    torch.manual_seed(0)
    model = DetailGenerator.from_config(SMALL_MODEL)
    texture, valid, expression = _small_inputs()
    out = model(texture, valid, expression)
    assert out["displacement"].shape == (2, 1, 32, 32)
    assert out["embedding"].shape == (2, 6, 32, 32)
    assert out["region_masks"].shape == (2, 3, 32, 32)
    assert out["displacement"].abs().max() <= 0.3
    assert out["displacement"].std() > 0
    assert torch.equal(out["region_masks"].sum(1), torch.ones(2, 32, 32))


def test_detail_generator_gradients_reach_every_parameter() -> None:
    torch.manual_seed(1)
    model = DetailGenerator.from_config(SMALL_MODEL)
    texture, valid, expression = _small_inputs()
    displacement = model(texture, valid, expression)["displacement"]
    (displacement * torch.randn_like(displacement)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_invalid_texels_do_not_influence_the_output() -> None:
    torch.manual_seed(2)
    model = DetailGenerator.from_config(SMALL_MODEL).eval()
    texture, valid, expression = _small_inputs()
    changed = torch.where(valid.bool(), texture, torch.rand_like(texture))
    assert not torch.equal(changed, texture)
    a, b = model(texture, valid, expression), model(changed, valid, expression)
    assert torch.equal(a["displacement"], b["displacement"])


def test_displacement_from_retargets_expression() -> None:
    torch.manual_seed(3)
    model = DetailGenerator.from_config(SMALL_MODEL).eval()
    texture, valid, expression = _small_inputs()
    out = model(texture, valid, expression)
    assert torch.equal(model.displacement_from(out["embedding"], expression), out["displacement"])
    other = model.displacement_from(out["embedding"], expression.flip(0))
    assert not torch.allclose(other, out["displacement"])
    # Zero expression map: each texel's displacement is tanh(its region's bias) * bound, constant per region.
    neutral, masks = model.detail_from(out["embedding"], torch.zeros_like(expression))
    _, bias = model.drconv.regress_filters(out["embedding"])
    expected = (torch.tanh(bias[:, :, 0, None, None]) * masks).sum(1, keepdim=True) * 0.3
    assert torch.allclose(neutral, expected, atol=1e-6)


def test_config_round_trip_rebuilds_identical_model(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = DetailGenerator.from_config(SMALL_MODEL).eval()
    path = tmp_path / "detail.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    rebuilt = DetailGenerator.from_config(checkpoint["config"]).eval()
    rebuilt.load_state_dict(checkpoint["state_dict"])
    texture, valid, expression = _small_inputs(seed=5)
    assert torch.equal(model(texture, valid, expression)["displacement"], rebuilt(texture, valid, expression)["displacement"])
    with pytest.raises(ValueError, match="unknown keys \\['regoins'\\]"):
        DetailGenerator.from_config({**SMALL_MODEL, "regoins": 4})


@pytest.mark.parametrize("conf_file", ["conf/base/parameters_train.yml", "conf/gpu/parameters_train.yml"])
def test_project_parameters_build_the_model(conf_file: str) -> None:
    import yaml

    path = REPO_ROOT / conf_file
    if not path.exists():
        pytest.skip(f"{path} not found")
    train = yaml.safe_load(path.read_text())["train"]
    uv_size = yaml.safe_load((path.parent / "parameters_uv_maps.yml").read_text())["uv_maps"]["uv_size"]
    model = DetailGenerator.from_config(train["model"])
    assert model.embedding_net.size_multiple <= uv_size
    assert uv_size % model.embedding_net.size_multiple == 0
    if "discriminator" in train:
        build_discriminator(train["discriminator"])


def test_detail_generator_rejects_bad_inputs() -> None:
    model = DetailGenerator.from_config(SMALL_MODEL)
    texture, valid, expression = _small_inputs()
    with pytest.raises(ValueError, match="uv_texture must be"):
        model(texture[:, :2], valid, expression)
    with pytest.raises(ValueError, match="texture_valid"):
        model(texture, valid[:, :, :16], expression)
    with pytest.raises(ValueError, match="expression_map"):
        model(texture, valid, expression[:, :, :16])
    with pytest.raises(ValueError, match="max_displacement"):
        DetailGenerator(max_displacement=0.0)


def test_texture_detail_input_is_optional_and_is_the_scaled_high_pass() -> None:
    """``texture_detail_gain`` > 0 feeds the U-Net ``gain x (t - masked_blur(t))`` (t = the [-1, 1] texture) as 3
    more channels; 0 (default) keeps the paper's 4-channel input and a config without the new keys."""
    from facedetail.geometry.detail import masked_blur

    torch.manual_seed(3)
    plain = DetailGenerator.from_config(SMALL_MODEL)
    assert plain.embedding_net.in_channels == 4 and "texture_detail_gain" not in plain.config
    model = DetailGenerator.from_config({**SMALL_MODEL, "texture_detail_gain": 10.0, "texture_detail_sigma": 1.5})
    assert model.embedding_net.in_channels == 7 and model.config["texture_detail_gain"] == 10.0
    assert DetailGenerator.from_config(model.config).embedding_net.in_channels == 7  # checkpoints rebuild it
    texture, valid, expression = _small_inputs()
    seen = []
    model.embedding_net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.embed(texture, valid)
    t = (texture * 2 - 1) * valid
    torch.testing.assert_close(seen[0][:, 3:6], 10.0 * (t - masked_blur(t, valid, 1.5)) * valid)
    torch.testing.assert_close(seen[0][:, :3], t)
    model.embed(torch.full_like(texture, 0.4), torch.ones_like(valid))  # a flat texture has no detail
    assert seen[1][:, 3:6].abs().max() < 1e-5 and seen[1][:, :3].abs().min() > 0.1
    with pytest.raises(ValueError, match="texture_detail_gain"):
        DetailGenerator.from_config({**SMALL_MODEL, "texture_detail_gain": -1.0})


def test_pattern_head_is_optional_and_adds_pattern_times_drive_before_the_tanh() -> None:
    """``pattern_head``: displacement = tanh(DRConv + pattern(embedding) x drive(expression)) x max; off (default)
    the generator has no extra parameters; on, the pattern conv gets a per-texel gradient from the displacement."""
    torch.manual_seed(4)
    plain = DetailGenerator.from_config(SMALL_MODEL)
    assert plain.pattern is None and "pattern_head" not in plain.config
    model = DetailGenerator.from_config({**SMALL_MODEL, "pattern_head": True}).eval()
    assert n_parameters(model) == n_parameters(plain) + 6 + 1 + 3  # 1x1 convs: E=6 -> 1 (+ bias), 3 -> 1
    assert DetailGenerator.from_config(model.config).pattern is not None
    texture, valid, expression = _small_inputs()
    embedding = model.embed(texture, valid)
    raw, _ = model.drconv.forward_with_masks(expression, embedding)
    by_hand = raw + (torch.einsum("c,bchw->bhw", model.pattern.weight[0, :, 0, 0], embedding) + model.pattern.bias[0])[:, None] \
        * torch.einsum("c,bchw->bhw", model.drive.weight[0, :, 0, 0], expression)[:, None]
    torch.testing.assert_close(model.displacement_from(embedding, expression), torch.tanh(by_hand) * 0.3)
    # a zero expression map: the pattern term vanishes (it scales with the expression)
    zero = torch.zeros_like(expression)
    torch.testing.assert_close(model.displacement_from(embedding, zero),
                               torch.tanh(model.drconv(zero, embedding)) * 0.3)
    model.displacement_from(embedding.detach(), expression)[:, :, 5, 7].sum().backward()
    assert float(model.pattern.weight.grad.abs().sum()) > 0 and float(model.drive.weight.grad.abs().sum()) > 0
