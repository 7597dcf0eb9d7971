"""Self-supervised training of the detail generator (paper section 2.5).

Per step: the generator turns each face's UV texture into an attribute embedding and, through
DRConv on the expression map, a displacement map; the detailed normal map is rendered with the
coarse mesh's lighting and de-lit albedo; the losses are

* masked photometric (render vs. photo inside the estimation mask and the model's face region),
* FaceNet perceptual (cosine distance of embeddings of the photo and the photo with the face
  replaced by the detailed render),
* LSGAN adversarial (conditional PatchGAN: coarse render + {photo | detailed render}),
* detail regularisation (Eq. 2, mean point distance coarse vs. detailed surface) whose weight
  decays on the schedule ``detail_regularization``.

The module knows nothing of Kedro or MLflow: logging goes through the ``log_metrics`` and
``log_images`` callbacks.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from facedetail.geometry.detail import displacement_regularization_points
from facedetail.geometry.face_model import FaceModel
from facedetail.losses.adversarial import lsgan_d_loss, lsgan_g_loss
from facedetail.losses.perceptual import perceptual_cosine_loss
from facedetail.losses.photometric import masked_photometric_loss
from facedetail.losses.regularization import detail_regularization
from facedetail.losses.schedules import weight_at
from facedetail.models.detail_model import DetailGenerator
from facedetail.models.discriminator import build_discriminator
from facedetail.training.checkpoint import (
    CheckpointLock,
    atomic_torch_save,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    pack_history,
    prune_checkpoints,
    restore_rng_state,
    unpack_history,
)
from facedetail.render.detail import DetailRenderer, FaceBatchScene
from facedetail.utils import settings_hash

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[Mapping[str, float], int], None]
ImagesCallback = Callable[[str, np.ndarray, int], None]


class TrainingError(RuntimeError):
    """Training cannot go on (empty data, persistent non-finite losses, inconsistent inputs)."""


@dataclass
class FaceTensors:
    """Per-face training inputs, all indexed like ``face_ids``.

    images (N, 3, H, W) in [0, 1]; masks (N, 1, H, W) in {0, 1}; coefficients (N, K);
    uv_textures (N, 3, S, S) in [0, 1]; texture_valid (N, 1, S, S); expression_maps (N, 3, S, S).
    Large sets may keep compact dtypes (uint8 images/textures, bool masks, float16 maps: a quarter
    of the memory); :meth:`as_float` converts one batch at a time.
    """

    face_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    coefficients: torch.Tensor
    uv_textures: torch.Tensor
    texture_valid: torch.Tensor
    expression_maps: torch.Tensor

    def __len__(self) -> int:
        return len(self.face_ids)

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> "FaceTensors":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return FaceTensors(
            [self.face_ids[i] for i in index.tolist()],
            self.images[index],
            self.masks[index],
            self.coefficients[index],
            self.uv_textures[index],
            self.texture_valid[index],
            self.expression_maps[index],
        )

    def as_float(self) -> "FaceTensors":
        """The same faces as float32 tensors in the documented ranges (uint8 images/textures / 255)."""

        def unit(t: torch.Tensor) -> torch.Tensor:
            return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()

        return FaceTensors(
            self.face_ids, unit(self.images), self.masks.float(), self.coefficients.float(),
            unit(self.uv_textures), self.texture_valid.float(), self.expression_maps.float(),
        )

    def to(self, device: torch.device) -> "FaceTensors":
        return FaceTensors(
            self.face_ids,
            *(t.to(device) for t in (self.images, self.masks, self.coefficients, self.uv_textures, self.texture_valid, self.expression_maps)),
        )


def validation_split(face_keys: list[str], fraction: float, seed: int, threshold_from: int = 100) -> np.ndarray:
    """A seeded, content-based split: ``True`` = validation face.

    Each face gets a score from the hash of ``seed:key``. With ``threshold_from`` faces or more, a
    face is in validation when its score is below ``fraction``, so adding faces never moves
    another face across the split. Smaller sets take exactly ``round(fraction * n)`` faces (the
    lowest scores; at least one on each side when there are two faces or more), so a tiny sample
    is not split at random proportions.
    """
    scores = np.array([int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) / 16**12 for k in face_keys])
    n = len(face_keys)
    if n >= threshold_from:
        return scores < fraction
    is_val = np.zeros(n, bool)
    if n >= 2 and fraction > 0:
        k = min(n - 1, max(1, int(round(fraction * n))))
        is_val[np.argsort(scores)[:k]] = True
    return is_val


@dataclass
class TrainingResult:
    generator: DetailGenerator
    history: list[dict[str, float]] = field(default_factory=list)
    final_step: int = 0
    resumed_from: int | None = None
    checkpoint: Path | None = None


class DetailTrainer:
    """LSGAN training of :class:`DetailGenerator` with checkpoints and resume.

    Args:
        face_model: morphable model of the coefficients.
        embedder: frozen FaceNet (``(B,3,H,W)`` in [0, 1] -> unit embeddings), or ``None`` to drop
            the perceptual term (its weight must then be 0).
        config: the ``train`` parameters (see ``conf/base/parameters_train.yml``).
        uv_size: side of the UV maps.
        device: torch device.
        log_metrics, log_images: optional callbacks.
    """

    def __init__(
        self,
        face_model: FaceModel,
        embedder: torch.nn.Module | None,
        config: Mapping[str, Any],
        uv_size: int,
        device: torch.device,
        log_metrics: MetricsCallback | None = None,
        log_images: ImagesCallback | None = None,
        backend: str = "auto",
    ) -> None:
        self.config = dict(config)
        self.device = device
        self.face_model = face_model.to(device)
        self.embedder = embedder.to(device).eval() if embedder is not None else None
        self.uv_size = int(uv_size)
        self.weights = dict(config.get("loss_weights", {}))
        if self.embedder is None and self.weights.get("perceptual", 0.0) > 0:
            raise TrainingError("the perceptual loss weight is > 0 but no FaceNet embedder was given")
        self.renderer = DetailRenderer(
            self.face_model, self.uv_size, int(config.get("image_size", 224)), backend, float(config.get("albedo_blur_sigma", 2.0))
        )
        model_config = dict(config["model"])
        self.generator = DetailGenerator.from_config(model_config).to(device)
        self.discriminator = build_discriminator(dict(config["discriminator"])).to(device)
        betas = tuple(config["optimizer"].get("betas", (0.5, 0.999)))
        lr = float(config["optimizer"]["lr"])
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        total = max(1, int(config["steps"]))
        decay = float(config["optimizer"].get("lr_decay_final", 1.0))
        lambda_fn = lambda step: 1.0 - (1.0 - decay) * min(step, total) / total  # noqa: E731 - linear decay
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda_fn)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda_fn)
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.log_images = log_images or (lambda name, image, step: None)
        self.use_amp = bool(config.get("mixed_precision", True)) and device.type == "cuda"
        self.checkpoint_root = Path(config.get("checkpoint_dir", "data/06_models/checkpoints"))
        self.checkpoint_dir = self.checkpoint_root  # set per training set in fit()
        self.sampler = torch.Generator().manual_seed(int(config.get("seed", 0)))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, step: int) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "step": step,
            "model_config": self.generator.config,
            "uv_size": self.uv_size,
            "face_model_kind": self.face_model.kind,
            "rng": capture_rng_state(),
            "sampler": self.sampler.get_state(),
        }

    def save_checkpoint(self, step: int, completed: bool = False) -> Path:
        # the history rows so far travel with the checkpoint: a resumed run's history holds every step
        history = pack_history(getattr(self, "history", []))
        path = atomic_torch_save({**self.state_dict(step), "completed": completed, "history": history},
                                 checkpoint_path(self.checkpoint_dir, step))
        prune_checkpoints(self.checkpoint_dir, int(self.config.get("keep_checkpoints", 3)))
        return path

    #: Parameters that do not change what is trained (a resumed run may change them).
    NON_TRAINING_KEYS = ("log_every", "image_log_every", "checkpoint_every", "keep_checkpoints", "checkpoint_dir", "resume",
                         "registered_model_name", "nan_tolerance", "validation_fraction", "split_seed", "log_checkpoint_artifact")

    def run_key(self, train: FaceTensors) -> str:
        """Hash of everything that defines a training run: settings, face model, UV size and training faces."""
        settings = {k: v for k, v in self.config.items() if k not in self.NON_TRAINING_KEYS}
        return settings_hash({"train": settings, "uv_size": self.uv_size, "kind": self.face_model.kind, "faces": sorted(train.face_ids)})

    def try_resume(self) -> int:
        """Load the latest checkpoint of an interrupted run with the same key; returns the step to start from.

        A run that reached its last step saved a ``completed`` checkpoint: starting it again trains anew.
        """
        self.resumed_history: list[dict[str, float]] = []
        if not self.config.get("resume", True):
            return 0
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return 0
        state = load_checkpoint(path, map_location=self.device)
        if state.get("completed", False):
            logger.info("the previous run with these settings completed (%s): training anew", path)
            for old in self.checkpoint_dir.glob("step_*.pt"):
                old.unlink(missing_ok=True)
            return 0
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        restore_rng_state(state["rng"])
        self.sampler.set_state(state["sampler"].cpu())
        self.resumed_history = unpack_history(state.get("history"))  # absent in older checkpoints
        logger.info("resumed detail training from %s (step %d)", path, state["step"])
        return int(state["step"])

    # ------------------------------------------------------------------ one step
    def _batches(self, n_faces: int, batch_size: int):
        while True:
            for index in torch.randperm(n_faces, generator=self.sampler).split(batch_size):
                yield index

    def prepare_scenes(self, data: FaceTensors, chunk: int = 8) -> FaceBatchScene:
        """The fixed coarse geometry, UV bakes and rasterization of every face, computed once."""
        scenes = [
            self.renderer.prepare(part.coefficients, part.uv_textures, part.texture_valid)
            for part in (data.subset(index).to(self.device).as_float() for index in torch.arange(len(data)).split(chunk))
        ]
        return FaceBatchScene.concatenate(scenes)

    def losses(
        self, batch: FaceTensors, step: int, scene: FaceBatchScene | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Generator-side losses of one batch and the tensors needed for D and logging."""
        if scene is None:
            scene = self.renderer.prepare(batch.coefficients, batch.uv_textures, batch.texture_valid)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out = self.generator(batch.uv_textures, batch.texture_valid, batch.expression_maps)
        displacement = out["displacement"].float()
        detailed_positions, detailed_normals = self.renderer.detailed_maps(scene, displacement)
        with torch.no_grad():
            coarse = self.renderer.render(scene, scene.normal_map)
        detailed = self.renderer.render(scene, detailed_normals)
        mask = scene.render_mask * batch.masks
        # Outside the mask the photo itself: the perceptual and adversarial terms judge whole faces.
        real = batch.images
        detailed_full = mask * detailed + (1 - mask) * real
        coarse_full = mask * coarse + (1 - mask) * real
        terms: dict[str, torch.Tensor] = {"photometric": masked_photometric_loss(detailed, real, mask)}
        if self.embedder is not None and self.weights.get("perceptual", 0.0) > 0:
            with torch.no_grad():
                real_embedding = self.embedder(real)
            terms["perceptual"] = perceptual_cosine_loss(self.embedder(detailed_full), real_embedding)
        if self.weights.get("adversarial", 0.0) > 0:
            condition = coarse_full if self.config["discriminator"].get("conditional", True) else None
            terms["adversarial"] = lsgan_g_loss(self.discriminator(detailed_full, condition))
        coarse_points, refined_points = displacement_regularization_points(scene.position_map, detailed_positions, scene.uv_valid)
        terms["detail_regularization"] = detail_regularization(coarse_points, refined_points)
        weights = {name: float(self.weights.get(name, 0.0)) for name in terms}
        weights["detail_regularization"] = weight_at(step, self.config["detail_regularization"])
        terms["total"] = sum(weights[name] * value for name, value in terms.items())
        extras = {
            "images": real,
            "coarse": coarse,
            "detailed": detailed,
            "coarse_full": coarse_full.detach(),
            "detailed_full": detailed_full,
            "displacement": displacement,
            "embedding": out["embedding"].float(),
            "mask": mask,
            "scene": scene,
            "detailed_normals": detailed_normals,
            "weights": {f"weight_{k}": v for k, v in weights.items()},
        }
        return terms, extras

    def train_step(self, batch: FaceTensors, step: int, scene: FaceBatchScene | None = None) -> dict[str, float] | None:
        """One generator and one discriminator update; ``None`` when the step was skipped (non-finite)."""
        self.generator.train()
        self.discriminator.train()
        terms, extras = self.losses(batch, step, scene)
        if not torch.isfinite(terms["total"]):
            self.opt_g.zero_grad(set_to_none=True)
            logger.warning("step %d: non-finite loss %s, step skipped", step, {k: float(v.detach()) for k, v in terms.items()})
            return None
        self.opt_g.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 10.0)
        self.opt_g.step()
        metrics = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        if self.weights.get("adversarial", 0.0) > 0:
            condition = extras["coarse_full"] if self.config["discriminator"].get("conditional", True) else None
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                d_real = self.discriminator(batch.images, condition)
                d_fake = self.discriminator(extras["detailed_full"].detach(), condition)
            d_loss = lsgan_d_loss(d_real.float(), d_fake.float())
            if torch.isfinite(d_loss):
                self.opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                self.opt_d.step()
            metrics["loss_discriminator"] = float(d_loss.detach())
            self.sched_d.step()
        self.sched_g.step()
        metrics["learning_rate"] = float(self.opt_g.param_groups[0]["lr"])
        metrics.update(extras["weights"])
        metrics["displacement_abs_mean"] = float(extras["displacement"].detach().abs().mean())
        self._last_extras = extras
        return metrics

    @torch.no_grad()
    def evaluate(self, data: FaceTensors, batch_size: int) -> dict[str, float]:
        """Mean validation losses (photometric coarse vs. detailed) without updating anything."""
        self.generator.eval()
        sums: dict[str, float] = {}
        for index in torch.arange(len(data)).split(batch_size):
            batch = data.subset(index).to(self.device).as_float()
            terms, extras = self.losses(batch, step=int(self.config["steps"]))
            coarse_error = masked_photometric_loss(extras["coarse"], batch.images, extras["mask"])
            values = {"val_photometric_detailed": float(terms["photometric"]), "val_photometric_coarse": float(coarse_error)}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value * len(index)
        return {key: value / len(data) for key, value in sums.items()}

    # ------------------------------------------------------------------ loop
    def fit(self, train: FaceTensors, validation: FaceTensors | None = None) -> TrainingResult:
        """Train for ``config['steps']`` steps (resuming from this configuration's last checkpoint).

        The run holds :class:`CheckpointLock` on its checkpoint folder: a concurrent run with the same settings
        fails with :class:`CheckpointLockedError` instead of resuming from this run's live checkpoints.
        """
        with CheckpointLock(self.checkpoint_root / self.run_key(train)):
            return self._fit(train, validation)

    def _fit(self, train: FaceTensors, validation: FaceTensors | None = None) -> TrainingResult:
        if len(train) == 0:
            raise TrainingError("the training set is empty: no face passed data_prep/estimation (see the manifest)")
        steps = int(self.config["steps"])
        batch_size = min(int(self.config["batch_size"]), len(train))
        self.checkpoint_dir = self.checkpoint_root / self.run_key(train)
        start = self.try_resume()
        result = TrainingResult(self.generator, history=self.resumed_history, resumed_from=start or None)
        self.history = result.history  # saved with each checkpoint
        validation = validation if validation is not None and len(validation) else None  # batches move to the device
        batches = self._batches(len(train), batch_size)
        scenes = self.prepare_scenes(train) if len(train) <= int(self.config.get("scene_cache_faces", 512)) else None
        nan_streak, nan_tolerance = 0, int(self.config.get("nan_tolerance", 5))
        log_every, image_every = int(self.config.get("log_every", 10)), int(self.config.get("image_log_every", 100))
        checkpoint_every = int(self.config.get("checkpoint_every", 100))
        progress = tqdm(range(start, steps), initial=start, total=steps, desc="train detail", unit="step", dynamic_ncols=True)
        step = start
        for step in progress:
            tic = time.perf_counter()
            index = next(batches)
            batch = train.subset(index).to(self.device).as_float()
            metrics = self.train_step(batch, step, scenes.select(index.to(self.device)) if scenes is not None else None)
            if metrics is None:
                nan_streak += 1
                if nan_streak > nan_tolerance:
                    raise TrainingError(
                        f"{nan_streak} consecutive steps had non-finite losses (tolerance {nan_tolerance}); "
                        f"last good checkpoint: {latest_checkpoint(self.checkpoint_dir)}"
                    )
                continue
            nan_streak = 0
            metrics["seconds_per_step"] = time.perf_counter() - tic
            result.history.append({"step": step, **metrics})
            progress.set_postfix(total=f"{metrics['loss_total']:.4f}", photo=f"{metrics['loss_photometric']:.4f}")
            if step % log_every == 0 or step == steps - 1:
                self.log_metrics(metrics, step)
            if step % image_every == 0 or step == steps - 1:
                self.log_images("train_grid", self.image_grid(self._last_extras["images"], self._last_extras), step)
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                self.save_checkpoint(step + 1)
        if validation is not None:
            val_metrics = self.evaluate(validation, batch_size)
            self.log_metrics(val_metrics, steps)
            result.history.append({"step": steps, **val_metrics})
        result.final_step = steps
        result.checkpoint = self.save_checkpoint(steps, completed=True)
        return result

    # ------------------------------------------------------------------ visualisation
    @staticmethod
    def image_grid(images: torch.Tensor, extras: Mapping[str, Any], max_rows: int = 4) -> np.ndarray:
        """Rows of: input | coarse render | detailed render | displacement map | attribute embedding."""
        return make_image_grid(images, extras["coarse_full"], extras["detailed_full"], extras["displacement"], extras["embedding"], max_rows)


