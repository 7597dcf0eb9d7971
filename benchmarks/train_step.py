"""Benchmark one detail-training iteration (DetailTrainer.train_step), with a per-stage breakdown.

Two configurations, in this process:

* default: ``conf/base/parameters_train.yml`` with the UV size of ``conf/base/parameters_uv_maps.yml``
  (64) and its batch size (4);
* full-size: ``conf/gpu/parameters_train.yml`` deep-merged over base (as Kedro's ``soft`` merge does),
  UV size 256 from ``conf/gpu/parameters_uv_maps.yml``, but batch size ``--full-batch-size``
  (default 4 instead of 16, so that a CPU step takes seconds, not minutes).

Inputs are synthetic but realistic, built without running the pipelines: ICT face model; plausible
coefficients (neutral identity jitter, expression weights in [0, 0.3], small head rotation,
directional SH light); the photos of ``data/01_raw/faces`` resized to 224 (random images when the
folder is missing); UV maps from :func:`facedetail.geometry.face_uv.face_uv_maps`; the CASIA FaceNet
(converted into a temporary cache) for the perceptual loss. The scenes (coarse geometry, UV bakes,
rasterization) are prepared once, as ``DetailTrainer.fit`` does, and timed separately.

Per step: one warm-up, then ``--steps`` (``--full-steps``) timed steps; medians are reported. Stages
are timed by wrapping the trainer's methods with timers (``render`` = detailed maps + deferred
shading forward; ``G backward`` runs through all of the generator-side forward stages).
The LAST line is ``default_seconds_per_step=<x>``.

Usage (from the repository root)::

    python benchmarks/train_step.py [--device cpu] [--threads 2] [--steps 3] [--full-steps 2] [--full-batch-size 4] [--skip-full]

``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before importing torch: OpenMP's busy
waiting makes multi-threaded ops on a shared, busy CPU much slower.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see docstring

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from facedetail.geometry.face_model import FaceModel, load_face_model  # noqa: E402
from facedetail.geometry.face_uv import face_uv_maps  # noqa: E402
from facedetail.models.facenet import load_face_embedder  # noqa: E402
from facedetail.training.loop import DetailTrainer, FaceTensors  # noqa: E402
from facedetail.utils import resolve_device  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ICT_PATH = REPO_ROOT.parent / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
PHOTO_FOLDER = REPO_ROOT / "data" / "01_raw" / "faces"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
IMAGE_SIZE = 224
DIRECTIONAL_GAMMA = [0.0, 0.0, 0.3, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0]  # per colour channel, SH order 0..8


# ----------------------------------------------------------------------------- configuration
def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as a dict (clear error when missing)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    return dict(yaml.safe_load(path.read_text()) or {})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base`` key by key (nested dicts merged, anything else replaced)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def train_configs(full_batch_size: int) -> dict[str, tuple[dict[str, Any], int]]:
    """Name -> (train config, UV size) for the default (base) and full-size (gpu over base) settings."""
    conf = REPO_ROOT / "conf"
    base_train = read_yaml(conf / "base" / "parameters_train.yml")["train"]
    base_uv = read_yaml(conf / "base" / "parameters_uv_maps.yml")["uv_maps"]
    gpu_train = deep_merge(base_train, read_yaml(conf / "gpu" / "parameters_train.yml")["train"])
    gpu_uv = deep_merge(base_uv, read_yaml(conf / "gpu" / "parameters_uv_maps.yml")["uv_maps"])
    gpu_train["batch_size"] = int(full_batch_size)
    return {"default": (base_train, int(base_uv["uv_size"])), "full_size": (gpu_train, int(gpu_uv["uv_size"]))}


# ----------------------------------------------------------------------------- synthetic inputs
def plausible_coefficients(face_model: FaceModel, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, K) coefficients: identity ~ N(0, 0.5), expressions in [0, 0.3], small rotation, directional light."""
    slices = face_model.layout.slices
    coefficients = face_model.layout.zeros(count)
    coefficients[:, slices["id"]] = 0.5 * torch.randn(count, face_model.layout.n_id, generator=generator)
    coefficients[:, slices["exp"]] = 0.3 * torch.rand(count, face_model.layout.n_exp, generator=generator)
    coefficients[:, slices["angles"]] = 0.08 * torch.randn(count, 3, generator=generator)
    gamma = torch.tensor(DIRECTIONAL_GAMMA * 3).expand(count, -1)
    coefficients[:, slices["gamma"]] = gamma + 0.02 * torch.randn(count, gamma.shape[1], generator=generator)
    return coefficients


