"""Fault injection: ``kill -9`` a ``kedro run`` at a random (seeded) moment, rerun, check nothing is lost or wrong;
and a full disk during each kind of save.

Kill trials (a subprocess ``kedro run`` in a temporary copy of the project, tiny settings, the built-in sample of
5 photos in 3 shards, ``FACEDETAIL_DASK_SCHEDULER=synchronous`` unless ``--scheduler local``):

* ``preprocess``: kill ``kedro run --pipeline=preprocess`` after ``U(0, 1) x`` the uninterrupted run's time, rerun;
* ``train``: on a preprocessed project, kill ``kedro run --pipeline=train`` the same way, rerun;
* the last ``--mlflow-setup-trials`` (2) trials kill the run as soon as its MLflow database file appears.

Each trial checks that the rerun succeeds; that no version folder is broken (every sharded version has
``meta.json`` and shards matching their sha256, every versioned file loads); that the final faces (ids of the
latest ``uv_maps`` index) equal the uninterrupted run's, none lost or duplicated; and, for ``train``, that the final
generator weights equal the uninterrupted run's exactly (resume is bit-identical).

Disk-full trials (in process): ``os.fsync`` raises ENOSPC during a shard, a versioned file, a training checkpoint
and a cache entry save (after the bytes were written, before the rename); the error must name the file, and the
previous version must survive and load.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/fault_injection.py --trials 20 [--seed 0] [--scheduler synchronous|local]

The LAST line is ``survived=<k>/<n>``.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "01_raw" / "faces"
ICT = REPO_ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
#: Tiny settings (the train pipeline test's TINY, 3 shards of 2 images, a short fit).
TINY_PARAMETERS = """
data_prep:
  shard_size: 2
uv_maps:
  uv_size: 32
estimation:
  fitting: {rigid_steps: 15, landmark_steps: 30, photometric_steps: 5}
train:
  steps: 4
  batch_size: 2
  log_every: 1
  image_log_every: 2
  checkpoint_every: 1
  log_checkpoint_artifact: false
  registered_model_name: facedetail-fault-injection
  model: {ngf: 8, num_downs: 5, embedding_channels: 4, regions: 2, filter_pool: 2}
  discriminator: {ndf: 8, n_layers: 2}
"""


# ---------------------------------------------------------------------------------------------- projects
def make_project(folder: Path, scheduler: str = "synchronous") -> dict[str, str]:
    """A runnable project in ``folder`` (pyproject, conf copy + tiny local parameters); returns its environment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    (folder / "src").mkdir(exist_ok=True)
    shutil.copytree(REPO_ROOT / "conf", folder / "conf", dirs_exist_ok=True)
    (folder / "conf" / "local").mkdir(exist_ok=True)
    (folder / "conf" / "local" / "parameters_faults.yml").write_text(TINY_PARAMETERS)
    return project_env(folder, scheduler)


def project_env(folder: Path, scheduler: str = "synchronous") -> dict[str, str]:
    env = {**os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "FACEDETAIL_RAW_FACES": str(SAMPLE),
           "FACEDETAIL_ICT_MODEL": str(ICT), "FACEDETAIL_DEVICE": "cpu", "FACEDETAIL_DASK_SCHEDULER": scheduler,
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns.db'}", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return env


def kedro_run(folder: Path, pipeline: str, env: dict[str, str], kill_after: float | None = None,
              timeout: float = 900, kill_when: Callable[[], bool] | None = None) -> tuple[int | None, float, str]:
    """Run ``kedro run --pipeline=<pipeline>`` in ``folder``; ``kill_after`` seconds: SIGKILL it (and its children).

    ``kill_when``: instead, SIGKILL it as soon as this returns True (polled every 10 ms).
    Returns ``(return code or None when killed, seconds, last output)``.
    """
    tic = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "kedro", "run", f"--pipeline={pipeline}"], cwd=folder, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while kill_when is not None and process.poll() is None:
            if kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return None, time.perf_counter() - tic, ""
            time.sleep(0.01)
        try:
            process.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
            os.killpg(process.pid, signal.SIGKILL)  # kill -9 the run and any Dask worker it started
            process.wait()
            return None, time.perf_counter() - tic, ""
        log.seek(0)
        return process.returncode, time.perf_counter() - tic, log.read()[-3000:]


