"""Check the project's Kedro-Viz export: build it offline, serve it, render it in headless Chromium.

``kedro viz build`` writes a static site into ``build/`` of the current directory and has no
option for another path, so :func:`build_static_viz` runs it in a scratch copy of the project
(``pyproject.toml``, ``.telemetry``, ``conf/`` copied; the package imported from the
project's ``src`` through ``PYTHONPATH``) and the repository stays
clean. The site reads its graph from JSON files: ``api/main`` (default pipeline) and
``api/pipelines/<name>`` (one per registered pipeline).

:func:`render_viz_page` serves that folder with Python's ``http.server`` and loads it in headless
Chromium on ``/?pid=<pipeline>`` (Kedro-Viz's URL parameter for the selected pipeline), saving a
screenshot and returning the rendered DOM. The flowchart's node labels are
``<text class="pipeline-node__text">`` elements (:func:`rendered_node_names`).

Command line (writes ``data/08_reporting/viz/kedro_viz_<pipeline>.png``)::

    DO_NOT_TRACK=1 python -m facedetail.viz_check [--pipeline train] [--project .]

This module only runs ``kedro`` as a subprocess; it does not import it.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Chromium flags for a quiet, offline, deterministic headless render.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Page written into the served folder: turns off Kedro-Viz's feature-hint pop-up (kept in the
#: browser's localStorage under "KedroViz") and then opens the requested pipeline.
PRIME_PAGE_NAME = "_facedetail_viz_prime.html"
_PRIME_PAGE = """<!DOCTYPE html><html><body><script>
localStorage.setItem("KedroViz", JSON.stringify({{showFeatureHints: false}}));
location.replace("/?pid={pipeline}");
</script></body></html>
"""
_NODE_TEXT = re.compile(r'<text class="pipeline-node__text"[^>]*>([^<]*)</text>')
_SELECTED_PIPELINE = re.compile(r'class="dropdown__label"><span>([^<]*)</span>')


@dataclass(frozen=True)
class PipelineGraph:
    """Names in one pipeline of a Kedro-Viz export.

    Attributes:
        tasks: Node (function) names.
        datasets: Dataset names (type "data").
        parameters: Parameter entries ("params:...", "parameters").
        edges: (source name, target name) pairs between any of the above.
    """

    tasks: frozenset[str]
    datasets: frozenset[str]
    parameters: frozenset[str]
    edges: frozenset[tuple[str, str]]


def kedro_env() -> dict[str, str]:
    """Environment for kedro subprocesses: telemetry off (it would try the network)."""
    env = dict(os.environ)
    env["DO_NOT_TRACK"] = "1"
    env["KEDRO_DISABLE_TELEMETRY"] = "1"
    return env


def build_static_viz(project_dir: Path, work_dir: Path, timeout_s: float = 300.0) -> Path:
    """Run ``kedro viz build`` for ``project_dir`` inside ``work_dir`` and return the site folder.

    Args:
        project_dir: Kedro project root (holds ``pyproject.toml``, ``conf/`` and ``src/``).
        work_dir: Empty or missing scratch folder; receives the project copy and its ``build/``.
        timeout_s: Limit for the ``kedro viz build`` subprocess.

    Returns:
        ``work_dir/project/build`` containing ``index.html`` and ``api/``.

    Raises:
        FileNotFoundError: ``project_dir`` is not a Kedro project.
        RuntimeError: the build failed or wrote no ``api/main`` (kedro-viz exits 0 on failures).
    """
    project_dir = Path(project_dir).resolve()
    for required in ("pyproject.toml", "conf", "src"):
        if not (project_dir / required).exists():
            raise FileNotFoundError(f"{project_dir} is not a Kedro project: missing {required}")
    copy = Path(work_dir) / "project"
    copy.mkdir(parents=True, exist_ok=False)
    shutil.copy2(project_dir / "pyproject.toml", copy / "pyproject.toml")
    if (project_dir / ".telemetry").is_file():
        shutil.copy2(project_dir / ".telemetry", copy / ".telemetry")
    else:
        (copy / ".telemetry").write_text("consent: false\n")
    shutil.copytree(project_dir / "conf", copy / "conf")
    # kedro requires source_dir inside the project: an empty src/ there, the real package first on
    # PYTHONPATH (a symlinked src/ is rejected once kedro resolves it).
    (copy / "src").mkdir()
    env = kedro_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_dir / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "kedro", "viz", "build"]
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
    site = copy / "build"
    if result.returncode != 0 or not (site / "api" / "main").is_file():
        output = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(
            f"`kedro viz build` in {copy} failed (exit {result.returncode}, "
            f"api/main {'present' if (site / 'api' / 'main').is_file() else 'missing'}):\n{output}"
        )
    return site


def read_pipeline_graph(site_dir: Path, pipeline: str) -> PipelineGraph:
    """Read ``api/pipelines/<pipeline>`` of a Kedro-Viz export into names.

    Raises:
        FileNotFoundError: the export has no such pipeline (lists those it has).
    """
    path = Path(site_dir) / "api" / "pipelines" / pipeline
    if not path.is_file():
        available = sorted(p.name for p in (Path(site_dir) / "api" / "pipelines").glob("*"))
        raise FileNotFoundError(f"no pipeline {pipeline!r} in the export at {path}; found {available}")
    graph = json.loads(path.read_text())
    names = {node["id"]: node["name"] for node in graph["nodes"]}
    by_type: dict[str, set[str]] = {"task": set(), "data": set(), "parameters": set()}
    for node in graph["nodes"]:
        by_type.setdefault(node["type"], set()).add(node["name"])
    edges = {(names[edge["source"]], names[edge["target"]]) for edge in graph["edges"]}
    return PipelineGraph(
        tasks=frozenset(by_type["task"]),
        datasets=frozenset(by_type["data"]),
        parameters=frozenset(by_type["parameters"]),
        edges=frozenset(edges),
    )


def find_chromium() -> str | None:
    """Path of a Chromium executable (Debian's ``chromium`` first), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve_directory(directory: Path, startup_timeout_s: float = 15.0) -> Iterator[str]:
    """Serve ``directory`` on a free localhost port with ``http.server``; yield its base URL.

    The server runs in its own subprocess and is terminated (then killed) on exit.
    """
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/index.html", timeout=2):
                    break
            except OSError as error:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server for {directory} did not start on port {port}") from error
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


def render_viz_page(
    site_dir: Path,
    pipeline: str,
    screenshot_path: Path,
    chromium: str,
    window_size: tuple[int, int] = (1600, 1000),
    timeout_s: float = 90.0,
) -> str:
    """Render a Kedro-Viz export in headless Chromium; save a screenshot and return the DOM.

    Writes a small page (:data:`PRIME_PAGE_NAME`) into ``site_dir`` that hides the feature-hint
    pop-up and opens ``/?pid=<pipeline>``.

    Args:
        site_dir: Folder written by ``kedro viz build``.
        pipeline: Registered pipeline to select.
        screenshot_path: PNG to write (parent folders are created).
        chromium: Chromium executable.
        window_size: (width, height) of the window in pixels.
        timeout_s: Limit for the Chromium subprocess.

    Raises:
        RuntimeError: Chromium failed or wrote no screenshot.
    """
    site_dir = Path(site_dir)
    screenshot_path = Path(screenshot_path)
    screenshot_path.parent.mkdir(parents=True, exist_ok=True)
    screenshot_path.unlink(missing_ok=True)
    (site_dir / PRIME_PAGE_NAME).write_text(_PRIME_PAGE.format(pipeline=pipeline))
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, serve_directory(site_dir) as url:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={window_size[0]},{window_size[1]}",
            "--virtual-time-budget=15000",
            f"--screenshot={screenshot_path}",
            "--dump-dom",
            f"{url}/{PRIME_PAGE_NAME}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0 or not screenshot_path.is_file():
        raise RuntimeError(
            f"{chromium} failed (exit {result.returncode}) or wrote no {screenshot_path}:\n{result.stderr[-3000:]}"
        )
    return result.stdout


def rendered_node_names(dom: str) -> list[str]:
    """Labels of the flowchart's nodes (tasks and datasets) in a rendered Kedro-Viz DOM."""
    return [html.unescape(name) for name in _NODE_TEXT.findall(dom)]


def selected_pipeline_name(dom: str) -> str | None:
    """Pipeline shown in Kedro-Viz's pipeline selector, or None if it is not rendered."""
    match = _SELECTED_PIPELINE.search(dom)
    return html.unescape(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> int:
    """Build the export, render ``--pipeline`` and save its screenshot under data/08_reporting/viz."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="Kedro project root")
    parser.add_argument("--pipeline", default="train", help="registered pipeline to render")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG path to write")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    screenshot = args.screenshot or project / "data" / "08_reporting" / "viz" / f"kedro_viz_{args.pipeline}.png"
    chromium = find_chromium()
    with tempfile.TemporaryDirectory(prefix="facedetail-viz-") as work:
        site = build_static_viz(project, Path(work))
        graph = read_pipeline_graph(site, args.pipeline)
        print(f"{args.pipeline}: {len(graph.tasks)} nodes, {len(graph.datasets)} datasets in the export")
        if chromium is None:
            print("chromium not found: no screenshot (Debian: apt-get install chromium)", file=sys.stderr)
            return 1
        dom = render_viz_page(site, args.pipeline, screenshot, chromium)
    shown = set(rendered_node_names(dom))
    missing = sorted((graph.tasks | graph.datasets) - shown)
    print(f"rendered {len(shown)} flowchart labels; screenshot: {screenshot}")
    if missing:
        print(f"not rendered: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
