"""Streaming training data over the four stage shards: trainable/split filtering, distinct faces per
(rank, worker), equal batch counts, seeded epochs, exact resume, DataLoader workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facedetail.data.faces import FaceTensors, validation_split
from facedetail.data.streaming import (
    FaceShardStream,
    ShardBatches,
    face_tensors_from_shards,
    shuffle_buffer_order,
    split_faces,
    trainable_faces,
    write_stage_shards,
)

N, UV = 26, 8


def random_faces(n: int = N, seed: int = 0) -> FaceTensors:
    g = torch.Generator().manual_seed(seed)
    return FaceTensors(
        [f"face{i:03d}" for i in range(n)],
        torch.randint(0, 256, (n, 3, 224, 224), generator=g, dtype=torch.uint8),
        torch.rand(n, 1, 224, 224, generator=g) > 0.5,
        torch.randn(n, 7, generator=g),
        torch.randint(0, 256, (n, 3, UV, UV), generator=g, dtype=torch.uint8),
        torch.rand(n, 1, UV, UV, generator=g) > 0.2,
        torch.randn(n, 3, UV, UV, generator=g).half(),
    )


FAILED = {"face_masks": {"face003"}, "uv_maps": {"face010", "face011"}, "aligned_faces": {"face020"}}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    faces = random_faces()
    return faces, write_stage_shards(faces, tmp_path_factory.mktemp("stages"), faces_per_shard=4, failed=FAILED)  # 7 shards


def _ids(samples) -> list[str]:
    return [s["face_id"] for s in samples]


def test_trainable_faces_and_split_come_from_the_index(stages):
    faces, st = stages
    table = trainable_faces(*st.values())
    failed = set().union(*FAILED.values())
    assert set(table.loc[~table["trainable"], "face_id"]) == failed
    train, val = split_faces(table, 0.25, seed=0)
    usable = [f for f in faces.face_ids if f not in failed]
    expected = validation_split([f"sha-{f}" for f in usable], 0.25, 0)
    assert val == [f for f, v in zip(usable, expected) if v] and len(val) == round(0.25 * len(usable))
    assert sorted(train + val) == sorted(usable)
    st_bad = dict(st)
    st_bad["uv_maps"] = type(st["uv_maps"])(st["uv_maps"].shards[:-1], st["uv_maps"].index, [], {})
    with pytest.raises(ValueError, match="shard counts"):
        trainable_faces(*st_bad.values())


def test_streamed_samples_match_the_written_faces_and_skip_failed_ones(stages):
    faces, st = stages
    loaded = face_tensors_from_shards(*st.values())
    failed = set().union(*FAILED.values())
    keep = [i for i, f in enumerate(faces.face_ids) if f not in failed]
    assert loaded.face_ids == [faces.face_ids[i] for i in keep]
    ref = faces.subset(keep)
    assert loaded.images.dtype == torch.uint8 and loaded.masks.dtype == torch.bool and loaded.expression_maps.dtype == torch.float16
    for name in ("images", "masks", "coefficients", "uv_textures", "texture_valid", "expression_maps"):
        assert torch.equal(getattr(loaded, name), getattr(ref, name)), name


@pytest.mark.parametrize("split", ["sample", "shard"])
def test_each_rank_and_worker_gets_distinct_faces_whose_union_is_the_split(stages, split):
    _, st = stages
    train, val = split_faces(trainable_faces(*st.values()), 0.25, seed=0)
    world, workers, b = 2, 2, (2 if split == "sample" else 1)  # shard split: every consumer fills its batches
    # validation: every face of the split exactly once over the 4 consumers
    seen = []
    for rank in range(world):
        stream = FaceShardStream.from_stages(*st.values(), face_ids=val + train, batch_size=b, infinite=False, rank=rank,
                                             world_size=world, split=split, min_shards_per_consumer=1)
        assert stream.split_mode(workers) == split
        seen.append([_ids(stream.iter_consumer(w, workers)) for w in range(workers)])
    flat = [f for per_rank in seen for ids in per_rank for f in ids]
    assert sorted(flat) == sorted(val + train) and len(set(flat)) == len(flat)
    assert all(len(ids) > 0 for per_rank in seen for ids in per_rank)
    # training epoch 0: distinct faces across (rank, worker), same number of batches on every rank
    per_consumer, steps_per_rank = [], []
    for rank in range(world):
        stream = FaceShardStream.from_stages(*st.values(), face_ids=train, batch_size=b, seed=5, shuffle_buffer=3, rank=rank,
                                             world_size=world, split=split, min_shards_per_consumer=1)
        plans = [next(stream.plans(w, workers)) for w in range(workers)]
        steps_per_rank.append(sorted(s for p in plans for s in p.steps))
        for p in plans:
            rows = np.concatenate(p.batches)
            assert all(len(x) == b for x in p.batches)
            per_consumer.append([stream.face_ids[r] for r in rows])
    assert steps_per_rank[0] == steps_per_rank[1] == list(range(len(steps_per_rank[0])))
    flat = [f for ids in per_consumer for f in ids]
    assert len(set(flat)) == len(flat) and set(flat) <= set(train)
    if split == "sample":
        assert len(flat) == (len(train) // (b * world)) * b * world  # only the remainder (< one global batch) is dropped
    else:
        assert len(flat) >= len(train) - 2 * 4 * world * workers  # at most a few shards' surplus


@pytest.mark.parametrize("split", ["sample", "shard"])
def test_training_stream_is_seeded_endless_and_resumes_at_any_step(stages, split):
    _, st = stages
    train, _ = split_faces(trainable_faces(*st.values()), 0.25, seed=0)

    def steps(start, count, seed=1, workers=2, rank=0):
        stream = FaceShardStream.from_stages(*st.values(), face_ids=train, batch_size=2, seed=seed, shuffle_buffer=4, split=split,
                                             rank=rank, world_size=2, start_step=start, min_shards_per_consumer=1)
        # the DataLoader's round-robin over workers: step start+k comes from worker k % workers
        its = [stream.iter_consumer(w, workers) for w in range(workers)]
        out = []
        for k in range(count):
            it = its[k % workers]
            out.append(tuple(next(it)["face_id"] for _ in range(2)))
        return out

    run = steps(0, 30)  # several epochs
    assert len(set(run[:3])) == 3
    assert steps(0, 30) == run  # seeded
    assert steps(0, 30, seed=2) != run
    assert steps(7, 23) == run[7:]  # exact resume, any step (also mid-epoch, odd start)
    assert steps(13, 17) == run[13:]
    if split == "sample":  # the global batches do not depend on the number of workers
        assert steps(0, 30, workers=1) == run


def test_dataloader_workers_give_the_same_batches_as_the_main_process(stages):
    _, st = stages
    train, _ = split_faces(trainable_faces(*st.values()), 0.25, seed=0)
    stream = FaceShardStream.from_stages(*st.values(), face_ids=train, batch_size=3, seed=0, shuffle_buffer=5, split="sample")
    main, workers = ShardBatches(stream, num_workers=0).batches(4), ShardBatches(stream, num_workers=2, prefetch_factor=1).batches(4)
    for _ in range(8):
        a, b = next(main), next(workers)
        assert isinstance(a, FaceTensors) and len(a) == 3
        assert a.face_ids == b.face_ids and torch.equal(a.images, b.images) and torch.equal(a.expression_maps, b.expression_maps)


@pytest.mark.parametrize("split,world", [("sample", 1), ("sample", 2), ("shard", 2)])
def test_a_consumer_holds_at_most_the_shuffle_buffer_plus_one_batch(stages, split, world):
    _, st = stages
    train, _ = split_faces(trainable_faces(*st.values()), 0.0, seed=0)
    for buffer in (0, 3, 6):
        stream = FaceShardStream.from_stages(*st.values(), face_ids=train, batch_size=2, seed=3, shuffle_buffer=buffer, split=split,
                                             world_size=world, min_shards_per_consumer=1)
        it = stream.iter_consumer(0, 1)
        for _ in range(60):  # several epochs
            next(it)
        assert 0 < stream.peak_held <= buffer + 2, (buffer, stream.peak_held)


def test_shuffle_buffer_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(200, 16, rng)
    assert sorted(order.tolist()) == list(range(200))
    assert (order[:-16] <= np.arange(200 - 16) + 16).all()  # output p comes from the first p + size inputs
    assert (order != np.arange(200)).any()
    assert (shuffle_buffer_order(50, 1, rng) == np.arange(50)).all()


def test_a_split_smaller_than_the_batch_wraps(stages):
    _, st = stages
    stream = FaceShardStream.from_stages(*st.values(), face_ids=["face000", "face001"], batch_size=3, world_size=1)
    batches = ShardBatches(stream).batches(0)
    first = next(batches)
    assert len(first) == 3 and set(first.face_ids) == {"face000", "face001"}
