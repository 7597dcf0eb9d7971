"""Detail-training loop: gradients through the renderer, falling losses, exact resume, NaN policy."""
from __future__ import annotations

import copy

import pytest
import torch

from facedetail.data.streaming import FaceShardStream, ShardBatches, face_tensors_from_shards, write_stage_shards
from facedetail.geometry.face_model import load_face_model
from facedetail.geometry.uv import expression_map
from facedetail.losses.photometric import masked_photometric_loss
from facedetail.render.detail import DetailRenderer
from facedetail.training.loop import DetailTrainer, FaceTensors, TrainingError, validation_split
from tests.conftest import ICT_PATH, needs_ict

ICT = ICT_PATH
pytestmark = needs_ict
UV = 32
DIRECTIONAL_LIGHT = [0.0, 0.0, 0.4, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0] * 3


@pytest.fixture(scope="module")
def face_model():
    return load_face_model("ict", ICT)


def tiny_config(tmp_path, **overrides):
    config = {
        "image_size": 224,
        "model": {"ngf": 8, "num_downs": 5, "norm": "instance", "embedding_channels": 4, "regions": 2,
                  "kernel_size": 3, "filter_pool": 2, "max_displacement": 0.3},
        "discriminator": {"ndf": 8, "n_layers": 2, "conditional": True},
        "optimizer": {"lr": 0.002, "betas": [0.5, 0.999]},
        "steps": 6,
        "batch_size": 2,
        "albedo_blur_sigma": 1.0,
        "loss_weights": {"photometric": 1.0, "perceptual": 0.0, "adversarial": 0.01},
        "detail_regularization": {"start": 0.1, "end": 0.001, "decay_steps": 6, "kind": "exponential"},
        "nan_tolerance": 2,
        "checkpoint_every": 2,
        "keep_checkpoints": 5,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "log_every": 1,
        "image_log_every": 100,
    }
    config.update(overrides)
    return config


def synthetic_faces(face_model, renderer=None, n=2, seed=0):
    """Faces whose photos are renders of a known bumpy displacement (so details are learnable)."""
    g = torch.Generator().manual_seed(seed)
    layout = face_model.layout
    coeffs = layout.zeros(n, "cpu", torch.float32)
    coeffs[:, layout.slices["exp"]] = torch.rand(n, layout.sizes["exp"], generator=g) * 0.2
    coeffs[:, layout.slices["gamma"]] = torch.tensor(DIRECTIONAL_LIGHT)
    exp_maps, valid = expression_map(face_model.expression_offsets(coeffs[:, layout.slices["exp"]]),
                                     face_model.triangles, face_model.tri_uv_idx, face_model.uv, UV)
    textures = torch.full((n, 3, UV, UV), 0.6)
    texture_valid = valid[None, None].float().expand(n, 1, UV, UV).clone()
    renderer = renderer or DetailRenderer(face_model, UV, albedo_blur_sigma=1.0)
    scene = renderer.prepare(coeffs, textures, texture_valid)
    yy, xx = torch.meshgrid(torch.arange(UV), torch.arange(UV), indexing="ij")
    bumps = 0.2 * torch.sin(xx / 2.0) * torch.cos(yy / 3.0)
    _, normals = renderer.detailed_maps(scene, bumps[None, None].expand(n, 1, UV, UV))
    photos = renderer.render(scene, normals).detach()
    masks = torch.ones(n, 1, 224, 224)
    return FaceTensors([f"face{i}" for i in range(n)], photos, masks, coeffs, textures, texture_valid, exp_maps)


def shard_batches(data, folder, batch_size=2, infinite=True, faces_per_shard=1, shuffle_buffer=2):
    """``data`` written as the four stage shard datasets and streamed back (the training path)."""
    stages = write_stage_shards(data, folder, faces_per_shard=faces_per_shard)
    stream = FaceShardStream.from_stages(*stages.values(), face_ids=data.face_ids, batch_size=batch_size, seed=0,
                                         shuffle_buffer=shuffle_buffer if infinite else 0, infinite=infinite)
    return ShardBatches(stream), stages


