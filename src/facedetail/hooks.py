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
* :class:`UserErrorHooks` checks the raw faces folder before the run and turns the errors a user
  fixes by changing a setting or a file (a :class:`~facedetail.utils.SettingError`, no partitions,
  a full disk) into one line: ``Error: ...`` with exit status 2 from ``kedro run``.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
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


#: The catalog entry of the raw photos and the environment variable that overrides its folder.
RAW_FACES_DATASET = "raw_faces"
RAW_FACES_ENV = "FACEDETAIL_RAW_FACES"
#: The environment variable of the inference pipeline's photo folder (catalog entry ``inference_images``).
INFERENCE_IMAGES_ENV = "FACEDETAIL_INFERENCE_IMAGES"


class RunSettingError(click.ClickException):
    """An error the user fixes with a setting or a file; ``kedro run`` prints ``Error: <one line>``, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def raw_folder_problem(path: str) -> str | None:
    """Why the raw faces folder ``path`` cannot feed ``data_prep`` (missing, not a folder, no files), else None.

    Only local folders are checked (other filesystems are listed by ``PartitionedDataset`` itself).
    """
    if "://" in str(path) and not str(path).startswith("file://"):
        return None
    folder = Path(str(path).removeprefix("file://"))
    hint = f"put photos there or point {RAW_FACES_ENV} (catalog entry {RAW_FACES_DATASET}.path) at a folder of images"
    if not folder.exists():
        return f"raw faces folder '{folder}' does not exist; {hint}"
    if not folder.is_dir():
        return f"raw faces folder '{folder}' is not a folder; {hint}"
    for _, _, files in os.walk(folder):  # unreadable sub-folders are skipped (data_prep reports what it reads)
        if files:
            return None
    return f"raw faces folder '{folder}' holds no files; {hint}"


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user fixes by a setting or a file, else None (a bug: keep the traceback)."""
    from facedetail.utils import SettingError

    seen: set[int] = set()
    saving = None  # a dataset's own "cannot write '<path>' ..." message, the best one for a full disk
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # the error or one of its causes
        seen.add(id(current))
        if isinstance(current, SettingError):
            return str(current)
        if saving is None and str(current).startswith("cannot write '"):
            saving = str(current)
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f"'{current.filename}'" if current.filename else "(unknown file)"
            return (saving or f"{current.strerror or 'No space left on device'} while writing {where}") + \
                "; free space on that disk or move the data folder"
        text = str(current)
        if "No partitions found in" in text:  # an input folder of photos (raw_faces, inference_images) is empty
            folder = text.split("No partitions found in", 1)[1].strip().strip("'\"")
            problem = raw_folder_problem(folder) or f"no files in '{folder}'"
            return problem.split(";")[0] + (f"; put photos there or point {RAW_FACES_ENV} (data_prep) or "
                                            f"{INFERENCE_IMAGES_ENV} (inference) at a folder of images")
        current = current.__cause__ or current.__context__
    return None


class UserErrorHooks:
    """One-line errors for bad settings and files in ``kedro run`` (see :class:`RunSettingError`)."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Before kedro-mlflow opens a run (``tryfirst``): a missing or empty raw folder stops the run here."""
        if RAW_FACES_DATASET not in pipeline.inputs():
            return
        try:
            dataset = catalog[RAW_FACES_DATASET]
        except Exception:  # noqa: BLE001 - not in the catalog: Kedro reports it
            return
        path = getattr(dataset, "_path", None)
        problem = raw_folder_problem(str(path)) if path is not None else None
        if problem:
            raise RunSettingError(problem)

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error: BaseException) -> None:
        """Runs after the other hooks (kedro-mlflow ends its run first); raising replaces the error Kedro re-raises."""
        if isinstance(error, click.ClickException):
            return
        message = user_error_message(error)
        if message is not None:
            raise RunSettingError(message) from error


def ensure_tracking_database(uri: str, project_path: str | os.PathLike) -> Path | None:
    """Create a missing SQLite MLflow database atomically: tables built in a temporary file, renamed into place.

    MLflow creates its schema in many migration steps; a run killed during them (``kill -9`` in the first
    seconds of the first ``kedro run``) left a half-built ``mlruns.db`` on which every later run failed ("table ...
    already exists"). Returns the database path when it was created here, else None (not SQLite, or it exists).
    """
    if not str(uri).startswith("sqlite:///"):
        return None
    path = Path(str(uri)[len("sqlite:///"):])
    path = path if path.is_absolute() else Path(project_path) / path
    if path.exists():
        return None
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        engine = create_sqlalchemy_engine(f"sqlite:///{tmp}")
        _initialize_tables(engine)
        engine.dispose()
        if path.exists():  # another run created it meanwhile: keep theirs
            return None
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class TrackingDatabaseHooks:
    """Create the run's SQLite MLflow database atomically before kedro-mlflow opens it (``tryfirst``)."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        try:
            server = (context.config_loader["mlflow"] or {}).get("server", {})
        except Exception:  # noqa: BLE001 - no mlflow.yml: kedro-mlflow's defaults (not SQLite)
            return
        for key in ("mlflow_tracking_uri", "mlflow_registry_uri"):
            if server.get(key):
                ensure_tracking_database(str(server[key]), context.project_path)