# ---------------------------------------------------------------------------------------------- checks
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_problems(data: Path) -> list[str]:
    """Every broken version under ``data/``: sharded folders without meta.json or with a shard not matching its
    sha256, versioned files that do not load. Hidden staging folders/files are ignored (never loaded)."""
    import numpy as np
    import pandas as pd
    import torch

    problems = []
    for dataset in sorted(p for p in data.rglob("*") if p.is_dir() and not p.name.startswith(".")):
        versions = [v for v in dataset.iterdir() if v.is_dir() and not v.name.startswith(".") and v.name[:4].isdigit()
                    and v.name.endswith("Z")]
        for version in versions:
            inner = version / dataset.name
            if inner.is_file():  # a versioned file: <name>/<version>/<name>
                try:
                    if inner.suffix == ".npz":
                        with np.load(inner, allow_pickle=False) as bundle:
                            [bundle[k] for k in bundle.files]
                    elif inner.suffix == ".pt":
                        torch.load(inner, map_location="cpu", weights_only=True)
                    elif inner.suffix == ".parquet":
                        pd.read_parquet(inner)
                    elif inner.suffix == ".json":
                        json.loads(inner.read_text())
                    elif inner.suffix == ".csv":
                        pd.read_csv(inner)
                except Exception as error:  # noqa: BLE001
                    problems.append(f"{inner}: {type(error).__name__}: {error}")
            elif inner.is_dir():  # a sharded version: <name>/<version>/<name>/{meta.json, index.parquet, shard-*.tar}
                meta_path = inner / "meta.json"
                if not meta_path.is_file():
                    problems.append(f"{inner}: sharded version without meta.json")
                    continue
                meta = json.loads(meta_path.read_text())
                for name, sha in zip(meta["shards"], meta["shard_sha256"]):
                    if not (inner / name).is_file() or _sha256(inner / name) != sha:
                        problems.append(f"{inner / name}: missing or does not match its sha256")
                if len(pd.read_parquet(inner / "index.parquet")) != meta["faces"]:
                    problems.append(f"{inner}: index rows != meta faces")
            elif not any(version.iterdir()):
                problems.append(f"{version}: empty version folder")
    return problems


def latest_version(dataset: Path) -> Path:
    return sorted(v for v in dataset.iterdir() if v.is_dir() and not v.name.startswith("."))[-1]


def final_face_ids(project: Path) -> list[str]:
    """Face ids of the latest ``uv_maps`` version, in order (all statuses)."""
    import pandas as pd

    return list(pd.read_parquet(latest_version(project / "data" / "05_model_input" / "uv_maps") / "uv_maps" / "index.parquet")["face_id"])


def final_generator(project: Path) -> dict[str, Any]:
    import torch

    folder = project / "data" / "06_models" / "detail_generator.pt"
    return torch.load(latest_version(folder) / "detail_generator.pt", map_location="cpu", weights_only=True)["generator"]


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- trials
def kill_trial(reference: Path, trial: Path, pipeline: str, seconds: float, rng: random.Random, scheduler: str,
               seed_from: Path | None = None, during_mlflow_setup: bool = False) -> tuple[bool, str]:
    """One kill -9 + rerun trial; ``seed_from``: copy this project's data/ first (train trials start preprocessed).

    ``during_mlflow_setup``: kill as soon as the MLflow database file (or its temporary build) appears, i.e. while
    MLflow builds its schema (a half-built ``mlruns.db`` used to fail every later run).
    """
    env = make_project(trial, scheduler)
    if seed_from is not None:
        shutil.copytree(seed_from / "data", trial / "data", dirs_exist_ok=True, symlinks=True)
    kill_after = rng.uniform(0.05, 1.0) * seconds
    if during_mlflow_setup:
        watch = lambda: any(trial.glob("*mlruns.db*"))  # noqa: E731
        killed_rc, kill_after, _ = kedro_run(trial, pipeline, env, kill_when=watch)
    else:
        killed_rc, _, _ = kedro_run(trial, pipeline, env, kill_after=kill_after)
    rc, _, log = kedro_run(trial, pipeline, env)
    if rc != 0:
        return False, f"rerun failed (rc {rc}) after a kill at {kill_after:.1f}s: {log[-800:]}"
    problems = version_problems(trial / "data")
    if problems:
        return False, f"broken versions after a kill at {kill_after:.1f}s: {problems[:3]}"
    ids, expected = final_face_ids(trial), final_face_ids(reference)
    if ids != expected or len(set(ids)) != len(ids):
        return False, f"faces differ after a kill at {kill_after:.1f}s: {ids} != {expected}"
    if pipeline == "train" and not same_weights(final_generator(trial), final_generator(reference)):
        return False, f"the resumed model differs from the uninterrupted one (kill at {kill_after:.1f}s)"
    state = "killed" if killed_rc is None else f"finished (rc {killed_rc}) before the kill"
    return True, f"{pipeline}: {state} at {kill_after:.1f}s, rerun ok, {len(ids)} faces, versions intact"


def _enospc_during(save: Callable[[], Any]) -> OSError | Exception:
    """Run ``save`` with ``os.fsync`` raising ENOSPC (the bytes are written, the disk is full before the rename)."""
    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.fsync = full
    try:
        save()
    except Exception as error:  # noqa: BLE001 - the expected outcome
        return error
    finally:
        os.fsync = real
    raise AssertionError("the save did not fail")