def test_photometric_gradient_reaches_the_displacement_map(face_model):
    renderer = DetailRenderer(face_model, UV, albedo_blur_sigma=1.0)
    data = synthetic_faces(face_model, renderer)
    scene = renderer.prepare(data.coefficients, data.uv_textures, data.texture_valid)
    displacement = torch.zeros(2, 1, UV, UV, requires_grad=True)
    _, normals = renderer.detailed_maps(scene, displacement)
    loss = masked_photometric_loss(renderer.render(scene, normals), data.images, scene.render_mask)
    loss.backward()
    assert loss.item() > 0.005  # the flat surface does not explain the bumpy photo
    assert (displacement.grad.abs() > 0).float().mean() > 0.2  # most face texels receive gradient


def test_training_reduces_the_photometric_loss(face_model, tmp_path):
    data, _ = shard_batches(synthetic_faces(face_model), tmp_path / "shards")
    config = tiny_config(tmp_path, steps=25, checkpoint_every=100)
    config["loss_weights"]["adversarial"] = 0.0
    result = DetailTrainer(face_model, None, config, UV, torch.device("cpu")).fit(data)
    photometric = [h["loss_photometric"] for h in result.history if "loss_photometric" in h]
    assert len(photometric) == 25
    assert sum(photometric[-5:]) / 5 < 0.9 * sum(photometric[:5]) / 5


def test_killed_training_resumes_from_last_checkpoint_exactly(face_model, tmp_path):
    # 3 faces, batch 2: the resumed stream must continue mid-epoch with the right faces
    data, _ = shard_batches(synthetic_faces(face_model, n=3), tmp_path / "shards")
    torch.manual_seed(0)
    uninterrupted = DetailTrainer(face_model, None, tiny_config(tmp_path / "a"), UV, torch.device("cpu")).fit(data)

    class Killed(Exception):
        pass

    def kill_at_step_3(metrics, step):
        if step == 3:
            raise Killed()

    torch.manual_seed(0)
    with pytest.raises(Killed):
        DetailTrainer(face_model, None, tiny_config(tmp_path / "b"), UV, torch.device("cpu"), log_metrics=kill_at_step_3).fit(data)
    torch.manual_seed(123)  # a new process would not share the RNG state: the checkpoint restores it
    resumed = DetailTrainer(face_model, None, tiny_config(tmp_path / "b"), UV, torch.device("cpu")).fit(data)
    assert resumed.resumed_from == 2
    for name, value in uninterrupted.generator.state_dict().items():
        assert torch.allclose(value, resumed.generator.state_dict()[name], atol=1e-6), name


def test_nan_losses_are_skipped_then_stop_training(face_model, tmp_path, caplog):
    data = synthetic_faces(face_model)
    trainer = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    original = copy.deepcopy(trainer.generator.state_dict())
    data.images[:] = float("nan")
    with pytest.raises(TrainingError, match="consecutive steps had non-finite losses"):
        trainer.fit(data)
    assert "non-finite loss" in caplog.text
    for name, value in trainer.generator.state_dict().items():  # skipped steps never touched the weights
        assert torch.equal(value, original[name])


def test_empty_training_set_is_a_clear_error(face_model, tmp_path):
    data = synthetic_faces(face_model).subset([])
    with pytest.raises(TrainingError, match="training set is empty"):
        DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu")).fit(data)


def test_validation_split_is_seeded_stable_and_never_one_sided():
    keys = [f"sha{i}" for i in range(200)]
    split = validation_split(keys, 0.2, seed=0)
    assert 20 <= split.sum() <= 60
    assert (validation_split(keys + ["new"], 0.2, seed=0)[:200] == split).all()  # adding a face moves no other
    assert (validation_split(keys, 0.2, seed=1) != split).any()
    small = validation_split([f"k{i}" for i in range(6)], 0.2, seed=0)
    assert small.sum() == 1  # round(0.2 * 6)
    assert validation_split(["a", "b"], 0.01, seed=0).sum() == 1
    assert validation_split(["a"], 0.5, seed=0).sum() == 0  # a single face trains


def test_completed_run_trains_anew_and_changed_settings_do_not_resume(face_model, tmp_path):
    data = synthetic_faces(face_model)
    first = DetailTrainer(face_model, None, tiny_config(tmp_path, steps=2), UV, torch.device("cpu"))
    first.fit(data)
    again = DetailTrainer(face_model, None, tiny_config(tmp_path, steps=2), UV, torch.device("cpu")).fit(data)
    assert again.resumed_from is None  # the first run completed: a new run starts from step 0
    changed = DetailTrainer(face_model, None, tiny_config(tmp_path, steps=2, batch_size=1), UV, torch.device("cpu"))
    assert changed.run_key(data) != first.run_key(data)
    assert first.run_key(data.subset([0])) != first.run_key(data)  # other faces, other run


