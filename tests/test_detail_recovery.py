"""The synthetic wrinkle ground truth of ``benchmarks/detail_recovery.py`` behaves as designed.

* no wrinkles at a neutral expression (and under expressions that drive none of them);
* depth grows linearly with the driving blendshape, each group only with its own drivers and side;
* placement and spacing differ between faces, amplitude stays within a few tenths of a mm to ~1 mm;
* rendering a fitted face with the ground-truth displacement differs from the coarse render inside the face
  region only (and only where the wrinkles are).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facedetail.geometry.face_model import load_ict_model
from facedetail.geometry.wrinkles import (
    WRINKLE_GROUPS, WrinkleStyle, normal_angle_degrees, sample_styles, wrinkle_displacement, wrinkle_drivers, wrinkle_patterns,
)
from facedetail.render.detail import DetailRenderer
from tests.conftest import ICT_PATH, needs_ict

pytestmark = needs_ict
SIZE = 64


@pytest.fixture(scope="module")
def face_model():
    return load_ict_model(ICT_PATH)


def expression(face_model, **weights: float) -> torch.Tensor:
    out = torch.zeros(1, len(face_model.exp_names))
    for name, value in weights.items():
        out[0, face_model.exp_names.index(name)] = value
    return out


def _benchmark_module():
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("detail_recovery", REPO_ROOT / "benchmarks" / "detail_recovery.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_no_wrinkles_at_neutral_or_under_non_driving_expressions(face_model):
    styles = sample_styles(2, seed=3)
    neutral = wrinkle_displacement(face_model, styles, torch.zeros(2, len(face_model.exp_names)), SIZE)
    assert neutral.shape == (2, 1, SIZE, SIZE) and neutral.abs().max() == 0
    jaw = wrinkle_displacement(face_model, styles, expression(face_model, jawOpen=1.0, eyeBlink_L=1.0).repeat(2, 1), SIZE)
    assert jaw.abs().max() == 0


def test_depth_grows_linearly_with_the_driving_blendshape(face_model):
    style = [WrinkleStyle()]
    maps = [wrinkle_displacement(face_model, style, expression(face_model, browInnerUp_L=w, browInnerUp_R=w,
                                                                 browOuterUp_L=w, browOuterUp_R=w), SIZE) for w in (0.25, 0.5, 1.0)]
    peaks = [float(m.abs().max()) for m in maps]
    assert 0 < peaks[0] < peaks[1] < peaks[2]
    torch.testing.assert_close(maps[1], 2 * maps[0])
    torch.testing.assert_close(maps[2], 4 * maps[0])
    # full brow raise: furrows as deep as the style says (ICT cm: 0.6 mm), on the forehead only (above the eyes)
    assert abs(peaks[2] - WrinkleStyle().forehead_depth) < 0.15 * WrinkleStyle().forehead_depth
    rows = torch.nonzero(maps[2][0, 0].abs() > 1e-3)[:, 0]
    assert rows.max() < SIZE * (1 - 0.75)  # row 0 = v 1: the forehead band lies above v = 0.75 (eyes at v ~ 0.72)


def test_each_group_follows_its_own_drivers_and_side(face_model):
    drivers = wrinkle_drivers(face_model, torch.cat([expression(face_model, mouthSmile_L=1.0), expression(face_model, eyeSquint_R=0.5)]))
    assert drivers.shape == (2, len(WRINKLE_GROUPS))
    smile = dict(zip(WRINKLE_GROUPS, drivers[0].tolist()))
    assert smile["nasolabial_L"] > 0.5 and smile["crows_feet_L"] > 0 and smile["nasolabial_R"] == smile["crows_feet_R"] == smile["forehead"] == 0
    squint = dict(zip(WRINKLE_GROUPS, drivers[1].tolist()))
    assert squint["crows_feet_R"] == pytest.approx(0.3) and sum(squint.values()) == pytest.approx(0.3)
    # the subject's left smile puts the fold on the left of the UV layout's centre line (u > 0.5 on ICT)
    d = wrinkle_displacement(face_model, [WrinkleStyle()], expression(face_model, mouthSmile_L=1.0), SIZE)[0, 0]
    columns = torch.nonzero(d.abs() > 1e-3)[:, 1].float()
    assert len(columns) > 10 and columns.min() > SIZE / 2


def test_styles_vary_per_face_within_the_designed_range(face_model):
    styles = sample_styles(20, seed=0)
    assert sample_styles(20, seed=0) == styles and sample_styles(20, seed=1) != styles
    full = expression(face_model, **{n: 1.0 for n in ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R",
                                                        "mouthSmile_L", "mouthSmile_R", "eyeSquint_L", "eyeSquint_R")})
    maps = wrinkle_displacement(face_model, styles, full.repeat(20, 1), SIZE)
    peaks_mm = maps.abs().flatten(1).amax(1) * face_model.mm_per_unit
    assert peaks_mm.min() > 0.3 and peaks_mm.max() < 1.6  # a few tenths of a mm to ~1 mm (overlaps add up a little)
    patterns = torch.stack([wrinkle_patterns(face_model, s, SIZE) for s in styles[:2]])
    assert (patterns[0] - patterns[1]).abs().max() > 0.5  # placement/spacing differ between faces
    assert patterns.abs().max() <= 1.0 + 1e-6


def test_ground_truth_render_differs_from_coarse_inside_the_face_only(face_model):
    renderer = DetailRenderer(face_model, SIZE, 224)
    coefficients = face_model.layout.zeros(1)
    parts = face_model.layout.split(coefficients)
    exp = expression(face_model, browInnerUp_L=1.0, browInnerUp_R=1.0, browOuterUp_L=1.0, browOuterUp_R=1.0, mouthSmile_L=1.0, mouthSmile_R=1.0)
    blocks = {**parts, "exp": exp, "trans": parts["trans"]}
    gamma = torch.zeros(1, 27)
    gamma[0, [1, 10, 19]] = 0.5  # light from the side: furrows cast visible shading
    gamma[0, [2, 11, 20]] = 0.3
    blocks["gamma"] = gamma
    coefficients = face_model.layout.join(blocks)
    texture = torch.full((1, 3, SIZE, SIZE), 0.6)
    scene = renderer.prepare(coefficients, texture, torch.ones(1, 1, SIZE, SIZE))
    gt = wrinkle_displacement(face_model, [WrinkleStyle()], exp, SIZE) * renderer.uv_valid
    _, normals = renderer.detailed_maps(scene, gt)
    detailed, coarse = renderer.render(scene, normals), renderer.render(scene, scene.normal_map)
    change = (detailed - coarse).abs().amax(1, keepdim=True)
    inside = scene.render_mask > 0.5
    assert inside.float().mean() > 0.1 and change[inside].max() > 0.01 and (change[inside] > 0.002).float().mean() > 0.01
    assert change[~inside].max() == 0
    # and where the GT is zero the detailed normals are the coarse ones
    angle = normal_angle_degrees(normals, scene.normal_map)
    far = torch.nn.functional.max_pool2d((gt.abs() > 0).float(), 5, 1, 2) == 0
    assert angle[far & renderer.uv_valid.bool()].max() < 1e-3 and angle.max() > 1.0


def test_benchmark_overrides_set_nested_train_keys():
    """``--set key.path=value`` (YAML-parsed) is applied after the variant's weights; bad items are refused."""
    bench = _benchmark_module()
    params = {"train": {"loss_weights": {"photometric": 1.0, "uv_photometric": 0.0}, "model": {"regions": 4},
                        "optimizer": {"lr": 0.001}}}
    config = bench.train_config(params, "gradient", 10, 2, "/tmp/x", None,
                                ["loss_weights.gradient_photometric=2.5", "model.regions=8", "albedo_blur_sigma=1"])
    assert config["loss_weights"] == {"photometric": 1.0, "uv_photometric": 0.0, "gradient_photometric": 2.5,
                                      "perceptual": 0.0, "adversarial": 0.0}
    assert config["model"]["regions"] == 8 and config["albedo_blur_sigma"] == 1 and config["steps"] == 10
    assert params["train"]["model"]["regions"] == 4  # the project's parameters are not modified
    with pytest.raises(ValueError, match="key.path=value"):
        bench.apply_overrides({}, ["loss_weights.photometric"])