def photos(count: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """(count, 3, 224, 224) images in [0, 1]: the sample photos resized (cycled), else uniform noise."""
    paths = sorted(p for p in PHOTO_FOLDER.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if PHOTO_FOLDER.is_dir() else []
    if not paths:
        return torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), "random noise"
    images = []
    for k in range(count):
        with Image.open(paths[k % len(paths)]) as image:
            resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(images), f"{len(paths)} photos of {PHOTO_FOLDER} resized to {IMAGE_SIZE}"


def synthetic_faces(face_model: FaceModel, count: int, uv_size: int, seed: int) -> tuple[FaceTensors, str]:
    """FaceTensors of ``count`` synthetic faces with UV maps baked by ``face_uv_maps``."""
    generator = torch.Generator().manual_seed(seed)
    coefficients = plausible_coefficients(face_model, count, generator)
    images, source = photos(count, generator)
    maps = face_uv_maps(face_model, coefficients, images, size=uv_size)
    masks = torch.ones(count, 1, IMAGE_SIZE, IMAGE_SIZE)
    faces = FaceTensors(
        [f"synthetic_{k}" for k in range(count)],
        images,
        masks,
        coefficients,
        maps["uv_textures"].float(),
        maps["texture_valid"].float().reshape(count, 1, uv_size, uv_size),
        maps["expression_maps"].float(),
    )
    return faces, source


# ----------------------------------------------------------------------------- stage timers
class StageTimer:
    """Accumulates wall time per stage name; wrapped callables add to the stage the namer returns."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.g_phase = True  # True until the generator's optimizer step of the current train_step
        self.restore: list[Callable[[], None]] = []

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the body into stage ``name``."""
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, owner: Any, attribute: str, namer: Callable[[], str]) -> None:
        """Replace ``owner.attribute`` by a timed call (undone by :meth:`unwrap_all`)."""
        original = getattr(owner, attribute)
        had_own = attribute in vars(owner)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(namer()):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        self.restore.append((lambda: setattr(owner, attribute, original)) if had_own else (lambda: delattr(owner, attribute)))

    def unwrap_all(self) -> None:
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()

    def reset(self) -> None:
        self.seconds = defaultdict(float)
        self.g_phase = True


def instrument(trainer: DetailTrainer, timer: StageTimer) -> None:
    """Wrap the trainer's stages (and ``Tensor.backward``) with timers."""
    def phase(g_name: str, d_name: str) -> Callable[[], str]:
        return lambda: g_name if timer.g_phase else d_name

    timer.wrap(trainer, "losses", lambda: "losses (G forward, total)")
    timer.wrap(trainer.generator, "forward", lambda: "generator forward")
    timer.wrap(trainer.renderer, "detailed_maps", lambda: "render: detailed maps")
    timer.wrap(trainer.renderer, "render", lambda: "render: shading")
    if trainer.embedder is not None:
        timer.wrap(trainer.embedder, "forward", lambda: "perceptual: FaceNet forward")
    timer.wrap(trainer.discriminator, "forward", phase("discriminator forward (G adversarial)", "D step: forward real+fake"))
    timer.wrap(torch.Tensor, "backward", phase("G backward", "D step: backward"))
    time_optimizer_step(trainer.opt_g, "G optimizer step", timer, after=lambda: setattr(timer, "g_phase", False))
    time_optimizer_step(trainer.opt_d, "D step: optimizer step", timer)