def test_zero_displacement_renders_exactly_the_coarse_face(face_model):
    renderer = DetailRenderer(face_model, UV, albedo_blur_sigma=1.0)
    data = synthetic_faces(face_model, renderer)
    scene = renderer.prepare(data.coefficients, data.uv_textures, data.texture_valid)
    positions, normals = renderer.detailed_maps(scene, torch.zeros(2, 1, UV, UV))
    assert torch.equal(positions, scene.position_map)
    assert torch.allclose(renderer.render(scene, normals), renderer.render(scene, scene.normal_map), atol=1e-6)


def test_logged_image_grid_rows_show_the_batch_faces(face_model, tmp_path):
    data = synthetic_faces(face_model, n=4)
    g = torch.Generator().manual_seed(1)
    background = torch.rand(4, 3, 224, 224, generator=g)
    covered = (data.images.sum(1, keepdim=True) > 0).float()
    data.images = covered * data.images + (1 - covered) * background  # each face its own background
    grids = []
    config = tiny_config(tmp_path, steps=2, image_log_every=1, batch_size=2)
    DetailTrainer(face_model, None, config, UV, torch.device("cpu"), log_images=lambda name, image, step: grids.append(image)).fit(data)
    assert len(grids) == 2
    for grid in grids:
        for row in range(2):
            tile = grid[row * 224 : (row + 1) * 224]
            photo, coarse = tile[:, :224].astype(int), tile[:, 224:448].astype(int)
            assert abs(photo[:16, :16] - coarse[:16, :16]).max() <= 1  # outside the face both are the same photo


def test_validation_is_streamed_and_equals_the_in_memory_evaluation(face_model, tmp_path):
    faces = synthetic_faces(face_model, n=3)
    validation, stages = shard_batches(faces, tmp_path / "shards", batch_size=2, infinite=False)
    train, _ = shard_batches(faces.subset([0, 1]), tmp_path / "train_shards")
    trainer = DetailTrainer(face_model, None, tiny_config(tmp_path, steps=1), UV, torch.device("cpu"))
    result = trainer.fit(train, validation)
    streamed = result.history[-1]
    assert streamed["step"] == 1 and set(streamed) >= {"val_photometric_detailed", "val_photometric_coarse"}
    in_memory = trainer.evaluate(face_tensors_from_shards(*stages.values()), batch_size=3)  # the same faces, one batch
    # the photometric loss pools the masked pixels of a batch, so batches of 2 + 1 and of 3 weigh the faces by their
    # mask areas slightly differently (measured 1.6e-5 relative with the closed ICT mesh): equal to 1e-4
    assert streamed["val_photometric_detailed"] == pytest.approx(in_memory["val_photometric_detailed"], rel=1e-4)
    assert streamed["val_photometric_coarse"] == pytest.approx(in_memory["val_photometric_coarse"], rel=1e-4)
    assert streamed["val_photometric_coarse"] > 0


def test_compact_uint8_faces_train_exactly_like_their_float_version(face_model, tmp_path):
    data = synthetic_faces(face_model)
    quantised_images = (data.images * 255).round().to(torch.uint8)
    quantised_textures = (data.uv_textures * 255).round().to(torch.uint8)
    compact = FaceTensors(data.face_ids, quantised_images, data.masks.bool(), data.coefficients,
                          quantised_textures, data.texture_valid.bool(), data.expression_maps.half())
    as_float = compact.as_float()
    assert as_float.images.dtype == torch.float32 and float(as_float.images.max()) <= 1.0
    assert torch.equal(as_float.uv_textures, quantised_textures.float() / 255)
    results = []
    for name, faces in (("compact", compact), ("float", as_float)):
        torch.manual_seed(0)
        results.append(DetailTrainer(face_model, None, tiny_config(tmp_path / name, steps=2), UV, torch.device("cpu")).fit(faces))
    for key, value in results[0].generator.state_dict().items():
        assert torch.equal(value, results[1].generator.state_dict()[key]), key


