"""Kedro CLI hooks of the project (entry point ``kedro.cli_hooks``; run before any ``kedro`` command).

``kedro run --pipeline=train`` is this project's documented command; Kedro 1.x calls the singular option
deprecated in favour of ``--pipelines`` and would warn on every run. The warning is raised inside the ``run``
command, before the project's settings are imported, so the filter is installed here.
"""
from __future__ import annotations

import warnings
from typing import Any

from kedro.framework.cli.hooks import cli_hook_impl


class QuietCliHooks:
    """Silences Kedro's deprecation of ``--pipeline`` (and nothing else)."""

    @cli_hook_impl
    def before_command_run(self, project_metadata: Any, command_args: list[str]) -> None:
        """Install the warning filter before the command runs."""
        warnings.filterwarnings("ignore", message=r"Option '--pipeline' is deprecated")


cli_hooks = QuietCliHooks()
