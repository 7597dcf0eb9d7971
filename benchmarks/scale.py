"""Memory and time against the number of faces: preprocessing (Dask, shard by shard) and training.

Builds face folders of growing size from the shared photos (augmented: mirror, crop, small
rotation, colour jitter; ``facedetail.sample_data.write_augmented_folder``), then for each size
runs, in a fresh project folder and a child process each:

1. ``kedro run --pipeline=preprocess`` (data_prep -> estimation -> uv_maps on the configured
   executor: a local Dask cluster by default),
2. ``kedro run --pipeline=train --params train.steps=N`` (reuses the preprocessed shards).

It samples the whole process tree (kedro + Dask workers + DataLoader workers) every 0.2 s and
prints, per size: peak RSS of the kedro process, of the largest worker and of the tree summed,
faces/s of every stage (from each dataset version's ``meta.json``) and the wall time. The last
lines give the memory ratio largest/smallest (target: within 1.15) and the time per face.

    python benchmarks/scale.py --sizes 250 1000 4000 --train-steps 200
    python benchmarks/scale.py --sizes 40 160 --train-steps 10 --fast-fit   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "assets" / "faces"
STAGES = [("03_primary", "aligned_faces"), ("04_feature", "face_landmarks"), ("04_feature", "face_masks"),
          ("04_feature", "facenet_embeddings"), ("04_feature", "face_coefficients"), ("05_model_input", "uv_maps")]


class TreeMemory:
    """Peak RSS of a process, of its largest descendant, and of the whole tree (sampled)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.every = every
        self.peak_root = self.peak_child = self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = self.root.memory_info().rss
                children = [c.memory_info().rss for c in self.root.children(recursive=True)]
            except psutil.Error:
                children, root = [], self.peak_root
            self.peak_root = max(self.peak_root, root)
            self.peak_child = max([self.peak_child, *children])
            self.peak_tree = max(self.peak_tree, root + sum(children))
            self._stop.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        mb = 1024 * 1024
        return {"rss_kedro_mb": self.peak_root / mb, "rss_worker_max_mb": self.peak_child / mb, "rss_tree_mb": self.peak_tree / mb}


def make_project(root: Path) -> Path:
    """A throw-away project folder that uses this repository's code and conf."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (root / "src").mkdir(exist_ok=True)
    return root


def kedro_run(project: Path, pipeline: str, env: dict[str, str], params: str | None = None) -> dict[str, float]:
    command = [sys.executable, "-m", "kedro", "run", f"--pipeline={pipeline}", "--conf-source", str(REPO / "conf")]
    if params:
        command += ["--params", params]
    tic = time.perf_counter()
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    _, err = process.communicate()
    result = {"seconds": time.perf_counter() - tic, **memory.stop()}
    if process.returncode != 0:
        raise RuntimeError(f"kedro run --pipeline={pipeline} failed (rc {process.returncode}):\n{err[-3000:]}")
    return result


def stage_rates(project: Path) -> dict[str, float]:
    """faces/s and seconds of each stage, from the latest version's meta.json."""
    rates = {}
    for layer, name in STAGES:
        metas = sorted((project / "data" / layer / name).glob(f"*/{name}/meta.json"))
        if metas:
            meta = json.loads(metas[-1].read_text())["meta"]
            rates[f"{name}_faces_per_s"] = float(meta.get("faces_per_second", float("nan")))
            rates[f"{name}_s"] = float(meta.get("seconds", float("nan")))
            rates["faces"] = float(json.loads(metas[-1].read_text())["faces"]) if name == "aligned_faces" else rates.get("faces", 0)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000], help="photos per folder")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--work", default=str(REPO / "data" / "09_benchmarks" / "scale"))
    parser.add_argument("--sources", nargs="+", default=[str(SHARED_FACES)])
    parser.add_argument("--scheduler", default="local", help="execution.scheduler for preprocessing")
    parser.add_argument("--fast-fit", action="store_true", help="short 3DMM schedule (a quick look, not the default accuracy)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--shard-size", type=int, default=64,
                        help="data_prep.shard_size (images per shard); small enough that every size runs on the cluster")
    args = parser.parse_args(argv)

    from facedetail.sample_data import write_augmented_folder

    work = Path(args.work)
    photos = work / "photos"
    write_augmented_folder(args.sources, photos / "all", max(args.sizes))
    rows = []
    for size in args.sizes:
        folder = photos / f"n{size}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((photos / "all").glob("aug_*.jpg"))[:size]:
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path)
        project = make_project(work / f"project_{size}")
        env = {**os.environ, "DO_NOT_TRACK": "1", "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1",
               "FACEDETAIL_RAW_FACES": str(folder), "FACEDETAIL_DASK_SCHEDULER": args.scheduler,
               "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}",
               "FACEDETAIL_ASSETS": str(REPO.parent / "shared" / "assets"),
               "FACEDETAIL_ICT_MODEL": str(REPO.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz")}
        params = f"data_prep.shard_size={args.shard_size}"
        if args.fast_fit:
            params += ",estimation.fitting.rigid_steps=20,estimation.fitting.landmark_steps=60,estimation.fitting.photometric_steps=10"
        pre = kedro_run(project, "preprocess", env, params)
        row = {"photos": size, **stage_rates(project), "preprocess_s": pre["seconds"],
               **{f"preprocess_{k}": v for k, v in pre.items() if k.startswith("rss")}}
        row["preprocess_faces_per_s"] = row.get("faces", 0) / pre["seconds"]
        if not args.skip_train:
            train_params = f"train.steps={args.train_steps},{params}"
            train = kedro_run(project, "train", env, train_params)
            row.update({"train_s": train["seconds"], **{f"train_{k}": v for k, v in train.items() if k.startswith("rss")}})
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for key in ("preprocess_rss_kedro_mb", "preprocess_rss_worker_max_mb", "train_rss_kedro_mb", "train_rss_tree_mb"):
            if key in first:
                print(f"{key}: {first[key]:.0f} MB at {first['photos']} photos -> {last[key]:.0f} MB at {last['photos']} "
                      f"(ratio {last[key] / first[key]:.3f})")
        faces = last.get("faces", 0) - first.get("faces", 0)
        if faces > 0:  # the driver (kedro process) alone: flat means ~0 MB per 1000 faces
            slope = (last["preprocess_rss_kedro_mb"] - first["preprocess_rss_kedro_mb"]) * 1000 / faces
            print(f"preprocess kedro (driver) peak RSS slope: {slope:+.1f} MB per 1000 faces")
        print(f"preprocess seconds per face: {first['preprocess_s'] / max(first['faces'], 1):.3f} at {first['photos']} photos -> "
              f"{last['preprocess_s'] / max(last['faces'], 1):.3f} at {last['photos']}")


if __name__ == "__main__":
    main()
