"""Data-parallel training: 2 gloo ranks on the CPU train exactly like 1 process with the same global batch.

The two runs see the same global batches (the ``"sample"`` split makes batch g = faces
order[g*B:(g+1)*B] for any world size) and the same per-face scenes; what differs is float32
summation order (per-rank batch 2 vs 4 in the convolutions, the all-reduce of two half-batch
gradients instead of one), ~1e-7 relative per step.

Tolerances (3 steps, Adam lr 2e-3, measured max differences in brackets):
* every generator and discriminator weight: atol 3e-5 (1.1e-5, a D conv weight; most < 1e-6), i.e.
  1.5 % of one Adam step: Adam divides by sqrt(v), so elements with a near-zero gradient amplify
  rounding noise;
* except the biases of convolutions followed by an InstanceNorm (no affine): the norm subtracts
  them, their true gradient is exactly 0, Adam turns the ~1e-9 rounding noise into +-lr steps of
  random sign (3e-3 measured). They do not change any output, so they are excluded from the weight
  comparison and instead the outputs of G (displacement, embedding) and D (scores) on fixed inputs
  must agree within atol 1e-5.
* the per-step total loss (rank mean under DDP) within 1e-5.
Perceptual weight is 0 (FaceNet at 224 px is too slow here); photometric, adversarial (D trained
too) and Eq. 2 terms are on.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from facedetail.data.streaming import FaceShardStream, ShardBatches, write_stage_shards
from facedetail.geometry.face_model import load_face_model
from facedetail.training.loop import DetailTrainer

ICT = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
pytestmark = [pytest.mark.skipif(not ICT.is_file(), reason=f"ICT-FaceKit model not found at {ICT}"), pytest.mark.slow]
UV, STEPS, GLOBAL_BATCH = 32, 3, 4


def _config(folder: Path) -> dict:
    from tests.test_training import tiny_config

    config = tiny_config(folder, steps=STEPS, batch_size=GLOBAL_BATCH, checkpoint_every=2, keep_checkpoints=5, seed=0)
    config["checkpoint_dir"] = str(folder / "ckpt")
    return config


def _stages(folder: Path) -> dict:
    import pickle

    return pickle.loads((folder / "stages.pkl").read_bytes())


def _stream(folder: Path, rank: int, world: int) -> ShardBatches:
    stages = _stages(folder)
    ids = stages["aligned_faces"].index["face_id"].tolist()
    stream = FaceShardStream.from_stages(*stages.values(), face_ids=ids, batch_size=GLOBAL_BATCH // world, seed=0, shuffle_buffer=3,
                                         rank=rank, world_size=world, split="sample")
    return ShardBatches(stream)


def _train(folder: Path, out: Path, rank: int, world: int, ctx=None, kill_at: int | None = None) -> None:
    torch.set_num_threads(1)
    face_model = load_face_model("ict", ICT)
    torch.manual_seed(0)

    trainer = DetailTrainer(face_model, None, _config(out), UV, torch.device("cpu"), distributed=ctx)
    if kill_at is not None:  # every rank dies at the same step (as a killed torchrun job)
        step_once = trainer.train_step

        def train_step(batch, step, scene=None):
            if step == kill_at:
                raise KeyboardInterrupt("killed")
            return step_once(batch, step, scene)

        trainer.train_step = train_step
    try:
        result = trainer.fit(_stream(folder, rank, world))
    except KeyboardInterrupt:
        return
    if rank == 0:
        torch.save({"generator": result.generator.state_dict(), "discriminator": trainer.discriminator.state_dict(),
                    "resumed_from": result.resumed_from, "history": result.history}, out / "weights.pt")


def _rank_main(rank: int, world: int, port: int, folder: str, out: str, kill_at: int | None) -> None:
    from facedetail.training.distributed import cleanup, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_distributed("cpu", timeout_s=120)
    try:
        _train(Path(folder), Path(out), rank, world, ctx, kill_at)
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(folder: Path, out: Path, kill_at: int | None = None) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), str(folder), str(out), kill_at), nprocs=2, join=True)


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    import pickle

    from tests.test_training import synthetic_faces

    folder = tmp_path_factory.mktemp("ddp_shards")
    faces = synthetic_faces(load_face_model("ict", ICT), n=10, seed=3)
    stages = write_stage_shards(faces, folder, faces_per_shard=4)  # 3 shards (4, 4, 2 faces)
    (folder / "stages.pkl").write_bytes(pickle.dumps(stages))
    return folder


def biases_cancelled_by_instance_norm(module: torch.nn.Module) -> set[str]:
    """Names of conv biases that an InstanceNorm without affine removes (their true gradient is 0)."""
    names = set()
    for prefix, sequence in module.named_modules():
        if isinstance(sequence, torch.nn.Sequential):
            children = list(sequence.named_children())
            for (name, layer), (_, following) in zip(children, children[1:]):
                if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and layer.bias is not None \
                        and isinstance(following, torch.nn.InstanceNorm2d) and not following.affine:
                    names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def _models(state: dict):
    trainer = DetailTrainer(load_face_model("ict", ICT), None, _config(Path("/nonexistent")), UV, torch.device("cpu"))
    trainer.generator.load_state_dict(state["generator"])
    trainer.discriminator.load_state_dict(state["discriminator"])
    return trainer.generator.eval(), trainer.discriminator.eval()


@torch.no_grad()
def _assert_same_models(a: dict, b: dict, atol: float) -> None:
    (g, d) = _models(a)
    skip = {"generator": biases_cancelled_by_instance_norm(g), "discriminator": biases_cancelled_by_instance_norm(d)}
    assert len(skip["generator"]) >= 4 and len(skip["discriminator"]) == 2
    for part in ("generator", "discriminator"):
        assert a[part].keys() == b[part].keys()
        worst = max(float((v - b[part][k]).abs().max()) for k, v in a[part].items() if k not in skip[part])
        print(f"{part}: max |weight difference| {worst:.2e} (biases before instance norm excluded: {len(skip[part])})")
        for name, value in a[part].items():
            if name not in skip[part]:
                assert torch.allclose(value, b[part][name], atol=atol, rtol=0), (part, name, float((value - b[part][name]).abs().max()))
    (g2, d2) = _models(b)
    gen = torch.Generator().manual_seed(7)
    uv, valid, expr = torch.rand(2, 3, UV, UV, generator=gen), torch.ones(2, 1, UV, UV), torch.randn(2, 3, UV, UV, generator=gen) * 0.1
    out_a, out_b = g(uv, valid, expr), g2(uv, valid, expr)
    for key in ("displacement", "embedding"):
        assert torch.allclose(out_a[key], out_b[key], atol=1e-5, rtol=0), (key, float((out_a[key] - out_b[key]).abs().max()))
    image, condition = torch.rand(2, 3, 224, 224, generator=gen), torch.rand(2, 3, 224, 224, generator=gen)
    scores_a, scores_b = d(image, condition), d2(image, condition)
    assert torch.allclose(scores_a, scores_b, atol=1e-5, rtol=0), float((scores_a - scores_b).abs().max())


@pytest.fixture(scope="module")
def ddp_run(shard_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_run")
    tic = time.perf_counter()
    _spawn(shard_folder, out)
    print(f"2-rank gloo DDP run: {time.perf_counter() - tic:.1f} s")
    return torch.load(out / "weights.pt", weights_only=True)


def test_two_gloo_ranks_train_like_one_process_with_the_same_global_batch(shard_folder, ddp_run, tmp_path):
    tic = time.perf_counter()
    _train(shard_folder, (tmp_path / "single"), 0, 1)
    print(f"single process run: {time.perf_counter() - tic:.1f} s")
    single, ddp = torch.load(tmp_path / "single" / "weights.pt", weights_only=True), ddp_run
    initial = DetailTrainer(load_face_model("ict", ICT), None, _config(tmp_path / "x"), UV, torch.device("cpu"))
    moved = max(float((v - initial.generator.state_dict()[k]).abs().max()) for k, v in single["generator"].items())
    assert moved > 1e-3  # the weights did move (the comparison is not between two untrained models)
    _assert_same_models(single, ddp, atol=3e-5)
    losses_single = [h["loss_total"] for h in single["history"]]
    losses_ddp = [h["loss_total"] for h in ddp["history"]]  # rank means of the per-rank losses
    assert len(losses_single) == STEPS
    assert losses_single == pytest.approx(losses_ddp, abs=1e-5)


def test_ddp_run_killed_after_a_checkpoint_resumes_identically(shard_folder, ddp_run, tmp_path):
    _spawn(shard_folder, tmp_path / "killed", kill_at=2)  # checkpoint at step 2 written, killed at step 2
    assert not (tmp_path / "killed" / "weights.pt").exists()
    _spawn(shard_folder, tmp_path / "killed")  # new processes: resume from step 2
    resumed = torch.load(tmp_path / "killed" / "weights.pt", weights_only=True)
    assert resumed["resumed_from"] == 2
    for part in ("generator", "discriminator"):  # same ranks, same batches, same RNG: bit-identical
        for name, value in ddp_run[part].items():
            assert torch.equal(value, resumed[part][name]), (part, name)
