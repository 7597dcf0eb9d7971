"""MLflow run hygiene, Kedro-free: readable run names, provenance tags, and runs a killed process left RUNNING.

* :func:`run_name`: ``<pipeline>-<UTC timestamp>`` (e.g. ``train-20260102T030405Z``).
* :func:`git_tags` / :func:`process_tags`: the git commit and dirty flag of the project checkout (nothing
  when it is not a git checkout or git is missing), and the PID and host of the process that owns the run.
* :func:`reap_stale_runs`: runs of an experiment still ``RUNNING`` whose recorded process (``facedetail.pid``
  on ``facedetail.host``) is gone are marked ``KILLED``.

The Kedro side lives in :class:`facedetail.hooks.RunTrackingHooks`.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

TAG_PID = "facedetail.pid"
TAG_HOST = "facedetail.host"
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"


def run_name(pipeline_names: Sequence[str] | str | None, now: _dt.datetime | None = None) -> str:
    """``<pipelines joined by '+'>-<UTC timestamp YYYYmmddTHHMMSSZ>``; ``__default__`` when no pipeline is named."""
    if isinstance(pipeline_names, str):
        pipeline_names = [pipeline_names]
    names = "+".join(pipeline_names or ["__default__"])
    now = (now or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    return f"{names}-{now:%Y%m%dT%H%M%SZ}"


def git_tags(path: str | os.PathLike) -> dict[str, str]:
    """``{"git.commit": sha, "git.dirty": "true"|"false", "mlflow.source.git.commit": sha}`` of the checkout at ``path``.

    Empty when ``path`` is not inside a git work tree, git is not installed, or it fails (never raises).
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=str(path), capture_output=True, text=True, timeout=20, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    if not re.fullmatch(r"[0-9a-f]{40,64}", commit):
        return {}
    return {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(dirty).lower(), "mlflow.source.git.commit": commit}


def process_tags(project_path: str | os.PathLike | None = None) -> dict[str, str]:
    """The tags every run of ours carries: PID and host of this process, plus :func:`git_tags` of ``project_path``."""
    tags = {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    if project_path is not None:
        tags.update(git_tags(project_path))
    return tags


def runner_name(value: Any) -> str:
    """A runner's class name from what Kedro puts in ``run_params["runner"]`` (a class name or an object repr).

    ``None``/"None" (``KedroSession.run()`` without a runner records it before defaulting) is Kedro's ``SequentialRunner``.
    """
    text = str(value)
    if value is None or text == "None":
        return "SequentialRunner"
    match = re.match(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", text)
    return match.group(1).rsplit(".", 1)[-1] if match else text


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def reap_stale_runs(
    client: Any, experiment_ids: Iterable[str], host: str | None = None, is_alive: Callable[[int], bool] = pid_alive,
    status: str = "KILLED",
) -> list[str]:
    """Mark ``status`` the RUNNING runs whose recorded process (``facedetail.pid`` on this ``host``) is no longer alive.

    Runs without the tags, or recorded on another host, are left alone (nothing tells whether they live).
    Returns the ids of the runs marked.
    """
    host = host or socket.gethostname()
    ids = [str(e) for e in experiment_ids if e is not None]
    if not ids:
        return []
    marked = []
    for run in client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(TAG_HOST) != host or not str(tags.get(TAG_PID, "")).isdigit():
            continue
        pid = int(tags[TAG_PID])
        if pid == os.getpid() or is_alive(pid):
            continue
        client.set_terminated(run.info.run_id, status)
        client.set_tag(run.info.run_id, "facedetail.reaped", f"process {pid} on {host} was gone")
        marked.append(run.info.run_id)
    if marked:
        logger.warning("marked %d run(s) %s: their process had died while RUNNING (%s)", len(marked), status, ", ".join(marked))
    return marked