def test_wrinkle_spacing_option_scales_furrow_and_crows_feet_spacing_only(face_model):
    """``spacing`` multiplies the furrow period and divides the crow's-feet frequency (same random draws, 1 = the
    default data); on the ICT mean face the default furrows are 17-25 mm apart (forehead ~380 mm per UV unit along v)."""
    default, half = sample_styles(6, seed=0), sample_styles(6, seed=0, spacing=0.5)
    assert sample_styles(6, seed=0, spacing=1.0) == default
    for a, b in zip(default, half):
        assert b.forehead_period == pytest.approx(0.5 * a.forehead_period)
        assert b.crows_frequency == pytest.approx(2 * a.crows_frequency)
        assert b.forehead_phase == a.forehead_phase and b.crows_depth == a.crows_depth and b.nasolabial_width == a.nasolabial_width
    with pytest.raises(ValueError, match="spacing"):
        sample_styles(1, seed=0, spacing=0.0)
    # furrow spacing in mm: 3D length of one period along v at the forehead centre of the mean face
    from facedetail.geometry.wrinkles import landmark_uv

    size = 256
    renderer = DetailRenderer(face_model, size, 224)
    points = renderer.bake(face_model.mean_shape.reshape(1, -1, 3))[0] * face_model.mm_per_unit
    lmk = landmark_uv(face_model)
    u, v = float(lmk[[17, 26], 0].mean()), float(lmk[17:27, 1].max()) + 0.065
    row, col = int((1 - v) * size), int(u * size)
    mm_per_uv_v = float((points[:, row - 2, col] - points[:, row + 2, col]).norm()) / (4 / size)
    assert 340 < mm_per_uv_v < 420
    spacing_mm = [s.forehead_period * mm_per_uv_v for s in sample_styles(56, seed=0)]
    assert 16 < min(spacing_mm) and max(spacing_mm) < 26


