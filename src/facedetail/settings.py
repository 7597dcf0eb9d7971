"""Kedro project settings (https://docs.kedro.org/en/stable/kedro_project_setup/settings.html)."""
from __future__ import annotations

import os

from kedro.config import OmegaConfigLoader

# Never let kedro-telemetry try the network (the project also ships `.telemetry` with consent: false).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")


def _env(name: str, default: str | None = None) -> str | None:
    """``${env:NAME,default}`` in any config file: the environment variable or the default."""
    return os.environ.get(name, default)


CONFIG_LOADER_CLASS = OmegaConfigLoader
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
    DatasetLineageHooks, ExecutionHooks, TrackingDatabaseHooks, UserErrorHooks, ValidateParametersHook)  # noqa: E402 - after the telemetry variables

# kedro-mlflow's hooks register themselves (plugin entry point); ours validate the parameters first,
# record dataset lineage in the MLflow run and stop the run's Dask cluster at the end.
# UserErrorHooks before ValidateParametersHook: among `tryfirst` hooks the later registered runs first (parameters, then the raw folder)
HOOKS = (UserErrorHooks(), ValidateParametersHook(), DatasetLineageHooks(), ExecutionHooks(), TrackingDatabaseHooks())
