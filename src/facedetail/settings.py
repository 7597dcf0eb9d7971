"""Kedro project settings (https://docs.kedro.org/en/stable/kedro_project_setup/settings.html)."""
from __future__ import annotations

import os

from omegaconf import OmegaConf

from facedetail.config_loader import ProjectConfigLoader

# Never let kedro-telemetry try the network (the project also ships `.telemetry` with consent: false).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")


def _env(name: str, default: str | None = None) -> str | None:
    """``${env:NAME,default}`` in any config file: the environment variable or the default."""
    return os.environ.get(name, default)


# Registered here with the non-deprecated API; Kedro then skips its deprecated register_new_resolver call for it.
if not OmegaConf.has_resolver("env"):
    OmegaConf.register_resolver("env", _env)
try:  # kedro-mlflow's hook registers this one with the deprecated API unless it already exists
    from kedro_mlflow.config.resolvers import resolve_random_name

    if not OmegaConf.has_resolver("km.random_name"):
        OmegaConf.register_resolver("km.random_name", resolve_random_name, use_cache=True)
except ImportError:  # pragma: no cover - kedro-mlflow is a dependency
    pass

CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"env": _env},
    # conf/<env> overrides base key by key (deep merge), e.g. conf/gpu changes train.steps only.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "mlflow": "soft"},
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "catalog": ["catalog*", "catalog*/**", "**/catalog*"],
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
}

from facedetail.hooks import (  # noqa: E402 - after the telemetry variables
    DatasetLineageHooks,
    ExecutionHooks,
    RunTrackingHooks,
    TrackingDatabaseHooks,
    UserErrorHooks,
    ValidateParametersHook,
)

# kedro-mlflow's hooks register themselves (plugin entry point); ours check the raw folder and validate the
# parameters first (among `tryfirst` hooks the later registered runs first: parameters, then the raw folder),
# name and tag the MLflow run (and mark runs of dead processes KILLED), record dataset lineage in it, stop the
# run's Dask cluster after the per-face stages, and create the MLflow database atomically.
HOOKS = (UserErrorHooks(), ValidateParametersHook(), RunTrackingHooks(), DatasetLineageHooks(), ExecutionHooks(),
         TrackingDatabaseHooks())