def time_optimizer_step(
    optimizer: torch.optim.Optimizer, name: str, timer: StageTimer, after: Callable[[], None] | None = None
) -> None:
    """Time ``optimizer.step`` with step hooks (replacing ``step`` would upset the LR scheduler); ``after`` runs once it is done."""
    started: list[float] = []

    def pre_hook(*_: Any) -> None:
        timer.synchronize()
        started.append(time.perf_counter())

    def post_hook(*_: Any) -> None:
        timer.synchronize()
        timer.seconds[name] += time.perf_counter() - started.pop()
        if after is not None:
            after()

    handles = [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
    timer.restore.extend(handle.remove for handle in handles)


TABLE_ROWS = [
    # (label, stage names summed, indent)
    ("render (detailed maps + shading, forward)", ["render: detailed maps", "render: shading"], 1),
    ("generator forward (embedding + DRConv)", ["generator forward"], 1),
    ("perceptual (FaceNet forward x2)", ["perceptual: FaceNet forward"], 1),
    ("discriminator forward (G adversarial)", ["discriminator forward (G adversarial)"], 1),
    ("other loss terms + compositing", ["@losses_other"], 1),
    ("losses (G forward, total)", ["losses (G forward, total)"], 0),
    ("G backward (through all of the above)", ["G backward"], 0),
    ("G optimizer step", ["G optimizer step"], 0),
    ("discriminator step (fwd real+fake, bwd, Adam)", ["D step: forward real+fake", "D step: backward", "D step: optimizer step"], 0),
    ("rest (grad clipping, metrics)", ["@rest"], 0),
    ("train_step total", ["@total"], 0),
]
INNER_LOSS_STAGES = ["render: detailed maps", "render: shading", "generator forward", "perceptual: FaceNet forward",
                     "discriminator forward (G adversarial)"]
TOP_STAGES = ["losses (G forward, total)", "G backward", "G optimizer step", "D step: forward real+fake", "D step: backward",
              "D step: optimizer step"]


def with_derived(seconds: Mapping[str, float], total: float) -> dict[str, float]:
    """Stage seconds plus the derived ``@losses_other``, ``@rest`` and ``@total``."""
    out = dict(seconds)
    out["@losses_other"] = seconds.get("losses (G forward, total)", 0.0) - sum(seconds.get(n, 0.0) for n in INNER_LOSS_STAGES)
    out["@rest"] = total - sum(seconds.get(n, 0.0) for n in TOP_STAGES)
    out["@total"] = total
    return out


# ----------------------------------------------------------------------------- benchmark
def benchmark_config(
    name: str, config: dict[str, Any], uv_size: int, face_model: FaceModel, embedder: torch.nn.Module, device: torch.device,
    steps: int, seed: int,
) -> float:
    """Print the breakdown of one configuration; returns the median seconds per train step."""
    batch_size = int(config["batch_size"])
    start = time.perf_counter()
    faces, source = synthetic_faces(face_model, batch_size, uv_size, seed)
    faces = faces.to(device)
    setup_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    trainer = DetailTrainer(face_model, embedder, config, uv_size, device, backend=str(config.get("backend", "auto")))
    n_generator = sum(p.numel() for p in trainer.generator.parameters())
    n_discriminator = sum(p.numel() for p in trainer.discriminator.parameters())
    model, disc = config["model"], config["discriminator"]
    print(f"\n[{name}] batch={batch_size} uv={uv_size} image={IMAGE_SIZE} ngf={model['ngf']} num_downs={model['num_downs']} "
          f"regions={model['regions']} ndf={disc['ndf']} n_layers={disc['n_layers']} G_params={n_generator / 1e6:.2f}M "
          f"D_params={n_discriminator / 1e6:.2f}M amp={trainer.use_amp}")
    print(f"[{name}] inputs: {source}; UV maps baked in {setup_seconds:.1f} s")

    prepare_times = []
    for _ in range(max(3, steps) if uv_size <= 64 else 1):
        timer = StageTimer(device)
        with timer.section("prepare"):
            scene = trainer.prepare_scenes(faces)
        prepare_times.append(timer.seconds["prepare"])

    timer = StageTimer(device)
    instrument(trainer, timer)
    per_step: list[dict[str, float]] = []
    try:
        for step in range(steps + 1):  # step 0 is the warm-up
            timer.reset()
            timer.synchronize()
            tic = time.perf_counter()
            metrics = trainer.train_step(faces, step, scene)
            timer.synchronize()
            total = time.perf_counter() - tic
            if metrics is None:
                print(f"[{name}] step {step}: non-finite loss, step skipped")
            if step > 0:
                per_step.append(with_derived(timer.seconds, total))
    finally:
        timer.unwrap_all()

    totals = [s["@total"] for s in per_step]
    median_total = statistics.median(totals)
    print(f"[{name}] scene preparation (once per face set, not per step): {statistics.median(prepare_times):.3f} s "
          f"for {batch_size} faces")
    print(f"[{name}] {'stage':<48} {'seconds':>9} {'% step':>7}   (median of {steps} steps after 1 warm-up)")
    for label, stage_names, indent in TABLE_ROWS:
        values = [sum(s.get(n, 0.0) for n in stage_names) for s in per_step]
        value = statistics.median(values)
        print(f"[{name}] {'  ' * indent + label:<48} {value:9.3f} {100 * value / median_total:6.1f}%")
    print(f"[{name}] steps_s={[round(t, 3) for t in totals]} seconds_per_step={median_total:.3f} "
          f"faces_per_second={batch_size / median_total:.2f}")
    return median_total


def main() -> None:
    """Parse arguments, run both configurations, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the default config (median)")
    parser.add_argument("--full-steps", type=int, default=2, help="timed steps of the full-size config (median)")
    parser.add_argument("--full-batch-size", type=int, default=4, help="full-size batch (conf/gpu: 16; 4 keeps CPU steps short)")
    parser.add_argument("--skip-full", action="store_true", help="only the default config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ict-path", type=Path, default=DEFAULT_ICT_PATH)
    args = parser.parse_args()
    if args.steps < 1 or args.full_steps < 1:
        parser.error("--steps and --full-steps must be >= 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={torch.get_num_threads()} load_average_1min={load:.1f} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    face_model = load_face_model("ict", args.ict_path, device=device)
    configs = train_configs(args.full_batch_size)
    with tempfile.TemporaryDirectory(prefix="facedetail_bench_train_") as tmp:
        start = time.perf_counter()
        embedder, source = load_face_embedder(None, cache_path=Path(tmp) / "facenet.pt", device=device)
        print(f"facenet: {source} (converted in {time.perf_counter() - start:.1f} s, not counted)")
        default_seconds = benchmark_config("default", *configs["default"], face_model, embedder, device, args.steps, args.seed)
        if not args.skip_full:
            full_seconds = benchmark_config("full_size", *configs["full_size"], face_model, embedder, device, args.full_steps, args.seed)
            print(f"\nfull_size / default seconds per step: {full_seconds / default_seconds:.1f}x "
                  f"(full-size batch {args.full_batch_size}, conf/gpu uses 16)")
    print(f"default_seconds_per_step={default_seconds:.3f}")


if __name__ == "__main__":
    main()
