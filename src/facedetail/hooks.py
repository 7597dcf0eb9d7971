"""Kedro hooks of the project (registered in ``settings.py``'s ``HOOKS``)."""
from __future__ import annotations

from typing import Any

import click
from kedro.framework.hooks import hook_impl

from facedetail.config import ParameterError, parameter_problems


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