def test_oracle_albedo_replaces_the_trainers_estimate_per_face(face_model, tmp_path):
    """``--oracle-albedo``: the trainer's cached per-face scenes shade the data's true albedo, matched by face id."""
    from facedetail.training.loop import DetailTrainer
    from tests.test_training import UV, synthetic_faces, tiny_config

    bench = _benchmark_module()
    faces = synthetic_faces(face_model, n=3)
    trainer = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    albedo = torch.rand(3, 3, UV, UV)
    bench.use_oracle_albedo(trainer, {"face_ids": faces.face_ids, "albedo": albedo})
    trainer._scene_cache = {}  # what fit() sets for small training sets
    batch = faces.subset([2, 0])
    scene = trainer.cached_scene(batch)
    torch.testing.assert_close(scene.albedo_map, albedo[[2, 0]])
    estimated = trainer.renderer.prepare(batch.coefficients, batch.uv_textures, batch.texture_valid)
    torch.testing.assert_close(scene.normal_map, estimated.normal_map)  # only the albedo changes
    trainer._scene_cache = None
    with pytest.raises(RuntimeError, match="scene cache"):
        trainer.cached_scene(batch)


def test_supervised_loss_counts_value_and_texel_differences_inside_the_region():
    """Hand-computed: error 1 on one texel of a 1x1x2x3 map, region = first two columns."""
    bench = _benchmark_module()
    gt = torch.zeros(1, 1, 2, 3)
    predicted = gt.clone()
    predicted[0, 0, 0, 0] = 1.0
    where = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # squared error mean over 6 texels: 1/6; x differences (2x2): one of 1 -> 1/4; y differences (1x3): one of 1 -> 1/3
    expected = 1 / 6 + 2.0 * (1 / 4 + 1 / 3)
    assert float(bench.displacement_regression_loss(predicted, gt, where, 2.0)) == pytest.approx(expected)
    predicted[0, 0, 0, 2] = 5.0  # outside the region: not counted
    assert float(bench.displacement_regression_loss(predicted, gt, where, 2.0)) == pytest.approx(expected)


def test_extra_data_seeds_become_other_people_and_only_part_zero_is_held_out():
    bench = _benchmark_module()

    def part(value: float) -> dict:
        return {"identity": np.array([0, 0, 1, 1, 2, 2]), "gt": torch.full((6, 1, 2, 2), value),
                "face_ids": [f"p{i // 2}__e{i % 2}" for i in range(6)], "uv_valid": torch.ones(1, 1, 2, 2), "region": torch.ones(1, 1, 2, 2)}

    merged = bench.merge_datasets([part(0.0), part(1.0)])
    assert merged["identity"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert merged["gt"][:6].eq(0).all() and merged["gt"][6:].eq(1).all() and len(merged["face_ids"]) == 12
    assert merged["face_ids"][:2] == ["p0__e0", "p0__e1"] and merged["face_ids"][6] == "p0__e0__s1"
    assert len(set(merged["face_ids"])) == 12  # unique: the trainer caches scenes by face id
    assert merged["region"].shape == (1, 1, 2, 2)  # shared maps are not stacked
    assert bench.merge_datasets([part(0.0)])["gt"].shape[0] == 6
