"""Streaming training batches over the sharded per-face stages (rank and DataLoader-worker aware).

The training inputs of a face live in four stage datasets whose shard ``k`` holds the same faces
in the same order (:mod:`facedetail.data.shards`): ``aligned_faces`` (image, face_sha256),
``face_masks`` (mask), ``face_coefficients`` (coefficients) and ``uv_maps`` (expression map, UV
texture, texture validity). :class:`FaceShardStream` walks the four shard files of one number in
lockstep (``tarfile`` stream mode: one face per stage decoded at a time) and yields one sample per
trainable face of the requested split, in the :class:`~facedetail.data.faces.FaceTensors` field
layout with compact dtypes (uint8 image/texture, bool mask/validity, float16 expression map);
:func:`collate_faces` stacks samples into a ``FaceTensors`` batch, converted to float per batch
(``FaceTensors.as_float``) by the trainer.

Plan on the index, read the shards
----------------------------------
Which face goes into which batch is decided from the parquet indexes alone (no arrays): per epoch
a seeded permutation of the shard order, then a bounded shuffle buffer (``shuffle_buffer`` faces,
simulated on row numbers). A consumer (one rank x one DataLoader worker) then streams only the
shards holding faces it needs, in the planned shard order, keeps those faces and emits them batch
by batch. The plan makes the stream a pure function of ``(seed, step)``: exact resume opens it at
``start_step`` (whole epochs are skipped arithmetically; inside the epoch, shards holding only
already-consumed batches are not even opened).

Two ways to split the work (``split``):

* ``"sample"``: every consumer plans the same global order; global batch ``g`` is
  ``order[g*B : (g+1)*B]`` (``B`` = global batch) and rank ``r`` takes its slice
  ``[r*b : (r+1)*b]``. The global batches do not depend on the world size nor on the number of
  workers (so 2 ranks x 2 faces train exactly like 1 process x 4 faces), but every consumer reads
  every shard (I/O grows with ranks x workers): meant for small sets or few shards.
* ``"shard"``: consumer ``c`` of ``C = world_size * num_workers`` reads only shards
  ``order[c::C]`` with its own shuffle buffer: each shard is read by exactly one consumer.
* ``"auto"`` (default): ``"shard"`` when every consumer gets at least ``min_shards_per_consumer``
  shards holding split faces and even the fewest, smallest shards fill one batch, else ``"sample"``.

Equal batch counts (DDP never hangs): training streams are infinite and every rank yields exactly
one batch per step. Per epoch the remainder is dropped: ``"sample"`` keeps ``floor(N / B)`` global
batches, ``"shard"`` keeps ``min_c floor(n_c / b)`` batches per consumer (the consumer with the
fewest faces sets the count; other consumers drop their surplus, different faces each epoch). A
split smaller than one batch wraps around (faces repeat inside the batch). Validation streams
(``infinite=False``) yield every face of the split exactly once, split over the consumers; their
batch counts may differ per rank (the trainer evaluates without DDP and all-reduces sums).

Memory: a consumer holds at most ``shuffle_buffer + batch_size`` decoded faces (the faces of the
shuffle window it owns plus the batch being assembled) and one face per stage of the four shards
it is streaming (tar stream mode never loads a whole shard); the DataLoader adds
``num_workers * prefetch_factor`` collated batches in flight. Nothing scales with the number of
faces except the index-sized plan (a few integers per face).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facedetail.data.faces import FaceTensors, validation_split
from facedetail.data.shards import FaceShards, ShardError, index_frame, index_rows, iter_shard, shard_name, write_shard

logger = logging.getLogger(__name__)

#: The four stages a trainable face needs, in the order of the per-shard path tuples.
STAGES = ("aligned_faces", "face_masks", "face_coefficients", "uv_maps")
SPLITS = ("auto", "sample", "shard")


class StreamError(ValueError):
    """The stage datasets do not line up, or a stream cannot be built as asked."""


# ---------------------------------------------------------------------------------------------- index
def trainable_faces(aligned_faces: FaceShards, face_masks: FaceShards, face_coefficients: FaceShards, uv_maps: FaceShards) -> pd.DataFrame:
    """One row per face of the four stages: ``face_id, shard, position, face_sha256, trainable``.

    A face is trainable when its status is ``"ok"`` in all four stages. Built from the parquet
    indexes alone; raises :class:`StreamError` when the stages do not describe the same faces in
    the same shards and positions (a stale stage output).
    """
    stages = (aligned_faces, face_masks, face_coefficients, uv_maps)
    counts = {s.num_shards for s in stages}
    if len(counts) != 1:
        raise StreamError(f"the stages {STAGES} have different shard counts {[s.num_shards for s in stages]}: rerun the stale stage")
    keyed = [s.index.sort_values(["shard", "position"]).reset_index(drop=True) for s in stages]
    base = keyed[0]
    for name, other in zip(STAGES[1:], keyed[1:]):
        same = len(other) == len(base) and (other[["face_id", "shard", "position"]].astype(str).values == base[["face_id", "shard", "position"]].astype(str).values).all()
        if not same:
            raise StreamError(f"stage '{name}' does not hold the faces of 'aligned_faces' in the same shards/positions: rerun it")
    trainable = np.logical_and.reduce([k["status"].astype(str).values == "ok" for k in keyed])
    keys = base["face_sha256"].astype(str).where(base["face_sha256"].astype(str) != "", base["face_id"].astype(str))
    return pd.DataFrame(
        {"face_id": base["face_id"].astype(str).values, "shard": base["shard"].astype(int).values,
         "position": base["position"].astype(int).values, "face_sha256": keys.values, "trainable": trainable}
    )


def split_faces(faces: pd.DataFrame, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train_ids, validation_ids)`` of the trainable rows of :func:`trainable_faces`.

    The split is :func:`~facedetail.data.faces.validation_split` over ``face_sha256`` (content
    based, as for the in-memory path): computed from the index, no arrays read.
    """
    usable = faces[faces["trainable"]]
    is_val = validation_split(usable["face_sha256"].tolist(), float(fraction), int(seed))
    ids = usable["face_id"].tolist()
    return [f for f, v in zip(ids, is_val) if not v], [f for f, v in zip(ids, is_val) if v]