def test_resumed_history_holds_every_step(face_model, tmp_path):
    """kill -9 after a checkpoint, then resume: the history has the steps before the checkpoint too."""
    data = synthetic_faces(face_model)
    torch.manual_seed(0)
    uninterrupted = DetailTrainer(face_model, None, tiny_config(tmp_path / "a"), UV, torch.device("cpu")).fit(data)

    class Killed(Exception):
        pass

    def kill_at_step_3(metrics, step):
        if step == 3:
            raise Killed()

    torch.manual_seed(0)
    with pytest.raises(Killed):
        DetailTrainer(face_model, None, tiny_config(tmp_path / "b"), UV, torch.device("cpu"), log_metrics=kill_at_step_3).fit(data)
    resumed = DetailTrainer(face_model, None, tiny_config(tmp_path / "b"), UV, torch.device("cpu")).fit(data)
    assert resumed.resumed_from == 2
    assert [row["step"] for row in resumed.history] == [row["step"] for row in uninterrupted.history] == list(range(6))
    for before, after in zip(uninterrupted.history, resumed.history):
        assert set(before) == set(after)
        for key in before:
            if key != "seconds_per_step":
                assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (before["step"], key)


def test_concurrent_run_on_the_same_checkpoint_folder_fails_clearly(face_model, tmp_path):
    from facedetail.training.checkpoint import CheckpointLock, CheckpointLockedError

    data = synthetic_faces(face_model)
    trainer = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    folder = trainer.checkpoint_root / trainer.run_key(data)
    with CheckpointLock(folder):  # another live run (same settings) holds the folder
        with pytest.raises(CheckpointLockedError, match=rf"checkpoint folder {folder} is in use by another training run \(PID \d+\)"):
            trainer.fit(data)
    assert not list(folder.glob("step_*.pt"))  # the refused run wrote nothing
    assert trainer.fit(data).final_step == 6  # released: the next run trains


