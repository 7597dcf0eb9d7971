"""Deng et al. ResNet-50 regressor: Deep3DFaceRecon_pytorch checkpoint layout, loading, coefficient layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facedetail.models.deng_regressor import (
    BFM_LAYOUT,
    NUM_COEFFICIENTS,
    DengRegressor,
    load_deng_regressor,
    split_coefficients,
)


def _trained_looking_regressor(seed: int = 0) -> DengRegressor:
    """A regressor with non-zero heads and non-trivial batch-norm statistics (so outputs are not all zero)."""
    torch.manual_seed(seed)
    model = DengRegressor()
    with torch.no_grad():
        for layer in model.final_layers:
            layer.weight.normal_(0.0, 0.02)
            layer.bias.uniform_(-0.5, 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.05, 0.05)
                module.running_var.uniform_(0.8, 1.2)
                module.num_batches_tracked.fill_(1234)
    return model.eval()


def _save_deep3d_checkpoint(model: DengRegressor, path: Path) -> None:
    """Save like Deep3DFaceRecon_pytorch's save_networks: {'net_recon': ..., 'opt_00': ..., 'sched_00': ...}."""
    optimizer = torch.optim.Adam(model.final_layers.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.2)
    torch.save({"net_recon": model.state_dict(), "opt_00": optimizer.state_dict(), "sched_00": scheduler.state_dict()}, path)


def test_module_and_key_layout_match_deep3dfacerecon():
    state = DengRegressor().state_dict()
    assert tuple(state["backbone.conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["backbone.layer4.2.bn3.running_var"].shape) == (2048,)
    assert "backbone.layer1.0.downsample.0.weight" in state
    assert not any(key.startswith("backbone.fc") for key in state)  # use_last_fc=False: no fc layer
    head_sizes = [state[f"final_layers.{index}.weight"].shape for index in range(7)]
    assert [tuple(shape) for shape in head_sizes] == [(n, 2048, 1, 1) for n in (80, 64, 80, 3, 27, 2, 1)]
    assert all(state[f"final_layers.{index}.bias"].shape == (size,) for index, size in enumerate((80, 64, 80, 3, 27, 2, 1)))
    assert len([key for key in state if key.startswith("final_layers.")]) == 14


def test_fresh_heads_are_zero_initialised():
    with torch.no_grad():
        output = DengRegressor().eval()(torch.rand(1, 3, 224, 224))
    assert output.shape == (1, NUM_COEFFICIENTS)
    assert torch.count_nonzero(output) == 0


def test_checkpoint_round_trip_matches_saved_model(tmp_path):
    saved = _trained_looking_regressor()
    path = tmp_path / "epoch_20.pth"
    _save_deep3d_checkpoint(saved, path)
    loaded = load_deng_regressor(path, device="cpu")
    assert not loaded.training
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, output = saved(images), loaded(images)
    assert output.shape == (2, 257)
    assert output.abs().max() > 0.1
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_dataparallel_prefixed_checkpoint_is_accepted(tmp_path):
    saved = _trained_looking_regressor(seed=3)
    path = tmp_path / "epoch_20.pth"
    torch.save({"net_recon": {f"module.{key}": value for key, value in saved.state_dict().items()}}, path)
    loaded = load_deng_regressor(path)
    assert torch.equal(loaded.final_layers[4].bias, saved.final_layers[4].bias)


def test_split_coefficients_follows_deng_order():
    model = DengRegressor().eval()
    with torch.no_grad():  # each head outputs its own index as a constant
        for index, layer in enumerate(model.final_layers):
            layer.bias.fill_(float(index + 1))
        coefficients = model(torch.rand(1, 3, 224, 224))
    parts = split_coefficients(coefficients)
    expected = {"id": (80, 1.0), "exp": (64, 2.0), "tex": (80, 3.0), "angles": (3, 4.0), "gamma": (27, 5.0)}
    for name, (size, value) in expected.items():
        assert parts[name].shape == (1, size)
        assert torch.all(parts[name] == value), name
    assert parts["trans"].tolist() == [[6.0, 6.0, 7.0]]  # tx, ty from head 6, tz from head 7
    with pytest.raises(ValueError, match="257"):
        split_coefficients(torch.zeros(2, 256))
    # Deng et al.: id[0:80] exp[80:144] tex[144:224] angles[224:227] gamma[227:254] trans[254:257]
    assert BFM_LAYOUT.total == 257
    assert [(s.start, s.stop) for s in BFM_LAYOUT.slices.values()] == [
        (0, 80), (80, 144), (144, 224), (224, 227), (227, 254), (254, 257)
    ]


def test_forward_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="224x224"):
        DengRegressor()(torch.rand(1, 3, 112, 112))
    with pytest.raises(ValueError, match="RGB"):
        DengRegressor()(torch.rand(1, 4, 224, 224))


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_deng_regressor(tmp_path / "nowhere" / "epoch_20.pth")
    message = str(error.value)
    for needed in ("nowhere/epoch_20.pth", "Deep3DFaceRecon_pytorch", "weights.deng_regressor", "FACEDETAIL_DENG_WEIGHTS"):
        assert needed in message


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    not_torch = tmp_path / "epoch_20.pth"
    not_torch.write_text("<html>download page</html>")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_deng_regressor(not_torch)

    no_net_recon = tmp_path / "bisenet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, no_net_recon)
    with pytest.raises(ValueError, match="no 'net_recon' state dict"):
        load_deng_regressor(no_net_recon)

    with_fc = tmp_path / "use_last_fc.pth"  # a variant trained with use_last_fc=True has backbone.fc.* instead of heads
    state = {key: value for key, value in DengRegressor().state_dict().items() if not key.startswith("final_layers")}
    state["backbone.fc.weight"] = torch.zeros(257, 2048)
    state["backbone.fc.bias"] = torch.zeros(257)
    torch.save({"net_recon": state}, with_fc)
    with pytest.raises(ValueError, match=r"14 missing keys .*final_layers.0.bias.*2 unexpected keys .*backbone.fc.bias"):
        load_deng_regressor(with_fc)

    wrong_shape = tmp_path / "resnet18_heads.pth"
    state = DengRegressor().state_dict()
    state["final_layers.0.weight"] = torch.zeros(80, 512, 1, 1)
    torch.save({"net_recon": state}, wrong_shape)
    with pytest.raises(ValueError, match=r"1 keys with wrong shapes .*final_layers.0.weight"):
        load_deng_regressor(wrong_shape)
