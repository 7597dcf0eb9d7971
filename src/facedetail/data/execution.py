"""Where shard tasks run: a Dask cluster (local or remote) or the calling process.

Settings (``parameters.yml`` -> ``execution``)::

    execution:
      scheduler: ${env:FACEDETAIL_DASK_SCHEDULER,local}   # local | synchronous | tcp://host:8786
      n_workers: null            # local cluster: null = one per CPU core
      threads_per_worker: 1      # torch threads per worker (the workers are processes)
      retries: 2                 # a task whose worker died is retried this often by Dask

``local`` starts a :class:`distributed.LocalCluster` sized to the machine on first use and stops
it after the run's last per-face stage (:func:`close_executors`, called by the project's Kedro
hook), so training does not share the machine's memory with idle workers; an address
connects to an existing cluster whose workers have ``facedetail`` installed; ``synchronous`` runs
every task in the calling process (tests, debugging, one-shard runs).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from facedetail.data.stages import Executor, ShardInput, ShardOutput, ShardStage, run_shard_task

logger = logging.getLogger(__name__)

_EXECUTORS: dict[tuple, Executor] = {}


class ExecutionError(RuntimeError):
    """The configured cluster cannot be used (unreachable scheduler, bad setting)."""


def _progress(stage: ShardStage, shards: list[ShardInput]) -> Any:
    return tqdm(total=len(shards), desc=f"{stage.name} shards", unit="shard", dynamic_ncols=True)


class SynchronousExecutor(Executor):
    """Every task in the calling process, one after the other."""

    def map_shards(self, stage: ShardStage, shards: list[ShardInput], work_dir: str) -> Iterable[ShardOutput]:
        faces = 0
        with _progress(stage, shards) as bar:
            for shard in shards:
                output = run_shard_task(stage, shard, work_dir)
                faces += output.faces
                bar.set_postfix(faces=faces, reused=output.skipped)
                bar.update()
                yield output

    def close(self) -> None:
        from facedetail.data.stages import clear_stage_state

        clear_stage_state()


class DaskExecutor(Executor):
    """Tasks on a Dask distributed cluster (one task per shard, retried when a worker dies)."""

    def __init__(self, client: Any, cluster: Any = None, retries: int = 2) -> None:
        self.client, self.cluster, self.retries = client, cluster, int(retries)

    def map_shards(self, stage: ShardStage, shards: list[ShardInput], work_dir: str) -> Iterable[ShardOutput]:
        from distributed import as_completed

        if not shards:
            return

        stage_future = self.client.scatter(stage, broadcast=True)
        # Each result is a ShardOutput (paths, hash, count: no per-face rows); a future is released as soon as
        # its result is here, so neither this process nor the workers keep results of finished tasks.
        pending = as_completed([
            self.client.submit(run_shard_task, stage_future, shard, work_dir, retries=self.retries, pure=False,
                               key=f"{stage.name}-{shard.number:05d}-{os.urandom(4).hex()}")
            for shard in shards
        ])
        faces = 0
        try:
            with _progress(stage, shards) as bar:
                for future in pending:
                    output = future.result()
                    future.release()
                    del future
                    faces += output.faces
                    bar.set_postfix(faces=faces, reused=output.skipped)
                    bar.update()
                    yield output
        finally:
            pending.clear()
            stage_future.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(settings: Mapping[str, Any]) -> Executor:
    """A new executor from the ``execution`` settings (see the module docstring)."""
    scheduler = str(settings.get("scheduler", "local") or "local").strip()
    retries = int(settings.get("retries", 2))
    if scheduler == "synchronous":
        return SynchronousExecutor()
    from distributed import Client, LocalCluster

    if scheduler == "local":
        n_workers = settings.get("n_workers") or os.cpu_count() or 1
        threads = int(settings.get("threads_per_worker", 1))
        # Each worker process: `threads` torch/OpenMP threads, passive waits (set before torch starts there).
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=threads, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR, env=env)
        logger.info("started a local Dask cluster: %d worker process(es) x %d thread(s)", n_workers, threads)
        return DaskExecutor(Client(cluster), cluster, retries)
    try:
        client = Client(scheduler, timeout=float(settings.get("connect_timeout", 10)))
    except (OSError, TimeoutError) as error:
        raise ExecutionError(
            f"cannot reach the Dask scheduler '{scheduler}' (execution.scheduler / FACEDETAIL_DASK_SCHEDULER): {error}"
        ) from None
    logger.info("connected to the Dask scheduler %s", scheduler)
    return DaskExecutor(client, None, retries)


def worker_count(settings: Mapping[str, Any]) -> int:
    """How many shard tasks run at once under these settings: 1 (synchronous), the local cluster's workers
    (``n_workers``, default one per CPU core) or the connected cluster's worker threads."""
    scheduler = str(settings.get("scheduler", "local") or "local").strip()
    if scheduler == "synchronous":
        return 1
    if scheduler == "local":
        return max(1, int(settings.get("n_workers") or os.cpu_count() or 1))
    executor = get_executor(settings)
    return max(1, sum(executor.client.nthreads().values()))


def get_executor(settings: Mapping[str, Any]) -> Executor:
    """The run's executor for these settings, created on first use and shared by every stage."""
    key = tuple(sorted((k, str(v)) for k, v in dict(settings).items()))
    if key not in _EXECUTORS:
        _EXECUTORS[key] = make_executor(settings)
    return _EXECUTORS[key]


def close_executors() -> None:
    """Stop the clusters this process started and drop loaded models (end of a Kedro run)."""
    while _EXECUTORS:
        _, executor = _EXECUTORS.popitem()
        try:
            executor.close()
        except Exception as error:  # noqa: BLE001 - shutting down is best effort
            logger.warning("closing executor: %s", error)


def run_face_stage(stage: ShardStage, shards: list[ShardInput], settings: Mapping[str, Any], meta: Mapping[str, Any] | None = None):
    """Run a shard stage with the run's executor (see :func:`get_executor`); ``(FaceShards, report rows)``."""
    from facedetail.data.stages import run_stage

    def executor(todo: int) -> Executor:
        return get_executor(settings)

    return run_stage(stage, shards, settings.get("work_dir", "data/02_intermediate/shard_work"), executor, meta)