def test_gradient_photometric_term_is_optional_and_trains_the_generator(face_model, tmp_path):
    """``loss_weights.gradient_photometric`` > 0 adds the shading-gradient term (off by default): the masked
    gradient loss of the detailed render vs the photo, with gradients into the generator."""
    from facedetail.losses import masked_gradient_photometric_loss

    data = synthetic_faces(face_model)
    off = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    assert "gradient_photometric" not in off.losses(data, step=0)[0]
    config = tiny_config(tmp_path)
    config["loss_weights"] = {"photometric": 0.0, "gradient_photometric": 1.0, "adversarial": 0.0}
    trainer = DetailTrainer(face_model, None, config, UV, torch.device("cpu"))
    terms, extras = trainer.losses(data, step=0)
    expected = masked_gradient_photometric_loss(extras["detailed"], extras["images"], extras["mask"])
    torch.testing.assert_close(terms["gradient_photometric"], expected)
    assert float(terms["gradient_photometric"]) > 0
    terms["total"].backward()
    grads = [p.grad for p in trainer.generator.drconv.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0


def test_detail_lowpass_term_is_optional(face_model, tmp_path):
    """``loss_weights.detail_lowpass`` > 0 adds the displacement low-pass regulariser (off by default) on the
    generator's displacement, with ``detail_lowpass_sigma``, weighted into the total."""
    from facedetail.losses import displacement_lowpass_regularization

    data = synthetic_faces(face_model)
    off = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    assert "detail_lowpass" not in off.losses(data, step=0)[0]
    config = tiny_config(tmp_path)
    config["loss_weights"] = {"photometric": 0.0, "detail_lowpass": 2.0, "adversarial": 0.0}
    config["detail_lowpass_sigma"] = 1.5
    trainer = DetailTrainer(face_model, None, config, UV, torch.device("cpu"))
    terms, extras = trainer.losses(data, step=0)
    expected = displacement_lowpass_regularization(extras["displacement"], trainer.renderer.uv_valid, 1.5)
    torch.testing.assert_close(terms["detail_lowpass"], expected)
    assert extras["weights"]["weight_detail_lowpass"] == 2.0 and float(terms["detail_lowpass"]) > 0


def test_uv_photometric_term_is_optional_and_trains_the_generator(face_model, tmp_path):
    """``loss_weights.uv_photometric`` > 0 adds the UV-space photometric term (off by default): the unwrapped
    texture vs albedo x SH(detailed normals) over the visible face texels, with gradients into the generator."""
    data = synthetic_faces(face_model)
    off = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    terms, _ = off.losses(data, step=0)
    assert "uv_photometric" not in terms
    config = tiny_config(tmp_path)
    config["loss_weights"] = {"photometric": 0.0, "uv_photometric": 1.0, "adversarial": 0.0}
    trainer = DetailTrainer(face_model, None, config, UV, torch.device("cpu"))
    assert 0.2 < float(trainer.uv_face_region.mean()) < 0.9  # the face region, not the whole UV square
    # the term is the masked photometric loss of the UV render (albedo x SH(detailed normals)) vs the texture
    from facedetail.render.shading import irradiance_map

    scene = trainer.renderer.prepare(data.coefficients, data.uv_textures, data.texture_valid)
    terms, extras = trainer.losses(data, step=0, scene=scene)
    uv_render = (scene.albedo_map * irradiance_map(extras["detailed_normals"], scene.gamma)).clamp(0, 1)
    expected = masked_photometric_loss(uv_render, data.uv_textures, data.texture_valid * trainer.uv_face_region)
    torch.testing.assert_close(terms["uv_photometric"], expected)
    assert float(terms["uv_photometric"]) > 0
    terms["total"].backward()
    grads = [p.grad for p in trainer.generator.drconv.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0


def test_albedo_from_the_detailed_shading_is_optional_and_divides_it_out(face_model, tmp_path):
    """``albedo_shading: detailed`` de-lights the unwrapped photo with the CURRENT detailed shading (off by default):
    a texture that is a constant albedo 0.5 times the shading of a known displacement gives back exactly 0.5 with
    that displacement's normals (the coarse de-lighting keeps its shading), and no gradient flows through it."""
    from facedetail.geometry.detail import delit_albedo
    from facedetail.render.shading import irradiance_map

    data = synthetic_faces(face_model)
    off = DetailTrainer(face_model, None, tiny_config(tmp_path), UV, torch.device("cpu"))
    scene = off.renderer.prepare(data.coefficients, data.uv_textures, data.texture_valid)
    assert off.albedo_shading == "coarse"
    _, extras = off.losses(data, step=0, scene=scene)
    assert extras["scene"].albedo_map is scene.albedo_map  # default: today's albedo, untouched
    trainer = DetailTrainer(face_model, None, tiny_config(tmp_path, albedo_shading="detailed"), UV, torch.device("cpu"))
    yy, xx = torch.meshgrid(torch.arange(UV), torch.arange(UV), indexing="ij")
    bumps = (0.2 * torch.sin(xx / 2.0) * torch.cos(yy / 3.0))[None, None].expand(2, 1, UV, UV)
    _, normals = trainer.renderer.detailed_maps(scene, bumps)
    texture = 0.5 * irradiance_map(normals, scene.gamma).clamp_min(1e-3)  # (de-lighting divides by shading >= 1e-3)
    batch = FaceTensors(data.face_ids, data.images, data.masks, data.coefficients, texture, data.texture_valid, data.expression_maps)
    valid = (data.texture_valid * scene.uv_valid).expand(-1, 3, -1, -1) > 0
    detailed = trainer.albedo_for(batch, scene, normals.requires_grad_(True))
    torch.testing.assert_close(detailed[valid], torch.full_like(detailed[valid], 0.5))
    assert not detailed.requires_grad
    coarse = delit_albedo(texture, data.texture_valid * scene.uv_valid, irradiance_map(scene.normal_map, scene.gamma), 1.0)
    assert float((coarse - 0.5)[valid].abs().max()) > 0.02  # the coarse de-lighting leaves the bumps' shading in it
    # in the loss: the renders shade the re-estimated albedo, the generator still gets gradients
    terms, extras = trainer.losses(data, step=0, scene=scene)
    expected = trainer.albedo_for(data, scene, extras["detailed_normals"])
    torch.testing.assert_close(extras["scene"].albedo_map, expected)
    assert not torch.equal(expected, scene.albedo_map)
    terms["total"].backward()
    grads = [p.grad for p in trainer.generator.drconv.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0
    with pytest.raises(TrainingError, match="albedo_shading"):
        DetailTrainer(face_model, None, tiny_config(tmp_path, albedo_shading="fine"), UV, torch.device("cpu"))