def colorize_displacement(displacement: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) signed displacement -> (B, 3, S, S) blue (in) / white / red (out), per-map scale."""
    scale = displacement.abs().flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    x = (displacement / scale).clamp(-1, 1)
    red = torch.where(x > 0, torch.ones_like(x), 1 + x)
    blue = torch.where(x < 0, torch.ones_like(x), 1 - x)
    green = 1 - x.abs()
    return torch.cat([red, green, blue], 1)


def embedding_to_rgb(embedding: torch.Tensor) -> torch.Tensor:
    """First three principal components of an embedding (B, E, S, S) as RGB in [0, 1] (Fig. 3 style)."""
    batch, channels, height, width = embedding.shape
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, channels).float()
    flat = flat - flat.mean(0, keepdim=True)
    if channels >= 3:
        _, _, v = torch.linalg.svd(flat[:: max(1, flat.shape[0] // 4096)], full_matrices=False)
        proj = flat @ v[:3].T
    else:
        proj = torch.cat([flat, flat.new_zeros(flat.shape[0], 3 - channels)], 1)
    lo, hi = proj.amin(0, keepdim=True), proj.amax(0, keepdim=True)
    proj = (proj - lo) / (hi - lo).clamp_min(1e-8)
    return proj.reshape(batch, height, width, 3).permute(0, 3, 1, 2)


def make_image_grid(
    images: torch.Tensor,
    coarse: torch.Tensor,
    detailed: torch.Tensor,
    displacement: torch.Tensor,
    embedding: torch.Tensor,
    max_rows: int = 4,
) -> np.ndarray:
    """uint8 (rows*H, 5*W, 3) grid: input | coarse | detailed | displacement | embedding."""
    rows = min(max_rows, images.shape[0])
    size = images.shape[-1]
    resize = lambda x: torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    columns = [images[:rows], coarse[:rows], detailed[:rows], resize(colorize_displacement(displacement[:rows])), resize(embedding_to_rgb(embedding[:rows]))]
    grid = torch.cat([torch.cat([c.detach().float().cpu().clamp(0, 1) for c in columns], dim=3)[i] for i in range(rows)], dim=1)
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")
