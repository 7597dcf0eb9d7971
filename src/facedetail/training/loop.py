"""Self-supervised training of the detail generator (paper section 2.5).

Per step: the generator turns each face's UV texture into an attribute embedding and, through
DRConv on the expression map, a displacement map; the detailed normal map is rendered with the
coarse mesh's lighting and de-lit albedo; the losses are

* masked photometric (render vs. photo inside the estimation mask and the model's face region),
* FaceNet perceptual (cosine distance of embeddings of the photo and the photo with the face
  replaced by the detailed render),
* LSGAN adversarial (conditional PatchGAN: coarse render + {photo | detailed render}),
* detail regularisation (Eq. 2, mean point distance coarse vs. detailed surface) whose weight
  decays on the schedule ``detail_regularization``;
* optional (``loss_weights.uv_photometric`` > 0, default off): the photometric term in UV space (DECA), the
  unwrapped photo vs. albedo x SH(detailed normal map) over the visible face-region texels;
* optional (``loss_weights.gradient_photometric`` > 0, default off): the shading-gradient (high-pass) photometric
  term, image gradients of the detailed render vs the photo inside the mask
  (:func:`~facedetail.losses.photometric.masked_gradient_photometric_loss`).
* optional (``loss_weights.detail_lowpass`` > 0, default off): the mean absolute low-pass (``detail_lowpass_sigma``
  texels) of the displacement, so smooth bulges cost their height and zero-mean wrinkles little.

Albedo (``albedo_shading``): ``coarse`` (default) de-lights the unwrapped photo once with the coarse SH shading;
``detailed`` re-estimates it every step with the CURRENT detailed shading (no gradient through it), so a smooth
displacement's shading is divided back out of the albedo and cannot lower the photometric terms (no smooth
blotches that explain the albedo-estimation residual), while shading finer than ``albedo_blur_sigma`` is left
for the displacement; at the ground truth the estimate is the low-passed true albedo
(:meth:`DetailTrainer.albedo_for`).

The module knows nothing of Kedro or MLflow: logging goes through the ``log_metrics`` and
``log_images`` callbacks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from facedetail.data.faces import FaceTensors, validation_split  # noqa: F401 - re-exported (tests, evaluation)
from facedetail.data.streaming import InMemoryBatches
from facedetail.geometry.detail import delit_albedo, displacement_regularization_points
from facedetail.geometry.face_model import FaceModel
from facedetail.losses.adversarial import lsgan_d_loss, lsgan_g_loss
from facedetail.losses.perceptual import perceptual_cosine_loss
from facedetail.losses.photometric import masked_gradient_photometric_loss, masked_photometric_loss
from facedetail.losses.regularization import detail_regularization, displacement_lowpass_regularization
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
from facedetail.render.shading import irradiance_map
from facedetail.training.distributed import (
    DistContext,
    all_reduce_sum,
    all_true,
    barrier,
    broadcast_object,
    gather_objects,
    single_process,
    wrap_ddp,
)
from facedetail.utils import settings_hash

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[Mapping[str, float], int], None]
ImagesCallback = Callable[[str, np.ndarray, int], None]


class TrainingError(RuntimeError):
    """Training cannot go on (empty data, persistent non-finite losses, inconsistent inputs)."""


class BatchSource(Protocol):
    """What :meth:`DetailTrainer.fit` trains on: ``facedetail.data.streaming.ShardBatches`` or ``InMemoryBatches``.

    ``face_ids``: every face of the split (the same on every rank; part of the run key).
    ``batch_size``: this rank's batch. ``batches(start_step)``: this rank's batches from rank-local
    step ``start_step`` on (one batch per training step, reproducible from the seed: exact resume).
    """

    face_ids: list[str]
    batch_size: int

    def __len__(self) -> int: ...

    def batches(self, start_step: int = 0) -> Iterator[FaceTensors]: ...


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
        log_metrics, log_images: optional callbacks (called on rank 0 only).
        distributed: this process's place in a data-parallel group (:func:`~facedetail.training.distributed.init_distributed`);
            ``None``: a single process. With more than one rank, G and D are wrapped in
            ``DistributedDataParallel``, ``config['batch_size']`` is the GLOBAL batch (each rank
            trains on ``batch_size / world_size`` faces), rank 0 alone logs and writes checkpoints.

    Exact data-parallel maths: gradients are averaged over ranks, so every loss must be a mean of
    equal-weight per-rank parts. LSGAN, perceptual and Eq. 2 terms are per-sample means (equal
    per-rank batches); the masked photometric loss divides by the mask area of the batch, so under
    DDP it is rescaled by ``local area / mean area over ranks`` (giving the global ratio); the
    skip-on-non-finite decision is taken collectively; D sees real and fake in one forward.
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
        distributed: DistContext | None = None,
    ) -> None:
        self.config = dict(config)
        self.device = device
        self.dist = distributed or single_process(device)
        self.world_size, self.rank = self.dist.world_size, self.dist.rank
        if int(config["batch_size"]) % self.world_size:
            raise TrainingError(f"train.batch_size {config['batch_size']} (the global batch) is not divisible by the world size {self.world_size}")
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
        self.seed = int(config.get("seed", 0))
        # DDP broadcasts rank 0's weights; the optimisers hold the same Parameter objects.
        self._g = wrap_ddp(self.generator, self.dist)
        self._d = wrap_ddp(self.discriminator, self.dist)
        if self.dist.enabled:
            torch.manual_seed(self.seed + self.rank)  # per-rank dropout masks (see training.distributed)
        self._scene_cache: dict[str, FaceBatchScene] | None = None
        region = self.renderer.bake(self.renderer.face_region[None].expand(1, -1, -1))
        #: (1, 1, S, S) texels of the model's face region (the optional ``uv_photometric`` term's support)
        self.uv_face_region = ((region > 0.5) & self.renderer.uv_valid.bool()).to(self.renderer.uv_valid.dtype)
        self.albedo_shading = str(config.get("albedo_shading", "coarse"))
        if self.albedo_shading not in ("coarse", "detailed"):
            raise TrainingError(f"train.albedo_shading must be 'coarse' or 'detailed', got {self.albedo_shading!r}")

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
            # the stream position: one batch per step, reproducible from the seed (resume reopens the stream here)
            "stream": {"seed": self.seed, "batches_consumed": step, "world_size": self.world_size},
        }

    def save_checkpoint(self, step: int, completed: bool = False) -> Path | None:
        """Rank 0 writes the checkpoint (with every rank's RNG state and the history so far); a collective."""
        rng_per_rank = gather_objects(capture_rng_state(), self.dist)
        if not self.dist.is_main:
            return None
        # the history rows so far travel with the checkpoint: a resumed run's history holds every step
        state = {**self.state_dict(step), "completed": completed, "rng_per_rank": rng_per_rank,
                 "history": pack_history(getattr(self, "history", []))}
        path = atomic_torch_save(state, checkpoint_path(self.checkpoint_dir, step))
        prune_checkpoints(self.checkpoint_dir, int(self.config.get("keep_checkpoints", 3)))
        return path

    #: Parameters that do not change what is trained (a resumed run may change them).
    NON_TRAINING_KEYS = ("log_every", "image_log_every", "checkpoint_every", "keep_checkpoints", "checkpoint_dir", "resume",
                         "registered_model_name", "nan_tolerance", "validation_fraction", "split_seed", "log_checkpoint_artifact")

    def run_key(self, train: FaceTensors | BatchSource) -> str:
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
        # rank 0 picks the checkpoint, every rank loads that same file
        path = broadcast_object(latest_checkpoint(self.checkpoint_dir) if self.dist.is_main else None, self.dist)
        if path is None:
            return 0
        state = load_checkpoint(path, map_location=self.device)
        if state.get("completed", False):
            logger.info("the previous run with these settings completed (%s): training anew", path)
            barrier(self.dist)  # every rank has read it before rank 0 deletes it
            if self.dist.is_main:
                for old in self.checkpoint_dir.glob("step_*.pt"):
                    old.unlink(missing_ok=True)
            barrier(self.dist)
            return 0
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.world_size:
            restore_rng_state(per_rank[self.rank])
        else:
            restore_rng_state(state["rng"])
            if self.dist.enabled:
                torch.manual_seed(self.seed + 1000 * int(state["step"]) + self.rank)
                logger.warning("checkpoint written by %d ranks resumed on %d: per-rank RNG re-seeded", len(per_rank), self.world_size)
        stream = state.get("stream", {})
        if int(stream.get("seed", self.seed)) != self.seed or int(stream.get("batches_consumed", state["step"])) != int(state["step"]):
            raise TrainingError(f"checkpoint {path} was written by a stream with another seed/position: {stream}")
        self.resumed_history = unpack_history(state.get("history"))  # absent in older checkpoints
        logger.info("resumed detail training from %s (step %d)", path, state["step"])
        return int(state["step"])

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def albedo_for(self, batch: FaceTensors, scene: FaceBatchScene, detailed_normals: torch.Tensor) -> torch.Tensor:
        """The albedo the renders shade (B, 3, S, S): the scene's (coarse de-lighting) or, with
        ``albedo_shading: detailed``, ``blur(unwrapped photo / SH(detailed normals))`` (``albedo_blur_sigma`` texels;
        a constant of the step: no gradient flows through it)."""
        if self.albedo_shading == "coarse":
            return scene.albedo_map
        shading = irradiance_map(detailed_normals.detach(), scene.gamma)
        return delit_albedo(batch.uv_textures, batch.texture_valid * scene.uv_valid, shading, self.renderer.albedo_blur_sigma)

    def cached_scene(self, batch: FaceTensors) -> FaceBatchScene | None:
        """The batch's fixed coarse geometry from the per-face scene cache (``None`` when the cache is off).

        The cache is on for training sets of at most ``scene_cache_faces`` faces (default 512);
        each face is prepared alone, so its scene does not depend on which faces shared its batch.
        """
        if self._scene_cache is None:
            return None
        for i, face_id in enumerate(batch.face_ids):
            if face_id not in self._scene_cache:
                one = batch.subset([i])
                self._scene_cache[face_id] = self.renderer.prepare(one.coefficients, one.uv_textures, one.texture_valid)
        return FaceBatchScene.concatenate([self._scene_cache[f] for f in batch.face_ids])

    def _as_source(self, data: FaceTensors | BatchSource, infinite: bool) -> BatchSource:
        """A batch source: in-memory faces get this rank's share of the global batch."""
        if hasattr(data, "batches"):
            return data  # type: ignore[return-value]
        global_batch = int(self.config["batch_size"])
        if self.world_size == 1:
            global_batch = min(global_batch, max(1, len(data)))
        return InMemoryBatches(data, global_batch // self.world_size, self.seed, self.rank, self.world_size, infinite)

    def losses(
        self, batch: FaceTensors, step: int, scene: FaceBatchScene | None = None, training: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Generator-side losses of one batch and the tensors needed for D and logging.

        ``training``: through the DDP-wrapped generator, with the photometric term normalised by
        the mask area of the global batch (exact data-parallel gradients).
        """
        if scene is None:
            scene = self.renderer.prepare(batch.coefficients, batch.uv_textures, batch.texture_valid)
        generator = self._g if training else self.generator
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out = generator(batch.uv_textures, batch.texture_valid, batch.expression_maps)
        displacement = out["displacement"].float()
        detailed_positions, detailed_normals = self.renderer.detailed_maps(scene, displacement)
        if self.albedo_shading != "coarse":
            scene = dataclasses.replace(scene, albedo_map=self.albedo_for(batch, scene, detailed_normals))
        with torch.no_grad():
            coarse = self.renderer.render(scene, scene.normal_map)
        detailed = self.renderer.render(scene, detailed_normals)
        mask = scene.render_mask * batch.masks
        # Outside the mask the photo itself: the perceptual and adversarial terms judge whole faces.
        real = batch.images
        detailed_full = mask * detailed + (1 - mask) * real
        coarse_full = mask * coarse + (1 - mask) * real
        terms: dict[str, torch.Tensor] = {"photometric": masked_photometric_loss(detailed, real, mask)}
        if training and self.dist.enabled:
            # sum/area per rank -> sum/mean area over ranks: the rank average is then the global ratio
            area = mask.expand(-1, 1, -1, -1).sum().detach().clamp_min(1e-8)
            mean_area = all_reduce_sum(area.clone(), self.dist) / self.world_size
            terms["photometric"] = terms["photometric"] * (area / mean_area)
        if self.embedder is not None and self.weights.get("perceptual", 0.0) > 0:
            with torch.no_grad():
                real_embedding = self.embedder(real)
            terms["perceptual"] = perceptual_cosine_loss(self.embedder(detailed_full), real_embedding)
        if self.weights.get("adversarial", 0.0) > 0:
            condition = coarse_full if self.config["discriminator"].get("conditional", True) else None
            terms["adversarial"] = lsgan_g_loss(self.discriminator(detailed_full, condition))
        if self.weights.get("gradient_photometric", 0.0) > 0:
            terms["gradient_photometric"] = masked_gradient_photometric_loss(detailed, real, mask)
            if training and self.dist.enabled:  # the photometric term's rescaling (mask area; the pair area is ~ proportional)
                terms["gradient_photometric"] = terms["gradient_photometric"] * (area / mean_area)
        if self.weights.get("uv_photometric", 0.0) > 0:
            # DECA-style photometric term in UV space: the unwrapped photo vs albedo x SH(detailed normals) over the
            # visible texels of the face region, at the full UV resolution (no pixel resampling of the normal map)
            uv_render = scene.albedo_map * irradiance_map(detailed_normals, scene.gamma)
            uv_mask = batch.texture_valid * self.uv_face_region
            terms["uv_photometric"] = masked_photometric_loss(uv_render.clamp(0.0, 1.0), batch.uv_textures, uv_mask)
        if self.weights.get("detail_lowpass", 0.0) > 0:
            terms["detail_lowpass"] = displacement_lowpass_regularization(
                displacement, scene.uv_valid, float(self.config.get("detail_lowpass_sigma", 3.0)))
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
            "generator_outputs": out,
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
        terms, extras = self.losses(batch, step, scene, training=True)
        if not all_true(bool(torch.isfinite(terms["total"])), self.dist):  # collective: all ranks skip together
            self._release_ddp_graph(extras["generator_outputs"].values(), self.opt_g)
            logger.warning("step %d: non-finite loss %s, step skipped", step, {k: float(v.detach()) for k, v in terms.items()})
            return None
        self.opt_g.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 10.0)
        self.opt_g.step()
        metrics = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        if self.weights.get("adversarial", 0.0) > 0:
            condition = extras["coarse_full"] if self.config["discriminator"].get("conditional", True) else None
            # real and fake in one forward: one DDP forward per backward
            both = torch.cat([batch.images, extras["detailed_full"].detach()])
            both_condition = torch.cat([condition, condition]) if condition is not None else None
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                scores = self._d(both, both_condition)
            d_real, d_fake = scores.float().chunk(2)
            d_loss = lsgan_d_loss(d_real, d_fake)
            if all_true(bool(torch.isfinite(d_loss)), self.dist):
                self.opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                self.opt_d.step()
            else:
                self._release_ddp_graph([scores], self.opt_d)
            metrics["loss_discriminator"] = float(d_loss.detach())
            self.sched_d.step()
        self.sched_g.step()
        metrics["learning_rate"] = float(self.opt_g.param_groups[0]["lr"])
        metrics.update(extras["weights"])
        metrics["displacement_abs_mean"] = float(extras["displacement"].detach().abs().mean())
        if self.dist.enabled:  # logged values are means over the ranks
            names = sorted(metrics)
            values = all_reduce_sum(torch.tensor([metrics[k] for k in names], dtype=torch.float64), self.dist) / self.world_size
            metrics = dict(zip(names, values.tolist()))
        self._last_extras = extras
        return metrics

    def _release_ddp_graph(self, outputs, optimizer: torch.optim.Optimizer) -> None:
        """A skipped step: under DDP the forward still expects a backward, so run a zero one, then drop the gradients."""
        if self.dist.enabled:
            torch.stack([o.float().sum() for o in outputs]).sum().mul(0.0).backward()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, data: FaceTensors | BatchSource, batch_size: int | None = None) -> dict[str, float]:
        """Mean validation losses (photometric coarse vs. detailed), streamed, without updating anything.

        Each rank evaluates its share of the validation faces (plain modules, no DDP); the
        face-weighted sums are all-reduced, so every rank returns the mean over the whole split.
        """
        if not hasattr(data, "batches"):
            data = InMemoryBatches(data, int(batch_size or self.config["batch_size"]), self.seed, self.rank, self.world_size, infinite=False)
        self.generator.eval()
        keys = ("val_photometric_detailed", "val_photometric_coarse")
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        for batch in data.batches(0):
            batch = batch.to(self.device).as_float()
            terms, extras = self.losses(batch, step=int(self.config["steps"]))
            coarse_error = masked_photometric_loss(extras["coarse"], batch.images, extras["mask"])
            sums += torch.tensor([float(terms["photometric"]) * len(batch), float(coarse_error) * len(batch), len(batch)], dtype=torch.float64)
        sums = all_reduce_sum(sums, self.dist)
        count = max(1.0, float(sums[-1]))
        return {key: float(sums[i]) / count for i, key in enumerate(keys)}

    # ------------------------------------------------------------------ loop
    def fit(self, train: FaceTensors | BatchSource, validation: FaceTensors | BatchSource | None = None) -> TrainingResult:
        """Train for ``config['steps']`` steps (resuming from this configuration's last checkpoint).

        Args:
            train: a batch source (:class:`~facedetail.data.streaming.ShardBatches` over the shards,
                or :class:`~facedetail.data.streaming.InMemoryBatches`) or in-memory ``FaceTensors``.
                One batch is consumed per step; the stream position (batches consumed = step) is
                part of the checkpoint, so a resumed run reopens the stream exactly there.
            validation: evaluated once at the end, streamed (a finite source or ``FaceTensors``).

        The run's main process holds :class:`CheckpointLock` on its checkpoint folder: a concurrent run with the
        same settings fails with :class:`CheckpointLockedError` instead of resuming from this run's live checkpoints.
        """
        if not self.dist.is_main:
            return self._fit(train, validation)
        with CheckpointLock(self.checkpoint_root / self.run_key(self._as_source(train, infinite=True))):
            return self._fit(train, validation)

    def _fit(self, train: FaceTensors | BatchSource, validation: FaceTensors | BatchSource | None = None) -> TrainingResult:
        if len(train) == 0:
            raise TrainingError("the training set is empty: no face passed data_prep/estimation (see the manifest)")
        source = self._as_source(train, infinite=True)
        steps = int(self.config["steps"])
        self.checkpoint_dir = self.checkpoint_root / self.run_key(source)
        start = self.try_resume()
        result = TrainingResult(self.generator, history=self.resumed_history, resumed_from=start or None)
        self.history = result.history  # saved with each checkpoint
        if validation is not None and len(validation):
            validation = self._as_source(validation, infinite=False) if hasattr(validation, "batches") else validation
        else:
            validation = None
        self._scene_cache = {} if len(source) <= int(self.config.get("scene_cache_faces", 512)) else None
        batches = source.batches(start)
        nan_streak, nan_tolerance = 0, int(self.config.get("nan_tolerance", 5))
        log_every, image_every = int(self.config.get("log_every", 10)), int(self.config.get("image_log_every", 100))
        checkpoint_every = int(self.config.get("checkpoint_every", 100))
        main = self.dist.is_main
        progress = tqdm(range(start, steps), initial=start, total=steps, desc="train detail", unit="step", dynamic_ncols=True, disable=not main)
        step = start
        for step in progress:
            tic = time.perf_counter()
            batch = next(batches).to(self.device).as_float()
            metrics = self.train_step(batch, step, self.cached_scene(batch))
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
            if main and (step % log_every == 0 or step == steps - 1):
                self.log_metrics(metrics, step)
            if main and (step % image_every == 0 or step == steps - 1):
                self.log_images("train_grid", self.image_grid(self._last_extras["images"], self._last_extras), step)
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                self.save_checkpoint(step + 1)
        if validation is not None:
            val_metrics = self.evaluate(validation, source.batch_size)
            if main:
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


#: Column labels of :func:`make_image_grid`, left to right.
GRID_COLUMNS = ("input", "coarse", "detailed", "displacement", "embedding")


def grid_header(labels: Sequence[str], width: int, height: int) -> np.ndarray:
    """uint8 (height, len(labels)*width, 3) strip: each label centred over its column, white on dark grey.

    The font shrinks until the longest label fits its column (Pillow's scalable default font; its
    bitmap font where FreeType is missing).
    """
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (width * len(labels), height), (32, 32, 32))
    draw = ImageDraw.Draw(strip)
    font = None
    for size in range(max(height - 4, 6), 5, -1):
        try:
            candidate = ImageFont.load_default(size=size)
        except (TypeError, OSError, ImportError):  # old Pillow or no FreeType
            candidate = ImageFont.load_default()
        font = candidate
        if max(draw.textlength(label, font=candidate) for label in labels) <= width - 2:
            break
    for i, label in enumerate(labels):
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        x = i * width + (width - (right - left)) / 2 - left
        y = (height - (bottom - top)) / 2 - top
        draw.text((x, y), label, fill=(255, 255, 255), font=font)
    return np.asarray(strip, dtype=np.uint8)


def make_image_grid(
    images: torch.Tensor,
    coarse: torch.Tensor,
    detailed: torch.Tensor,
    displacement: torch.Tensor,
    embedding: torch.Tensor,
    max_rows: int = 4,
) -> np.ndarray:
    """uint8 (header + rows*H, 5*W, 3) grid: input | coarse | detailed | displacement | embedding.

    The first ``header = max(12, H // 8)`` rows are a label strip naming the columns (:data:`GRID_COLUMNS`).
    """
    rows = min(max_rows, images.shape[0])
    size = images.shape[-1]
    resize = lambda x: torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    columns = [images[:rows], coarse[:rows], detailed[:rows], resize(colorize_displacement(displacement[:rows])), resize(embedding_to_rgb(embedding[:rows]))]
    grid = torch.cat([torch.cat([c.detach().float().cpu().clamp(0, 1) for c in columns], dim=3)[i] for i in range(rows)], dim=1)
    body = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return np.concatenate([grid_header(GRID_COLUMNS, size, max(12, size // 8)), body], axis=0)


def finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")