def shard_path_tuples(aligned_faces: FaceShards, face_masks: FaceShards, face_coefficients: FaceShards, uv_maps: FaceShards) -> list[tuple[Path, Path, Path, Path]]:
    """``[(aligned, masks, coefficients, uv_maps) shard path of number k for k ...]``."""
    return [tuple(Path(p) for p in paths) for paths in zip(aligned_faces.shards, face_masks.shards, face_coefficients.shards, uv_maps.shards)]


def face_sample(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One face's training sample (compact dtypes, FaceTensors layout) from its four stage records."""
    aligned, masks, coefficients, uv = records
    return {
        "face_id": str(aligned["face_id"]),
        "image": torch.from_numpy(np.ascontiguousarray(np.asarray(aligned["image"], dtype=np.uint8).transpose(2, 0, 1))),
        "mask": torch.from_numpy(np.asarray(masks["mask"]).astype(bool))[None],
        "coefficients": torch.from_numpy(np.asarray(coefficients["coefficients"], dtype=np.float32)),
        "uv_texture": torch.from_numpy(np.asarray(uv["uv_texture"], dtype=np.uint8)),
        "texture_valid": torch.from_numpy(np.asarray(uv["texture_valid"]).astype(bool).reshape(1, *np.shape(uv["texture_valid"])[-2:])),
        "expression_map": torch.from_numpy(np.asarray(uv["expression_map"], dtype=np.float16)),
    }


def iter_zipped_shard(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[int, str, tuple[dict[str, Any], ...]]]:
    """``(position, face_id, records)`` of shard ``k`` of every stage, streamed in lockstep (checked by face id)."""
    streams = [iter_shard(p) for p in paths]
    position = 0
    while True:
        records = [next(s, None) for s in streams]
        if all(r is None for r in records):
            return
        if any(r is None for r in records):
            raise ShardError(f"shards {[str(p) for p in paths]} hold different face counts: stale stage outputs?")
        ids = {r.get("face_id") for r in records}
        if len(ids) != 1:
            raise ShardError(f"shards are out of step at position {position}: face ids {sorted(map(str, ids))}")
        yield position, str(records[0]["face_id"]), tuple(records)
        position += 1


def collate_faces(samples: Sequence[dict[str, Any]]) -> FaceTensors:
    """Stack per-face samples into one compact :class:`FaceTensors` batch."""
    return FaceTensors(
        [s["face_id"] for s in samples],
        torch.stack([s["image"] for s in samples]),
        torch.stack([s["mask"] for s in samples]),
        torch.stack([s["coefficients"] for s in samples]),
        torch.stack([s["uv_texture"] for s in samples]),
        torch.stack([s["texture_valid"] for s in samples]),
        torch.stack([s["expression_map"] for s in samples]),
    )


# ---------------------------------------------------------------------------------------------- plan
def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer of ``size`` items emits inputs ``0 .. n-1``.

    Fill the buffer, then for each new input emit a random buffered item and put the input in its
    place; finally emit the rest in random order. ``size <= 1`` keeps the input order.
    """
    if size <= 1 or n <= 1:
        return np.arange(n)
    draws = rng.integers(0, size, n)
    buffer: list[int] = []
    out: list[int] = []
    for item in range(n):
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(draws[item])
        out.append(buffer[j])
        buffer[j] = item
    rest = np.array(buffer, dtype=np.int64)
    rng.shuffle(rest)
    return np.concatenate([np.array(out, dtype=np.int64), rest])


@dataclass(frozen=True)
class _EpochPlan:
    """What one consumer emits in one epoch: its batches (row numbers) and the shards to read, in order."""

    batches: list[np.ndarray]  # per local batch index, rows of ``faces`` in emission order
    steps: list[int]  # the rank-local step of each batch (training) / -1 (validation)
    shard_order: np.ndarray


class FaceShardStream(IterableDataset):
    """Per-face training samples streamed from the zipped shards of the four stages.

    Args:
        shard_paths: per shard number, the ``(aligned, masks, coefficients, uv_maps)`` tar paths
            (:func:`shard_path_tuples`).
        faces: the faces to stream: rows ``face_id, shard, position`` (e.g. the trainable rows of
            :func:`trainable_faces` restricted to one split; see :meth:`from_stages`).
        batch_size: the per-rank batch ``b`` (global batch / world size).
        seed: seeds the shard order and the shuffle buffer of every epoch.
        shuffle_buffer: faces in the shuffle buffer (0 or 1: shard order only).
        infinite: training stream (endless epochs, equal batch counts per rank, remainders dropped)
            or validation stream (each face once, no shuffle).
        rank, world_size: this process in the data-parallel group.
        start_step: first rank-local step to yield (exact resume: the batches consumed so far).
        split: ``"auto"``, ``"sample"`` or ``"shard"`` (module docstring).
        min_shards_per_consumer: ``"auto"`` picks ``"shard"`` when every (rank, worker) gets at
            least this many shards.
    """

    def __init__(
        self,
        shard_paths: Sequence[Sequence[str | os.PathLike]],
        faces: pd.DataFrame,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 0,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        split: str = "auto",
        min_shards_per_consumer: int = 2,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise StreamError(f"batch_size must be >= 1, got {batch_size}")
        if split not in SPLITS:
            raise StreamError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} is not in a world of {world_size}")
        if len(faces) == 0:
            raise StreamError("no faces to stream (empty split)")
        self.shard_paths = [tuple(str(p) for p in paths) for paths in shard_paths]
        frame = faces[["face_id", "shard", "position"]].sort_values(["shard", "position"]).reset_index(drop=True)
        if frame["shard"].max() >= len(self.shard_paths):
            raise StreamError(f"faces refer to shard {frame['shard'].max()} but only {len(self.shard_paths)} shard paths were given")
        self.face_ids = frame["face_id"].astype(str).tolist()
        self.shard_of = frame["shard"].to_numpy(np.int64)
        self.position_of = frame["position"].to_numpy(np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.infinite = bool(infinite)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_step = int(start_step)
        self.split = split
        self.min_shards_per_consumer = int(min_shards_per_consumer)
        self.nonempty_shards = np.unique(self.shard_of)
        self._rows_of_shard = {int(s): np.flatnonzero(self.shard_of == s) for s in self.nonempty_shards}
        self.peak_held = 0  #: most decoded faces this consumer held at once (in this process; for tests/diagnostics)

    @classmethod
    def from_stages(
        cls, aligned_faces: FaceShards, face_masks: FaceShards, face_coefficients: FaceShards, uv_maps: FaceShards,
        face_ids: Sequence[str], batch_size: int, **kwargs: Any,
    ) -> "FaceShardStream":
        """A stream over the trainable faces among ``face_ids`` of the four stage datasets."""
        table = trainable_faces(aligned_faces, face_masks, face_coefficients, uv_maps)
        wanted = set(map(str, face_ids))
        rows = table[table["trainable"] & table["face_id"].isin(wanted)]
        return cls(shard_path_tuples(aligned_faces, face_masks, face_coefficients, uv_maps), rows, batch_size, **kwargs)

    def __len__(self) -> int:  # the number of faces of the split (not of samples per epoch)
        return len(self.face_ids)

    def at_step(self, start_step: int) -> "FaceShardStream":
        """The same stream opened at rank-local step ``start_step``."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.start_step = int(start_step)
        return clone

    # ------------------------------------------------------------------ planning (index only)
    def split_mode(self, num_workers: int) -> str:
        """``"sample"`` or ``"shard"`` for ``num_workers`` DataLoader workers per rank."""
        if self.split != "auto":
            return self.split
        consumers = self.world_size * max(1, num_workers)
        if len(self.nonempty_shards) < consumers * self.min_shards_per_consumer:
            return "sample"
        # the worst case consumer (the fewest shards, the smallest ones) must still fill one batch
        counts = np.sort([len(rows) for rows in self._rows_of_shard.values()])
        return "shard" if counts[: len(counts) // consumers].sum() >= self.batch_size else "sample"

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _rows_in(self, shards: np.ndarray) -> np.ndarray:
        return np.concatenate([self._rows_of_shard[int(s)] for s in shards]) if len(shards) else np.zeros(0, np.int64)

    def _shard_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch, 0).permutation(self.nonempty_shards) if self.infinite else self.nonempty_shards

    def _epoch_length(self, epoch: int, mode: str, workers: int) -> int:
        """Rank-local steps (batches) of training epoch ``epoch`` (the same on every rank)."""
        if mode == "sample":
            return max(1, len(self.face_ids) // (self.batch_size * self.world_size))
        order, consumers = self._shard_order(epoch), self.world_size * workers
        counts = [sum(len(self._rows_of_shard[int(s)]) for s in order[c::consumers]) for c in range(consumers)]
        return max(1, min(counts) // self.batch_size) * workers

    def _wrap(self, rows: np.ndarray, total: int) -> np.ndarray:
        return np.resize(rows, total) if len(rows) < total else rows[:total]

    def _train_plan(self, epoch: int, mode: str, workers: int, virtual: int, first_step: int, epoch_start: int) -> _EpochPlan:
        """Batches of consumer (rank, ``virtual``) for rank steps ``>= first_step`` of ``epoch``."""
        length = self._epoch_length(epoch, mode, workers)
        order = self._shard_order(epoch)
        b, batches, steps = self.batch_size, [], []
        if mode == "sample":
            rows = self._rows_in(order)
            rows = rows[shuffle_buffer_order(len(rows), self.shuffle_buffer, self._rng(epoch, 1))]
            global_batch = b * self.world_size
            rows = self._wrap(rows, length * global_batch)
            for k in range(length):
                step = epoch_start + k
                if step >= first_step and step % workers == virtual:
                    lo = k * global_batch + self.rank * b
                    batches.append(rows[lo : lo + b])
                    steps.append(step)
            return _EpochPlan(batches, steps, order)
        consumer = self.rank * workers + virtual
        mine = order[consumer :: self.world_size * workers]
        rows = self._rows_in(mine)
        rows = rows[shuffle_buffer_order(len(rows), self.shuffle_buffer, self._rng(epoch, 2, consumer))]
        per_consumer = length // workers
        rows = self._wrap(rows, per_consumer * b)
        for m in range(per_consumer):
            step = epoch_start + m * workers + virtual
            if step >= first_step:
                batches.append(rows[m * b : (m + 1) * b])
                steps.append(step)
        return _EpochPlan(batches, steps, mine)

    def _validation_plan(self, mode: str, workers: int, worker: int) -> _EpochPlan:
        consumers, consumer = self.world_size * workers, self.rank * workers + worker
        b = self.batch_size
        if mode == "shard":
            mine = self.nonempty_shards[consumer::consumers]
            rows = self._rows_in(mine)
            return _EpochPlan([rows[i : i + b] for i in range(0, len(rows), b)], [-1] * ((len(rows) + b - 1) // b), mine)
        rows = self._rows_in(self.nonempty_shards)
        blocks = [rows[i : i + b] for i in range(0, len(rows), b)][consumer::consumers]
        return _EpochPlan(blocks, [-1] * len(blocks), self.nonempty_shards)

    def plans(self, worker: int = 0, num_workers: int = 0) -> Iterator[_EpochPlan]:
        """The epoch plans of DataLoader worker ``worker`` of ``num_workers`` (0: the main process) on this rank."""
        workers = max(1, int(num_workers))
        mode = self.split_mode(num_workers)
        if not self.infinite:
            yield self._validation_plan(mode, workers, worker)
            return
        virtual = (self.start_step + worker) % workers  # worker w serves steps start+w, start+w+W, ... (DataLoader round-robin)
        epoch, epoch_start = 0, 0
        while True:
            length = self._epoch_length(epoch, mode, workers)
            if epoch_start + length > self.start_step:
                yield self._train_plan(epoch, mode, workers, virtual, self.start_step, epoch_start)
            epoch, epoch_start = epoch + 1, epoch_start + length

    # ------------------------------------------------------------------ reading
    def iter_consumer(self, worker: int = 0, num_workers: int = 0) -> Iterator[dict[str, Any]]:
        """The samples of one (rank, worker) consumer, batch after batch (see :meth:`plans`)."""
        for plan in self.plans(worker, num_workers):
            yield from self._emit(plan)

    def _emit(self, plan: _EpochPlan) -> Iterator[dict[str, Any]]:
        uses: dict[int, int] = {}
        for rows in plan.batches:
            for row in rows.tolist():
                uses[row] = uses.get(row, 0) + 1
        if not uses:
            return
        needed_shards = {int(self.shard_of[r]) for r in uses}
        held: dict[int, dict[str, Any]] = {}
        next_batch = 0
        for shard in plan.shard_order.tolist():
            if shard not in needed_shards:
                continue  # resume: shards of already-consumed batches are never opened
            wanted = {int(self.position_of[r]): r for r in self._rows_of_shard[shard].tolist() if r in uses}
            for position, face_id, records in iter_zipped_shard(self.shard_paths[shard]):
                row = wanted.get(position)
                if row is None:
                    continue
                if face_id != self.face_ids[row]:
                    raise ShardError(f"shard {shard} position {position} holds '{face_id}', the index says '{self.face_ids[row]}'")
                if any(r.get("status", "ok") != "ok" for r in records):
                    raise ShardError(f"face '{face_id}' is indexed as trainable but a stage record has status != 'ok'")
                held[row] = face_sample(records)
                self.peak_held = max(self.peak_held, len(held))
                while next_batch < len(plan.batches) and all(r in held for r in plan.batches[next_batch].tolist()):
                    for r in plan.batches[next_batch].tolist():
                        yield held[r]
                        uses[r] -= 1
                        if uses[r] == 0:
                            del held[r]
                    next_batch += 1
        if next_batch != len(plan.batches):
            raise ShardError(f"{len(plan.batches) - next_batch} planned batches could not be assembled (faces missing from the shards)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 0) if info is None else (info.id, info.num_workers)
        return self.iter_consumer(worker, workers)


def batch_loader(stream: FaceShardStream, num_workers: int = 0, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader of :class:`FaceTensors` batches (``stream.batch_size`` faces) over ``stream``.

    ``num_workers`` processes each stream their own shards; at most ``prefetch_factor`` batches
    per worker wait in the queue (bounded prefetch). ``num_workers=0`` reads in this process.
    """
    workers = int(num_workers)
    return DataLoader(
        stream, batch_size=stream.batch_size, collate_fn=collate_faces, num_workers=workers,
        prefetch_factor=int(prefetch_factor) if workers > 0 else None, drop_last=False,
    )


@dataclass
class ShardBatches:
    """A training or validation batch source over a :class:`FaceShardStream` (what ``DetailTrainer.fit`` takes).

    ``face_ids`` are all faces of the split (every rank sees the same list; used in the run key);
    ``batches(start_step)`` yields this rank's :class:`FaceTensors` batches from rank-local step
    ``start_step`` on (training: endlessly; validation: once through this rank's share).
    """

    stream: FaceShardStream
    num_workers: int = 0
    prefetch_factor: int = 2

    @property
    def face_ids(self) -> list[str]:
        return self.stream.face_ids

    @property
    def batch_size(self) -> int:
        return self.stream.batch_size

    def __len__(self) -> int:
        return len(self.stream)

    def batches(self, start_step: int = 0) -> Iterator[FaceTensors]:
        return iter(batch_loader(self.stream.at_step(start_step), self.num_workers, self.prefetch_factor))


@dataclass
class InMemoryBatches:
    """The same batch-source interface over faces already in memory (small sets, tests).

    Same schedule as the ``"sample"`` split: per epoch a seeded permutation, ``max(1, N // B)``
    global batches (remainder dropped; a set smaller than a batch wraps), rank ``r`` takes slice
    ``r`` of each global batch; ``infinite=False`` yields each face once (rank share by blocks).
    """

    faces: FaceTensors
    batch_size: int  # per rank
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    infinite: bool = True

    @property
    def face_ids(self) -> list[str]:
        return self.faces.face_ids

    def __len__(self) -> int:
        return len(self.faces)

    def batches(self, start_step: int = 0) -> Iterator[FaceTensors]:
        n, b = len(self.faces), self.batch_size
        if not self.infinite:
            blocks = list(torch.arange(n).split(b))[self.rank :: self.world_size]
            return (self.faces.subset(index) for index in blocks)
        return self._train(start_step)

    def _train(self, start_step: int) -> Iterator[FaceTensors]:
        n, b, global_batch = len(self.faces), self.batch_size, self.batch_size * self.world_size
        length = max(1, n // global_batch)
        epoch, k = divmod(int(start_step), length)
        while True:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n)
            order = np.resize(order, length * global_batch) if n < global_batch else order
            for k in range(k, length):
                lo = k * global_batch + self.rank * b
                yield self.faces.subset(order[lo : lo + b])
            epoch, k = epoch + 1, 0


def face_tensors_from_shards(
    aligned_faces: FaceShards, face_masks: FaceShards, face_coefficients: FaceShards, uv_maps: FaceShards, face_ids: Sequence[str] | None = None
) -> FaceTensors:
    """The trainable faces (optionally only ``face_ids``) of the four stages as one compact in-memory ``FaceTensors``.

    For small sets only (evaluation of a few faces, tests): it holds every face. Replaces the
    npz-bundle join ``assemble_face_tensors``.
    """
    table = trainable_faces(aligned_faces, face_masks, face_coefficients, uv_maps)
    rows = table[table["trainable"]] if face_ids is None else table[table["trainable"] & table["face_id"].isin(set(map(str, face_ids)))]
    if rows.empty:
        raise StreamError("no trainable faces in these shards")
    stream = FaceShardStream(shard_path_tuples(aligned_faces, face_masks, face_coefficients, uv_maps), rows, len(rows), infinite=False, split="sample")
    return collate_faces(list(stream.iter_consumer()))


def write_stage_shards(
    faces: FaceTensors, folder: str | os.PathLike, faces_per_shard: int, failed: dict[str, set[str]] | None = None,
    face_sha256: Sequence[str] | None = None,
) -> dict[str, FaceShards]:
    """Write in-memory faces as the four stage datasets (``folder/<stage>/shard-*.tar``); returns them by stage name.

    The inverse of :func:`face_tensors_from_shards`, for tests and benchmarks: images/textures are
    quantised to uint8, masks/validity to bool, expression maps to float16 (the stages' dtypes).
    ``failed[stage]`` names faces recorded as failed in that stage (status ``"failed"``, no arrays).
    """
    failed = failed or {}
    compact = {
        "image": (faces.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1) if faces.images.dtype != torch.uint8 else faces.images.permute(0, 2, 3, 1),
        "uv_texture": (faces.uv_textures.float().clamp(0, 1) * 255).round().to(torch.uint8) if faces.uv_textures.dtype != torch.uint8 else faces.uv_textures,
    }
    out = {}
    for stage in STAGES:
        shards, digests, rows = [], [], []
        for number, lo in enumerate(range(0, len(faces), faces_per_shard)):
            records = []
            for i in range(lo, min(lo + faces_per_shard, len(faces))):
                face_id = faces.face_ids[i]
                record: dict[str, Any] = {"face_id": face_id, "status": "ok"}
                if stage == "aligned_faces":
                    record["face_sha256"] = face_sha256[i] if face_sha256 is not None else f"sha-{face_id}"
                if face_id in failed.get(stage, set()):
                    record.update(status="failed", reason="synthetic failure")
                elif stage == "aligned_faces":
                    record["image"] = compact["image"][i].numpy()
                elif stage == "face_masks":
                    record["mask"] = faces.masks[i, 0].bool().numpy()
                elif stage == "face_coefficients":
                    record["coefficients"] = faces.coefficients[i].float().numpy()
                else:
                    record.update(expression_map=faces.expression_maps[i].half().numpy(), uv_texture=compact["uv_texture"][i].numpy(),
                                  texture_valid=faces.texture_valid[i].bool().numpy())
                records.append(record)
            path = Path(folder) / stage / shard_name(number)
            digests.append(write_shard(path, records))
            shards.append(path)
            rows += index_rows(number, records)
        out[stage] = FaceShards(shards, index_frame(rows), digests, {})
    return out


__all__ = [
    "STAGES", "StreamError", "trainable_faces", "split_faces", "shard_path_tuples", "face_sample", "iter_zipped_shard",
    "collate_faces", "shuffle_buffer_order", "FaceShardStream", "batch_loader", "ShardBatches", "InMemoryBatches",
    "face_tensors_from_shards", "write_stage_shards",
]
