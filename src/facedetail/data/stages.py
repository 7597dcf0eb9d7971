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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from facedetail.data.shards import (
    INDEX_COLUMNS,
    FaceShards,
    ShardError,
    concat_parquet,
    file_sha256,
    index_frame,
    index_rows,
    shard_face_ids,
    table_bytes,
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
    index_path: str = ""                 # or: the first input's index file, read for them only then


@dataclass
class ShardOutput:
    """What one task produced, as files: its shard, the shard's index rows and report rows (parquet parts).

    Only this per-shard bookkeeping travels back to the process that drives the stages; the
    per-face rows stay on disk until :func:`run_stage` streams the parts into one table.
    """

    number: int
    path: str
    sha256: str
    faces: int
    index_path: str
    report_path: str = ""      # "" when the task wrote no report rows
    skipped: bool = False


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


def _part_paths(path: Path) -> tuple[Path, Path]:
    """The per-shard index and report parquet parts beside a task's shard file."""
    return path.with_suffix(".index.parquet"), path.with_suffix(".report.parquet")


def _write_parts(path: Path, rows: list[dict[str, Any]], report: list[dict[str, Any]]) -> tuple[str, str]:
    """Write one shard's index rows and report rows as parquet parts (atomically); their paths ("" for no report)."""
    index_path, report_path = _part_paths(path)
    atomic_write_bytes(index_path, table_bytes(index_frame(rows)))
    if not report:
        report_path.unlink(missing_ok=True)
        return str(index_path), ""
    atomic_write_bytes(report_path, table_bytes(pd.DataFrame(report)))
    return str(index_path), str(report_path)


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
            index_path, report_path = _part_paths(path)
            if "rows" in record:  # a record of the first format (rows inline): move its rows to parts
                index_part, report_part = _write_parts(path, record["rows"], record.get("report", []))
                record = {"sha256": record["sha256"], "faces": len(record["rows"]), "report": bool(report_part)}
                atomic_write_bytes(record_path, json.dumps(record).encode())
            if index_path.is_file() and (report_path.is_file() or not record.get("report")):
                return ShardOutput(shard.number, str(path), record["sha256"], int(record["faces"]), str(index_path),
                                   str(report_path) if record.get("report") else "", skipped=True)
            logger.warning("%s: shard %d has no index part beside %s; recomputing", stage.name, shard.number, path)
            return None
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
        if not shard.face_ids and shard.index_path:
            try:
                shard = replace(shard, face_ids=tuple(shard_face_ids(shard.index_path, shard.number)))
            except Exception as lookup:  # noqa: BLE001 - the failure is still recorded (without face rows)
                logger.error("%s shard %d: cannot read its face ids from %s: %s", stage.name, shard.number, shard.index_path, lookup)
        records, report = stage.failed(shard, reason)
        failed = True
    sha = write_shard(path, records)
    index_part, report_part = _write_parts(path, index_rows(shard.number, records, stage.index_columns), report)
    faces = len(records)
    del records, report
    if not failed:  # a failed task is not finished: the next run computes it again (the failure may be transient)
        atomic_write_bytes(record_path, json.dumps({"sha256": sha, "faces": faces, "report": bool(report_part)}).encode())
    return ShardOutput(shard.number, str(path), sha, faces, index_part, report_part)


def shard_inputs(datasets: Sequence[FaceShards]) -> list[ShardInput]:
    """One :class:`ShardInput` per shard number, zipping the k-th shards of ``datasets``."""
    if not datasets:
        raise ValueError("a stage needs at least one input dataset")
    counts = {d.num_shards for d in datasets}
    if len(counts) != 1:
        raise ShardError(f"input datasets have different shard counts {sorted(counts)}: rerun the upstream stages")
    first = datasets[0]
    if first.index_path is not None:  # the face ids are read from the index file by a task that fails, only then
        by_shard: dict[int, list[str]] = {}
    else:
        by_shard = first.index.groupby("shard")["face_id"].apply(list).to_dict() if len(first.index) else {}
    return [
        ShardInput(
            number=k,
            paths=tuple(str(d.shards[k]) for d in datasets),
            sha256=tuple(d.shard_sha256[k] if d.shard_sha256 else file_sha256(d.shards[k]) for d in datasets),
            face_ids=tuple(by_shard.get(k, [])),
            index_path=str(first.index_path) if first.index_path is not None else "",
        )
        for k in range(first.num_shards)
    ]


@dataclass
class StageReport:
    """A stage's report rows (e.g. the data_prep manifest rows), as one parquet file; None when there are none."""

    path: Path | None
    rows: int = 0

    def __len__(self) -> int:
        return self.rows

    def frame(self) -> pd.DataFrame:
        """The whole report as a DataFrame (read on demand: the stage runner never holds it)."""
        return pd.read_parquet(self.path) if self.path is not None else pd.DataFrame()


def run_stage(
    stage: ShardStage,
    shards: Sequence[ShardInput],
    work_dir: str | os.PathLike,
    executor: Callable[[int], "Executor"],
    meta: Mapping[str, Any] | None = None,
) -> tuple[FaceShards, StageReport]:
    """Run ``stage`` over every shard; returns its dataset handle and its report.

    Shards whose task already finished (same inputs, same settings) are reused; the rest go to
    ``executor(number of shards to compute)``, which picks where they run. Progress (shards and
    faces done) is shown as tasks finish, in whatever order.

    Memory: this process keeps per-shard bookkeeping only (:class:`ShardOutput`: paths, hash,
    count). The tasks write each shard's index and report rows as parquet parts; the stage's index
    and report are those parts appended, one shard at a time, into one parquet file each (one row
    group per shard), so the driver's memory does not grow with the number of faces.
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
    del outputs
    key = settings_hash({"stage": stage.key, "shards": [o.sha256 for o in ordered]})
    folder = Path(work_dir) / stage.name
    index_path = folder / f"index-{key}.parquet"
    faces = concat_parquet([o.index_path for o in ordered], index_path, INDEX_COLUMNS)
    report_parts = [o.report_path for o in ordered if o.report_path]
    report = StageReport(None, 0)
    if report_parts:
        report_path = folder / f"report-{key}.parquet"
        report = StageReport(report_path, concat_parquet(report_parts, report_path))
    skipped = sum(o.skipped for o in ordered)
    seconds = time.perf_counter() - tic
    computed_faces = sum(o.faces for o in ordered if not o.skipped)
    logger.info("%s: %d shard(s), %d face(s), %d shard(s) reused, %.1f s (%.2f faces/s computed)", stage.name, len(ordered),
                faces, skipped, seconds, computed_faces / max(seconds, 1e-9))
    timing = {"seconds": round(seconds, 3), "faces_computed": computed_faces, "faces_per_second": round(computed_faces / max(seconds, 1e-9), 3)}
    data = FaceShards([Path(o.path) for o in ordered], None, [o.sha256 for o in ordered],
                      {"stage": stage.name, "settings_key": stage.key, "shards_reused": skipped, **timing, **dict(meta or {})},
                      index_path=index_path, faces=faces)
    return data, report


class Executor:
    """Runs shard tasks; see :mod:`facedetail.data.execution` for the Dask and in-process ones."""

    def map_shards(self, stage: ShardStage, shards: list[ShardInput], work_dir: str) -> Iterable[ShardOutput]:
        raise NotImplementedError


ProgressFactory = Callable[..., Any]
