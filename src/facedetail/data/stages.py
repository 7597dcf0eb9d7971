"""The shard-by-shard stage runner: every per-face stage runs as one task per shard.

A :class:`ShardStage` turns shard ``k`` of its inputs into shard ``k`` of its output. The runner
(:func:`run_stage`) sends one task per shard to an executor (a Dask cluster, see
:mod:`facedetail.data.execution`, or the calling process), and each task

* is idempotent: its result is stored under a key made of the stage name, the stage's settings
  and the sha256 of its input shards, in the work folder; a task whose result exists (and whose
  shard still matches its recorded hash) is skipped, so a killed run resumes shard by shard;
* loads its models once per worker process (:func:`stage_state`), not once per shard;
* never fails the run for bad data: an exception (other than a
  :class:`~facedetail.utils.SettingError`: wrong weights, model file or device) becomes a failed status for every face of the shard, with
  the reason, and the other shards go on.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from facedetail.data.shards import (
    FaceShards,
    ShardError,
    file_sha256,
    index_frame,
    index_rows,
    write_shard,
)
from facedetail.utils import SettingError, atomic_write_bytes, settings_hash

logger = logging.getLogger(__name__)

#: Models and other per-process state of stages, keyed by (stage name, settings key).
_STATE: dict[tuple[str, str], Any] = {}


@dataclass
class ShardInput:
    """What one task reads: the k-th shard file of each input dataset (or the raw items of data_prep)."""

    number: int
    paths: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    items: tuple[Any, ...] = ()          # raw inputs (e.g. image paths) for the first stage
    face_ids: tuple[str, ...] = ()       # faces of the shard (to record them as failed if the task dies)


@dataclass
class ShardOutput:
    """What one task produced: its shard file, hash, index rows and extra report rows."""

    number: int
    path: str
    sha256: str
    rows: list[dict[str, Any]]
    report: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False

    @property
    def faces(self) -> int:
        return len(self.rows)


class ShardStage:
    """One per-face stage. Subclasses set ``name``, ``index_columns`` and implement ``setup``/``process``.

    Instances are pickled to the workers, so they carry settings only (plain dicts), never models.
    """

    name: str = "stage"
    #: Scalar per-face fields copied into the index next to the standard columns.
    index_columns: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """Everything that changes this stage's output (part of every task key)."""
        return {}

    def setup(self) -> Any:
        """Load models; called once per worker process (see :func:`stage_state`)."""
        return None

    def process(self, state: Any, shard: ShardInput, inputs: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Turn the input shards' records into ``(output records, report rows)``."""
        raise NotImplementedError

    def failed(self, shard: ShardInput, reason: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Records for a shard whose task raised: every face keeps its place, status ``error``."""
        return [{"face_id": f, "status": "error", "reason": reason} for f in shard.face_ids], []

    @property
    def key(self) -> str:
        from facedetail import __version__

        # the package version is part of the key: an upgrade that changes a stage's code recomputes its shards
        return settings_hash({"stage": self.name, "settings": self.settings(), "facedetail": __version__})


def stage_state(stage: ShardStage) -> Any:
    """The stage's loaded models in this process, set up on first use.

    A process holds the models of one stage at a time: the stages run one after the other, so a
    worker's memory is one stage's models plus one shard, whatever the number of faces.
    """
    key = (stage.name, stage.key)
    if key not in _STATE:
        clear_stage_state()
        _STATE[key] = stage.setup()
    return _STATE[key]


def clear_stage_state() -> None:
    """Drop every loaded model of this process (closes those that have ``close``)."""
    for state in _STATE.values():
        for item in state.values() if isinstance(state, dict) else [state]:
            if hasattr(item, "close"):
                try:
                    item.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
    _STATE.clear()
    import gc

    gc.collect()


def task_key(stage: ShardStage, shard: ShardInput) -> str:
    """Key of one task: stage, settings, input content (shard hashes or raw item fingerprints)."""
    return settings_hash({"stage": stage.key, "inputs": list(shard.sha256), "items": [str(i) for i in shard.items]})


def _task_paths(stage: ShardStage, shard: ShardInput, work_dir: str) -> tuple[Path, Path]:
    folder = Path(work_dir) / stage.name
    key = task_key(stage, shard)
    return folder / f"{key}.tar", folder / f"{key}.json"


def finished_task(stage: ShardStage, shard: ShardInput, work_dir: str) -> ShardOutput | None:
    """The stored result of this task when it exists and its shard matches its recorded hash, else None.

    A shard that fails its hash (corrupt, truncated, replaced) is reported and recomputed.
    """
    path, record_path = _task_paths(stage, shard, work_dir)
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
        if file_sha256(path) == record["sha256"]:
            return ShardOutput(shard.number, str(path), record["sha256"], record["rows"], record.get("report", []), skipped=True)
        logger.warning("%s: shard %d in %s does not match its hash; recomputing", stage.name, shard.number, path)
    except (OSError, ValueError, KeyError):
        logger.warning("%s: unreadable task record %s; recomputing", stage.name, record_path)
    return None


def run_shard_task(stage: ShardStage, shard: ShardInput, work_dir: str) -> ShardOutput:
    """Run (or reuse) one shard of a stage. Safe to run on any worker; never raises for bad data."""
    done = finished_task(stage, shard, work_dir)
    if done is not None:
        return done
    path, record_path = _task_paths(stage, shard, work_dir)
    failed = False
    try:
        from facedetail.data.shards import read_shard

        inputs = [read_shard(p) for p in shard.paths]
        records, report = stage.process(stage_state(stage), shard, inputs)
    except SettingError:
        raise  # a wrong setting or model file (the same for every shard) stops the run with its one-line message
    except Exception as error:  # noqa: BLE001 - one shard's failure is recorded, the run goes on
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk is not the shard's fault: stop, record nothing, so a rerun computes it
        reason = f"{stage.name} task failed: {type(error).__name__}: {error}"
        logger.error("%s shard %d: %s\n%s", stage.name, shard.number, reason, traceback.format_exc(limit=3))
        records, report = stage.failed(shard, reason)
        failed = True
    sha = write_shard(path, records)
    rows = index_rows(shard.number, records, stage.index_columns)
    if not failed:  # a failed task is not finished: the next run computes it again (the failure may be transient)
        atomic_write_bytes(record_path, json.dumps({"sha256": sha, "rows": rows, "report": report}, default=_json_default).encode())
    return ShardOutput(shard.number, str(path), sha, rows, report)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def shard_inputs(datasets: Sequence[FaceShards]) -> list[ShardInput]:
    """One :class:`ShardInput` per shard number, zipping the k-th shards of ``datasets``."""
    if not datasets:
        raise ValueError("a stage needs at least one input dataset")
    counts = {d.num_shards for d in datasets}
    if len(counts) != 1:
        raise ShardError(f"input datasets have different shard counts {sorted(counts)}: rerun the upstream stages")
    first = datasets[0]
    by_shard = first.index.groupby("shard")["face_id"].apply(list).to_dict() if len(first.index) else {}
    return [
        ShardInput(
            number=k,
            paths=tuple(str(d.shards[k]) for d in datasets),
            sha256=tuple(d.shard_sha256[k] if d.shard_sha256 else file_sha256(d.shards[k]) for d in datasets),
            face_ids=tuple(by_shard.get(k, [])),
        )
        for k in range(first.num_shards)
    ]


def run_stage(
    stage: ShardStage,
    shards: Sequence[ShardInput],
    work_dir: str | os.PathLike,
    executor: Callable[[int], "Executor"],
    meta: Mapping[str, Any] | None = None,
) -> tuple[FaceShards, pd.DataFrame]:
    """Run ``stage`` over every shard; returns its dataset handle and its report rows.

    Shards whose task already finished (same inputs, same settings) are reused; the rest go to
    ``executor(number of shards to compute)``, which picks where they run. Progress (shards and
    faces done) is shown as tasks finish, in whatever order.
    """
    tic = time.perf_counter()
    outputs: dict[int, ShardOutput] = {}
    todo = []
    for shard in shards:  # finished shards are taken here, without a round trip to the workers
        done = finished_task(stage, shard, str(work_dir))
        if done is not None:
            outputs[shard.number] = done
        else:
            todo.append(shard)
    if todo:
        for output in executor(len(todo)).map_shards(stage, todo, str(work_dir)):
            outputs[output.number] = output
    ordered = [outputs[k] for k in sorted(outputs)]
    index = index_frame([row for o in ordered for row in o.rows])
    report = pd.DataFrame([row for o in ordered for row in o.report])
    skipped = sum(o.skipped for o in ordered)
    seconds = time.perf_counter() - tic
    computed_faces = sum(o.faces for o in ordered if not o.skipped)
    logger.info("%s: %d shard(s), %d face(s), %d shard(s) reused, %.1f s (%.2f faces/s computed)", stage.name, len(ordered),
                len(index), skipped, seconds, computed_faces / max(seconds, 1e-9))
    timing = {"seconds": round(seconds, 3), "faces_computed": computed_faces, "faces_per_second": round(computed_faces / max(seconds, 1e-9), 3)}
    data = FaceShards([Path(o.path) for o in ordered], index, [o.sha256 for o in ordered],
                      {"stage": stage.name, "settings_key": stage.key, "shards_reused": skipped, **timing, **dict(meta or {})})
    return data, report


class Executor:
    """Runs shard tasks; see :mod:`facedetail.data.execution` for the Dask and in-process ones."""

    def map_shards(self, stage: ShardStage, shards: list[ShardInput], work_dir: str) -> Iterable[ShardOutput]:
        raise NotImplementedError


ProgressFactory = Callable[..., Any]
