"""The issue's memory check: ``kedro run --pipeline=train --params train.steps=10`` on 40 and on 640 augmented
photos, default settings; prints each run's peak RSS (the kedro process, its largest child, the whole tree).

    python benchmarks/memory_check.py [--sizes 40 640] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import REPO, SHARED_FACES, kedro_run, make_project  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 640])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", default=str(REPO / "data" / "09_benchmarks" / "memory"))
    args = parser.parse_args(argv)
    from facedetail.sample_data import write_augmented_folder

    work = Path(args.work)
    rows = []
    for size in args.sizes:
        photos = work / f"photos_{size}"
        write_augmented_folder([str(SHARED_FACES)], photos, size)
        project = make_project(work / f"project_{size}")
        env = {**os.environ, "DO_NOT_TRACK": "1", "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1",
               "FACEDETAIL_RAW_FACES": str(photos), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}",
               "FACEDETAIL_ICT_MODEL": str(REPO.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz")}
        result = kedro_run(project, "train", env, f"train.steps={args.steps}")
        rows.append({"photos": size, **{k: round(v, 1) for k, v in result.items()}})
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    for key in ("rss_kedro_mb", "rss_tree_mb"):
        print(f"{key}: {first[key]:.0f} MB at {first['photos']} photos -> {last[key]:.0f} MB at {last['photos']} (ratio {last[key] / first[key]:.3f})")


if __name__ == "__main__":
    main()