def disk_full_trials(folder: Path) -> list[tuple[bool, str]]:
    """One ENOSPC trial per kind of save: shard, versioned file, training checkpoint, cache entry."""
    import numpy as np
    import torch
    from kedro.io.core import Version

    from facedetail.data.shards import read_shard, write_shard
    from facedetail.datasets import NpzBundleDataset
    from facedetail.estimation.cache import FaceCache
    from facedetail.training.checkpoint import load_checkpoint
    from facedetail.utils import atomic_torch_save

    results = []

    def check(kind: str, error: Exception, path: Path, survives: Callable[[], bool]) -> None:
        named = str(path) in str(error)
        ok = named and survives() and not any(p.name.endswith(".tmp") for p in path.parent.iterdir())
        results.append((ok, f"disk full during a {kind} save: error names the file: {named}; previous version loads: "
                            f"{survives()} ({type(error).__name__}: {' '.join(str(error).split())[:160]})"))

    shard = folder / "shards" / "shard-00000.tar"
    write_shard(shard, [{"face_id": "a", "x": np.arange(3)}])
    error = _enospc_during(lambda: write_shard(shard, [{"face_id": "b", "x": np.arange(1000)}]))
    check("shard", error, shard, lambda: [r["face_id"] for r in read_shard(shard)] == ["a"])

    bundle_path = folder / "bundle.npz"
    NpzBundleDataset(filepath=str(bundle_path), version=Version(None, "2026-01-01T00.00.00.000Z")).save({"x": np.arange(3)})
    error = _enospc_during(lambda: NpzBundleDataset(filepath=str(bundle_path), version=Version(None, "2026-01-02T00.00.00.000Z"))
                           .save({"x": np.arange(1000)}))
    check("versioned file", error, bundle_path, lambda: list(NpzBundleDataset(filepath=str(bundle_path), version=Version(None, None))
                                                              .load()["x"]) == [0, 1, 2])

    checkpoint = folder / "checkpoints" / "step_00000002.pt"
    state = {"generator": {"w": torch.ones(2)}, "model_config": {}, "step": 2}
    atomic_torch_save(state, checkpoint)
    error = _enospc_during(lambda: atomic_torch_save({**state, "generator": {"w": torch.zeros(2)}, "step": 3}, checkpoint))
    check("checkpoint", error, checkpoint, lambda: torch.equal(load_checkpoint(checkpoint)["generator"]["w"], torch.ones(2)))

    cache = FaceCache(folder / "cache", "faults", {"settings": 1})
    cache.put("f" * 64, {"c": np.arange(3)})
    error = _enospc_during(lambda: cache.put("f" * 64, {"c": np.arange(1000)}))
    check("cache entry", error, cache.path("f" * 64), lambda: list(cache.get("f" * 64)["c"]) == [0, 1, 2])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kill trials (alternating preprocess / train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default="synchronous", help="synchronous | local (a Dask LocalCluster)")
    parser.add_argument("--folder", default=None, help="where the projects go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the projects")
    parser.add_argument("--mlflow-setup-trials", type=int, default=2,
                        help="of the kill trials, how many (the last ones) kill while MLflow builds its database")
    args = parser.parse_args(argv)
    if not ICT.is_file():
        print(f"ICT-FaceKit model not found at {ICT}", file=sys.stderr)
        return 2
    root = Path(args.folder or tempfile.mkdtemp(prefix="facedetail-faults-"))
    rng = random.Random(args.seed)
    try:
        reference = root / "reference"
        env = make_project(reference, args.scheduler)
        rc, preprocess_seconds, log = kedro_run(reference, "preprocess", env)
        if rc != 0:
            print(log, file=sys.stderr)
            return 1
        seeded = root / "preprocessed"
        shutil.copytree(reference, seeded, symlinks=True)
        rc, train_seconds, log = kedro_run(reference, "train", env)
        if rc != 0:
            print(log, file=sys.stderr)
            return 1
        print(f"uninterrupted: preprocess {preprocess_seconds:.1f}s, train {train_seconds:.1f}s "
              f"({len(final_face_ids(reference))} faces)", flush=True)
        results = []
        for number in range(args.trials):
            pipeline = "preprocess" if number % 2 == 0 else "train"
            seconds = preprocess_seconds if pipeline == "preprocess" else train_seconds
            trial = root / f"trial-{number:02d}"
            mlflow_setup = number >= args.trials - args.mlflow_setup_trials  # the last ones: kill in MLflow's setup
            ok, message = kill_trial(reference, trial, pipeline, seconds, rng, args.scheduler,
                                     seed_from=seeded if pipeline == "train" else None, during_mlflow_setup=mlflow_setup)
            message += " (killed during MLflow's database setup)" if mlflow_setup else ""
            results.append(ok)
            print(f"trial {number:2d} {'survived' if ok else 'FAILED  '}: {message}", flush=True)
            if ok and not args.keep:
                shutil.rmtree(trial, ignore_errors=True)
        disk = disk_full_trials(root / "disk_full")
        for ok, message in disk:
            print(f"{'survived' if ok else 'FAILED  '}: {message}", flush=True)
        print(f"kills survived={sum(results)}/{len(results)} disk_full survived={sum(ok for ok, _ in disk)}/{len(disk)}")
        print(f"survived={sum(results) + sum(ok for ok, _ in disk)}/{len(results) + len(disk)}")
        return 0 if all(results) and all(ok for ok, _ in disk) else 1
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
