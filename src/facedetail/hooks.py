"""Kedro hooks of the project: dataset lineage in MLflow, and the run's Dask cluster lifecycle.

* :class:`DatasetLineageHooks` records every catalog dataset a run reads or writes as an MLflow
  dataset input of the active run (name, Kedro version, content digest, face count, role), so
  the MLflow UI shows which versions of which intermediates a run used and produced.
* :class:`ExecutionHooks` stops the Dask cluster (and drops the models loaded for in-process
  stages) when a run ends, successfully or not.
* :class:`RunTrackingHooks` names MLflow runs ``<pipeline>-<UTC timestamp>``, tags them with the git
  commit, dirty flag, PID and host (and the runner's class name instead of its repr), and marks
  ``KILLED`` the runs a dead process left ``RUNNING`` (``facedetail.tracking``).
* :class:`ValidateParametersHook` checks the run's parameters (``facedetail.config``) before any
  node runs.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import click
from kedro.framework.hooks import hook_impl

from facedetail.config import ParameterError, parameter_problems

logger = logging.getLogger(__name__)


def dataset_digest(data: Any) -> tuple[str, int | None] | None:
    """``(content digest, face count)`` of a catalog value worth tracking, else None.

    Sharded datasets hash their shard hashes (cheap: no shard is read); tables hash their rows.
    """
    from facedetail.data.shards import FaceShards

    if isinstance(data, FaceShards):
        digest = hashlib.sha256("".join(data.shard_sha256).encode()).hexdigest()[:16]
        return digest, int(len(data.ok()))
    try:
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            values = pd.util.hash_pandas_object(data.astype(str), index=False).values
            faces = int((data["status"] == "ok").sum()) if "status" in data.columns and "face_id" in data.columns else None
            return hashlib.sha256(values.tobytes()).hexdigest()[:16], faces
    except Exception:  # noqa: BLE001 - lineage is informative, never fatal
        return None
    if isinstance(data, dict) and "generator" in data:  # the detail checkpoint
        blob = repr(sorted((k, tuple(v.shape)) for k, v in data["generator"].items())) + str(data.get("step"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16], None
    return None


class DatasetLineageHooks:
    """Log each dataset a run loads or saves as an MLflow dataset input (``role`` tag: input/output)."""

    def __init__(self) -> None:
        self._catalog = None
        self._logged: set[tuple[str, str]] = set()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._catalog = catalog
        self._logged.clear()

    def _version(self, name: str, role: str) -> str:
        try:
            dataset = self._catalog.get(name) if self._catalog is not None else None
            if dataset is None or not hasattr(dataset, "resolve_load_version"):
                return ""
            version = dataset.resolve_save_version() if role == "output" else dataset.resolve_load_version()
            return str(version or "")
        except Exception:  # noqa: BLE001
            return ""

    def _log(self, name: str, data: Any, role: str) -> None:
        import mlflow

        if mlflow.active_run() is None or name.startswith("params:") or name == "parameters" or (name, role) in self._logged:
            return
        facts = dataset_digest(data)
        if facts is None:
            return
        digest, faces = facts
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            dataset = self._catalog.get(name) if self._catalog is not None else None
            uri = str(Path(str(getattr(dataset, "_filepath", name))).resolve())
            tags = {"role": role, "kedro.version": self._version(name, role), "kedro.dataset": name}
            if faces is not None:
                tags["faces"] = str(faces)
            with warnings.catch_warnings():  # mlflow probes every source kind (Delta, HF...) and warns
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(uri)
            mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=role, tags=tags)
            self._logged.add((name, role))
        except Exception as error:  # noqa: BLE001 - lineage must never fail a run
            logger.warning("could not log dataset %s to MLflow: %s", name, error)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        self._log(dataset_name, data, "input")

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        self._log(dataset_name, data, "output")


class ExecutionHooks:
    """Stop the run's Dask cluster after its last per-face stage (and in any case when the run ends)."""

    #: Tags of the nodes that run shard stages on the cluster.
    STAGE_TAGS = frozenset({"data_prep", "estimation", "uv_maps"})

    def __init__(self) -> None:
        self._pending: set[str] = set()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._pending = {node.name for node in pipeline.nodes if node.tags & self.STAGE_TAGS}

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        if node.name in self._pending:
            self._pending.discard(node.name)
            if not self._pending:
                from facedetail.data.execution import close_executors

                close_executors()

    @hook_impl
    def after_pipeline_run(self) -> None:
        from facedetail.data.execution import close_executors

        close_executors()

    @hook_impl
    def on_pipeline_error(self) -> None:
        from facedetail.data.execution import close_executors

        close_executors()


class RunTrackingHooks:
    """Readable, honest MLflow runs around kedro-mlflow's ``MlflowHook`` (see ``facedetail.tracking``).

    * ``after_context_created`` (``trylast``: after kedro-mlflow set the tracking URI and experiment up):
      runs of the experiment left ``RUNNING`` by a dead process of this host are marked ``KILLED``.
    * ``before_pipeline_run`` (``tryfirst``): kedro-mlflow's ``tracking.run.name``, when ``mlflow.yml``
      leaves it null, becomes ``<pipeline>-<UTC timestamp>``.
    * ``before_pipeline_run`` (``trylast``: the run has started): tags ``git.commit``, ``git.dirty``,
      ``facedetail.pid``, ``facedetail.host``; ``runner`` holds the runner's class name.
    """

    def __init__(self) -> None:
        self._context: Any = None

    @hook_impl(trylast=True)
    def after_context_created(self, context: Any) -> None:
        self._context = context
        try:
            import mlflow

            from facedetail.tracking import reap_stale_runs

            config = getattr(context, "mlflow", None)
            if config is None or mlflow.active_run() is not None:
                return
            experiment = mlflow.get_experiment_by_name(config.tracking.experiment.name)
            if experiment is not None:
                reap_stale_runs(mlflow.MlflowClient(), [experiment.experiment_id])
        except Exception as error:  # noqa: BLE001 - housekeeping must never stop a run
            logger.warning("could not check for runs left RUNNING: %s", error)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from facedetail.tracking import run_name

        config = getattr(self._context, "mlflow", None)
        if config is not None and config.tracking.run.id is None and not config.tracking.run.name:
            names = run_params.get("pipeline_names") or run_params.get("pipeline_name")
            config.tracking.run.name = run_name(names)

    @hook_impl(trylast=True, specname="before_pipeline_run")
    def tag_started_run(self, run_params: dict[str, Any]) -> None:
        import mlflow

        from facedetail.tracking import process_tags, runner_name

        if mlflow.active_run() is None:
            return
        tags = process_tags(run_params.get("project_path") or Path.cwd())
        if "runner" in run_params:
            tags["runner"] = runner_name(run_params["runner"])
        mlflow.set_tags(tags)


class InvalidParametersError(ParameterError, click.ClickException):
    """A :class:`~facedetail.config.ParameterError` that ``kedro run`` prints as one line (``Error: ...``), exit status 2."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        ParameterError.__init__(self, problems)
        click.ClickException.__init__(self, ParameterError.__str__(self))


class ValidateParametersHook:
    """Validate the run's merged parameters (``facedetail.config``) before any node runs.

    ``tryfirst``: runs before kedro-mlflow's ``before_pipeline_run``, so a bad setting opens no MLflow run.
    """

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        params = catalog.load("parameters") if "parameters" in catalog else {}
        problems = parameter_problems(params or {})
        if problems:
            raise InvalidParametersError(problems)
