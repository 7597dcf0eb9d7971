"""The project's Kedro config loader: :class:`OmegaConfigLoader` that rejects an unknown ``--env`` up front.

Without this check ``kedro run --env gpuu`` silently runs on ``base`` only and fails later with an unrelated
error (an MLflow file store in the wrong place). Used by ``settings.CONFIG_LOADER_CLASS`` and the ``facedetail`` CLI.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader

# Kedro 1.7's OmegaConfigLoader registers its own resolvers (globals, runtime_params, oc.env) with
# OmegaConf.register_new_resolver, deprecated in omegaconf 2.4: five UserWarnings per command that no
# project code can change. Ignore exactly that message from exactly that module; our own resolvers are
# registered with OmegaConf.register_resolver (facedetail.settings), so they never warn.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning,
                        module=r"kedro\.config\.omegaconf_config")


class UnknownEnvironmentError(ValueError):
    """``--env NAME`` names no folder of the conf source (the message lists the ones that exist)."""


def available_envs(conf_source: str | Path, base_env: str = "base") -> list[str]:
    """Environment folders of a local conf source other than ``base_env`` (sorted)."""
    root = Path(conf_source)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != base_env and not p.name.startswith("."))


def check_env(conf_source: str | Path, env: str | None, base_env: str = "base") -> None:
    """Raise :class:`UnknownEnvironmentError` when ``env`` is given but ``conf_source/env`` is no folder.

    Remote conf sources (``s3://...``) and archives are not checked.
    """
    if not env or env == base_env or "://" in str(conf_source) or not Path(conf_source).is_dir():
        return
    if not (Path(conf_source) / env).is_dir():
        known = available_envs(conf_source, base_env)
        raise UnknownEnvironmentError(
            f"unknown Kedro environment '{env}': {conf_source} has {', '.join([base_env, *known])} "
            f"(an environment is a folder of the conf source; pass one of {known or [base_env]})")


class ProjectConfigLoader(OmegaConfigLoader):
    """:class:`OmegaConfigLoader` plus :func:`check_env` on the environment asked for."""

    def __init__(self, conf_source: str, env: str | None = None, *args: Any, **kwargs: Any) -> None:
        check_env(conf_source, env, kwargs.get("base_env") or "base")
        super().__init__(conf_source, env, *args, **kwargs)
