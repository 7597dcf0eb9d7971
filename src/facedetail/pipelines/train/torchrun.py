"""Multi-process (DDP) detail training, launched with ``torchrun`` from the Kedro project folder.

    torchrun --nproc_per_node=2 -m facedetail.pipelines.train.torchrun -- --env gpu
    torchrun --nproc_per_node=4 -m facedetail.pipelines.train.torchrun -- --params train.steps=2000,train.batch_size=64
    # on the CPU (gloo), e.g. to check a set-up:
    FACEDETAIL_DEVICE=cpu torchrun --nproc_per_node=2 -m facedetail.pipelines.train.torchrun

Every rank bootstraps the Kedro project in the working directory (or ``--project-path``), loads
the parameters and the latest versions of the four shard datasets (``aligned_faces``,
``face_masks``, ``face_coefficients``, ``uv_maps``) from the catalog, and trains its share of
every global batch (``train.batch_size`` is the GLOBAL batch; it must be divisible by the number
of processes). Rank 0 alone logs to MLflow (a run of its own, named ``torchrun-train``), writes
the training checkpoints, saves ``detail_model``, ``training_history`` and ``train_split`` through
the catalog and registers the model (``pipelines.train.nodes.register_model``). An interrupted
job started again with the same settings resumes from the last checkpoint on every rank.

``kedro run --pipeline=train`` stays single-process and needs none of this.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

STAGE_DATASETS = ("aligned_faces", "face_masks", "face_coefficients", "uv_maps")


def parse_params(text: str | None) -> dict[str, Any]:
    """``a.b=1,c=x`` -> ``{"a": {"b": 1}, "c": "x"}`` (kedro's ``--params`` syntax; values parsed as YAML scalars)."""
    import yaml

    from facedetail.config import set_dotted

    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--params item '{item}' is not key=value")
        set_dotted(out, key.strip(), yaml.safe_load(value))
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if argv[:1] == ["--"]:  # torchrun ... -m module -- --env gpu
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m facedetail.pipelines.train.torchrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=None, help="Kedro configuration environment (e.g. gpu)")
    parser.add_argument("--conf-source", default=None, help="configuration folder (default: the project's conf/)")
    parser.add_argument("--params", default=None, help="runtime parameters, kedro syntax: train.steps=10,train.batch_size=8")
    parser.add_argument("--project-path", default=".", help="Kedro project folder (default: the working directory)")
    parser.add_argument("--device", default=None,
                        help="auto|cpu|cuda (default: $FACEDETAIL_DEVICE, else auto); picks NCCL (CUDA) or gloo (CPU) "
                             "before the configuration is read, and must agree with the 'device' parameter")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank-%(process)d %(name)s %(levelname)s %(message)s")

    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from facedetail.pipelines.train.nodes import (
        MODEL_PARAMETER_GROUPS,
        _mlflow_logging_callbacks,
        _mlflow_set_tags,
        detail_model_of,
        register_model,
    )
    from facedetail.tracking import process_tags, run_name
    from facedetail.training.run import run_training
    from facedetail.training.distributed import barrier, cleanup, init_distributed
    from facedetail.utils import resolve_device

    project = Path(args.project_path).resolve()
    bootstrap_project(project)
    session_kwargs: dict[str, Any] = {"project_path": project, "env": args.env, "runtime_params": parse_params(args.params)}
    if args.conf_source:
        session_kwargs["conf_source"] = str(Path(args.conf_source).resolve())
    ctx = init_distributed(args.device or os.environ.get("FACEDETAIL_DEVICE", "auto"))
    with KedroSession.create(**session_kwargs) as session:
        # kedro-mlflow's hook sets up the tracking store here: rank 0 first (a fresh sqlite store is
        # created and migrated once), then the others
        if not ctx.is_main:
            barrier(ctx)
        context = session.load_context()
        if ctx.is_main:
            barrier(ctx)
        params = context.params
        configured = resolve_device(params.get("device", "auto"))
        if configured.type != ctx.device.type:
            raise SystemExit(f"the 'device' parameter resolves to {configured} but this job runs on {ctx.device} "
                             "(set FACEDETAIL_DEVICE or --device to the same device)")
        try:
            catalog = context.catalog
            stages = [catalog.load(name) for name in STAGE_DATASETS]
            train_params = dict(params["train"])
            run = mlflow.start_run(run_name=run_name(["torchrun-train"])) if ctx.is_main else None
            try:
                if ctx.is_main:
                    mlflow.set_tags(process_tags(Path.cwd()))
                    mlflow.set_tags({"launcher": "torchrun", "world_size": str(ctx.world_size), "backend": str(ctx.backend)})
                    mlflow.log_params({f"train.{k}": str(v)[:500] for k, v in train_params.items()})
                log_metrics, log_images = _mlflow_logging_callbacks() if ctx.is_main else (None, None)
                history, split, result = run_training(
                    *stages, train_params, params["face_model"], params.get("weights", {}), int(params.get("seed", 0)), ctx,
                    log_metrics, log_images, _mlflow_set_tags if ctx.is_main else None,
                )
                detail_model = detail_model_of(result, stages[3], params["face_model"], train_params)
                if ctx.is_main:
                    catalog.save("detail_model", detail_model)
                    catalog.save("training_history", history)
                    catalog.save("train_split", split)
                    if train_params.get("log_checkpoint_artifact", True) and result.checkpoint is not None:
                        mlflow.log_artifact(str(result.checkpoint), artifact_path="train/checkpoint")
                    record = register_model(detail_model, history, split, train_params,
                                            *(params.get(group) for group in MODEL_PARAMETER_GROUPS))
                    catalog.save("model_registration", record)
                    logger.info("trained %d steps on %d ranks; registered %s", result.final_step, ctx.world_size, record)
            finally:
                if run is not None:
                    mlflow.end_run()
            barrier(ctx)
        finally:
            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
