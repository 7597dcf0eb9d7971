"""``python -m facedetail`` runs the Kedro project (same as ``kedro run``)."""
from __future__ import annotations

import sys
from pathlib import Path

from kedro.framework.cli.project import run
from kedro.framework.project import configure_project


def main(*args, **kwargs) -> None:
    configure_project(Path(__file__).parent.name)
    kwargs["standalone_mode"] = not hasattr(sys, "ps1")
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
