"""Controlled detail-recovery benchmark: does the detail generator learn riggable wrinkles from photos?

Data (made here, cached in ``--work-dir``):

1. real coarse fits of the shared photos (``facedetail.engine.fitter.FaceFitter``, default settings; cached);
2. per photo: its unwrapped texture de-lit by the fitted SH lighting (the renderer's albedo) and a random
   :class:`facedetail.geometry.wrinkles.WrinkleStyle` (placement, spacing, depth of forehead furrows, crow's feet,
   nasolabial folds);
3. per photo ``--expressions`` expression variants (the fit's expression with random brow raise / squint / smile
   intensities, some neutral): ground-truth displacement = :func:`wrinkle_displacement` (0 at neutral, depth
   linear in the driving blendshapes, 0.3-1 mm at full intensity), "photo" = the project's detailed render
   (:class:`~facedetail.render.detail.DetailRenderer`, the fit's SH lighting and a smoothed de-lit albedo, see
   ``--albedo-sigma``) of the whole mesh composited over the real photo outside it; the generator's inputs are made from that photo as ``generator_inputs`` makes them in
   the pipelines.

Photos (identities) are split into train / held-out. ``DetailTrainer`` trains on the train faces' variants
(the project's loop and losses, ``conf/base/parameters_train.yml`` plus ``--variant`` overrides); held-out
faces are then evaluated in UV inside the model's face region:

* displacement RMSE (mm) and mean normal angle error (degrees) of the detailed normal map vs the ground
  truth's, for the coarse surface (zero displacement) and the prediction; also inside the wrinkle zones only;
* re-targeting: each held-out face's embedding from its most wrinkled variant, applied to its OTHER variants'
  expression maps, vs their ground truth.

Target (issue 12): detailed normal error <= 50% of coarse on held-out faces, re-targeted <= 1.5x detailed.
Pictures (photo | coarse | GT displacement | predicted | re-targeted GT | re-targeted prediction) and a JSON of
the numbers go to ``--out``. The LAST line printed is the JSON summary.

Usage (repository root; 5-12 min on 2 busy cores: data 1-5 min, 300 steps 2.5-5.5 min)::

    PYTHONPATH=src python benchmarks/detail_recovery.py [--variant photometric] [--steps 300] [--uv-size 64]
        [--albedo-sigma 4] [--set loss_weights.gradient_photometric=2] [--tag name]

Diagnostics (README "Diagnosis"): ``--oracle-albedo`` (the trainer shades the data's true albedo), ``--float-photos``
(no 8-bit quantisation of the synthetic photos), ``--free-displacement STEPS`` (no generator: free per-variant maps
optimised with the variant's photometric terms), ``--wrinkle-spacing F`` (ground-truth furrow / crow's-feet spacing
x F; a change of the data, 1 = the default data), ``--supervised STEPS`` (no photometric loss: the network is fitted to
the ground-truth displacement itself, L2 + ``--supervised-gradient-weight`` x L2 of its texel differences; with
``--supervised-net unet`` a plain pix2pix U-Net from the texture instead of the detail generator: how far direct
supervision gets, an upper bound of the self-supervised training), ``--data-seeds K`` (the training photos K times,
each with other wrinkle styles and expressions: K x the training variants; held-out faces unchanged).

``--albedo-sigma`` is in texels: the same value at UV 128 is half the physical low-pass of UV 64 (the data of the
README's rows name both). The evaluation also reports the held-out image-space photometric and shading-gradient
losses of the coarse surface, the ground truth and the prediction (does the loss prefer the truth?).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from facedetail.data.faces import FaceTensors  # noqa: E402
from facedetail.geometry.face_model import FaceModel, load_face_model_from_params  # noqa: E402
from facedetail.geometry.detail import masked_blur  # noqa: E402
from facedetail.geometry.face_uv import as_generator_tensors, face_uv_maps, quantise_uv_maps  # noqa: E402
from facedetail.geometry.wrinkles import (  # noqa: E402
    WrinkleStyle, normal_angle_degrees, sample_styles, wrinkle_displacement, wrinkle_drivers, wrinkle_patterns,
)
from facedetail.losses.photometric import masked_gradient_photometric_loss, masked_photometric_loss  # noqa: E402
from facedetail.render.detail import DetailRenderer, UVSurface  # noqa: E402
from facedetail.render.rasterizer import rasterize  # noqa: E402
from facedetail.training.loop import DetailTrainer, colorize_displacement  # noqa: E402
from facedetail.utils import atomic_write_bytes  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTO_ROOT = REPO_ROOT.parent / "shared" / "assets" / "faces"
PHOTO_FOLDERS = ("celeba_examples", "in_the_wild", "portraits", "expressions_one_person")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

#: Loss settings compared by the benchmark (``train`` overrides).
VARIANTS: dict[str, dict[str, Any]] = {
    "photometric": {"loss_weights": {"photometric": 1.0, "perceptual": 0.0, "adversarial": 0.0}},
    "paper": {"loss_weights": {"photometric": 1.0, "perceptual": 0.2, "adversarial": 0.01}},
    "uv_photometric": {"loss_weights": {"photometric": 1.0, "uv_photometric": 1.0, "perceptual": 0.0, "adversarial": 0.0}},
    "uv_photometric_reg": {"loss_weights": {"photometric": 1.0, "uv_photometric": 1.0, "perceptual": 0.0, "adversarial": 0.0},
                           "detail_regularization": {"start": 1.0, "end": 0.05, "decay_steps": 300, "kind": "exponential"}},
    "photometric_noreg": {"loss_weights": {"photometric": 1.0, "perceptual": 0.0, "adversarial": 0.0},
                          "detail_regularization": {"start": 0.0, "end": 0.0, "decay_steps": 1, "kind": "constant"}},
    # + the shading-gradient (high-pass) photometric term (``loss_weights.gradient_photometric``)
    "gradient": {"loss_weights": {"photometric": 1.0, "gradient_photometric": 1.0, "perceptual": 0.0, "adversarial": 0.0}},
    "gradient_only": {"loss_weights": {"photometric": 0.0, "gradient_photometric": 1.0, "perceptual": 0.0, "adversarial": 0.0}},
}
#: Blendshapes the augmentation sets (groups move together, sides vary a little).
BROW = ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R")
SQUINT = ("eyeSquint_L", "eyeSquint_R", "cheekSquint_L", "cheekSquint_R")
SMILE = ("mouthSmile_L", "mouthSmile_R")


def project_params() -> dict[str, Any]:
    from facedetail.cli import load_project_config

    params, _, _ = load_project_config(str(REPO_ROOT / "conf"))
    params["device"] = "cpu"
    return params


#: The coarse stage that made the benchmark's data (session 16's landmark settings): the data stays the same when
#: the pipeline's coarse defaults move on (session 17: uniform landmark weights, mirror average, MediaPipe box).
DATA_ESTIMATION = {"fitting.landmark_weights": "deng", "fitting.w_landmark": 0.02,
                   "landmarks.mirror_average": False, "landmarks.dlib_box": "hog"}


def load_fits(params: dict[str, Any], work_dir: Path, max_faces: int) -> dict[str, np.ndarray]:
    """Coarse fits of the shared photos with :data:`DATA_ESTIMATION` (cached in ``work_dir/fits_<settings>.npz``,
    keyed by the estimation and face-model settings; the estimation cache beside it)."""
    from facedetail.config import set_dotted
    from facedetail.utils import settings_hash

    params = copy.deepcopy(params)
    for dotted, value in DATA_ESTIMATION.items():
        set_dotted(params["estimation"], dotted, value)
    cache = work_dir / f"fits_{settings_hash({'estimation': params['estimation'], 'face_model': params['face_model']})[:12]}.npz"
    if not cache.is_file():
        from facedetail.engine.fitter import FaceFitter

        photos = sorted(p for folder in PHOTO_FOLDERS if (PHOTO_ROOT / folder).is_dir()
                        for p in (PHOTO_ROOT / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        fitter = FaceFitter.from_params(params, "cpu", cache_dir=work_dir / "estimation_cache")
        faces = fitter.fit_images([str(p) for p in photos], names=[f"{p.parent.name}/{p.name}" for p in photos])
        tmp = work_dir / "fits.tmp.npz"
        np.savez(tmp, face_ids=np.array([f.face_id for f in faces]), coefficients=np.stack([f.coefficients for f in faces]),
                 aligned=np.stack([f.aligned for f in faces]), masks=np.stack([f.mask for f in faces]))
        os.replace(tmp, cache)
    data = dict(np.load(cache))
    keep = np.arange(min(max_faces, len(data["face_ids"])))
    return {k: v[keep] for k, v in data.items()}


def sample_expressions(face_model: FaceModel, base: torch.Tensor, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` expression variants of one face: the fit's expression with random wrinkle-driving intensities.

    Variant 0 is neutral for the drivers (no wrinkles); the others raise the brows, squint and smile with
    probability 0.7 each, intensity U(0.4, 1), sides within 30% of each other.
    """
    names = list(face_model.exp_names)
    out = base.clamp(0, 1).repeat(count, 1)
    for j in range(count):
        for group in (BROW, SQUINT, SMILE):
            level = 0.0 if j == 0 or rng.random() > 0.7 else rng.uniform(0.4, 1.0)
            for name in group:
                out[j, names.index(name)] = float(level * rng.uniform(0.7, 1.0))
    return out


def face_region_uv(renderer: DetailRenderer) -> torch.Tensor:
    """(1, 1, S, S) bool: texels of the model's face region (where the benchmark measures)."""
    region = renderer.bake(renderer.face_region[None].expand(1, -1, -1))
    return (region > 0.5) & renderer.uv_valid.bool()


@torch.no_grad()
def build_dataset(face_model: FaceModel, fits: dict[str, np.ndarray], uv_size: int, expressions: int, seed: int,
                  albedo_sigma: float = 4.0, float_photos: bool = False, wrinkle_spacing: float = 1.0) -> dict[str, Any]:
    """Synthetic training/evaluation faces (module docstring). Returns tensors indexed by variant.

    ``float_photos``: keep the synthetic photos and their unwrapped textures in float (default: 8-bit, like real
    photos and the pipelines' stored ``uv_textures``); a diagnostic of how much of the wrinkle shading the 8-bit
    quantisation hides. ``wrinkle_spacing``: :meth:`WrinkleStyle.sample`'s ``spacing`` (1: the default data; 0.5
    about real furrow and crow's-feet spacing).

    ``albedo_sigma``: extra low-pass (texels) of the photo's de-lit albedo used to render the synthetic photos;
    0 keeps its fine detail, which the generator then also tries to explain with geometry (albedo/shape
    ambiguity, measured separately from geometry recovery).
    """
    renderer = DetailRenderer(face_model, uv_size, 224)
    exp_slice = face_model.layout.slices["exp"]
    styles = sample_styles(len(fits["face_ids"]), seed, wrinkle_spacing)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("face_ids", "identity", "images", "coefficients", "uv_textures", "texture_valid",
                                            "expression_maps", "gt", "position_map", "normal_map", "zone", "coarse", "style",
                                            "albedo")}
    for i, face_id in enumerate(fits["face_ids"]):
        coefficients = torch.from_numpy(fits["coefficients"][i][None]).float()
        photo = torch.from_numpy(fits["aligned"][i]).permute(2, 0, 1)[None].float() / 255.0
        maps = face_uv_maps(face_model, coefficients, photo, uv_size)
        albedo = renderer.prepare(coefficients, maps["uv_textures"], maps["texture_valid"]).albedo_map
        if albedo_sigma > 0:  # a smooth skin: the trainer's de-lit, low-passed albedo can then reproduce it
            albedo = masked_blur(albedo, renderer.uv_valid, albedo_sigma)
        variants = coefficients.repeat(expressions, 1)
        variants[:, exp_slice] = sample_expressions(face_model, coefficients[:, exp_slice], expressions, rng)
        scene = renderer.prepare(variants, maps["uv_textures"].expand(expressions, -1, -1, -1),
                                 maps["texture_valid"].expand(expressions, -1, -1, -1))
        scene.albedo_map = albedo.expand(expressions, -1, -1, -1)
        pattern = wrinkle_patterns(face_model, styles[i], uv_size)
        gt = wrinkle_displacement(face_model, [styles[i]] * expressions, variants[:, exp_slice], uv_size,
                                  patterns=pattern[None].expand(expressions, -1, -1, -1)) * renderer.uv_valid
        _, gt_normals = renderer.detailed_maps(scene, gt)
        # the whole mesh is rendered (eye caps and mouth included, not only the face region), so no sharp real-photo
        # pixel borders the skin: the trainer's low-passed de-lit albedo can then reproduce the smooth skin
        cover = rasterize(renderer.coarse_mesh(variants)["screen"], face_model.triangles, 224, backend=renderer.backend).mask
        scene = dataclasses.replace(scene, render_mask=cover[:, None].to(photo.dtype))
        render = renderer.render(scene, gt_normals)
        coarse = renderer.render(scene, scene.normal_map)
        images = scene.render_mask * render + (1 - scene.render_mask) * photo
        unwrapped = face_uv_maps(face_model, variants, images, uv_size)  # what generator_inputs stores, before quantising
        inputs = as_generator_tensors(quantise_uv_maps(unwrapped))
        if float_photos:
            inputs["uv_textures"] = unwrapped["uv_textures"].clamp(0.0, 1.0)
        rows["face_ids"] += [f"{face_id}__e{j}" for j in range(expressions)]
        rows["identity"] += [i] * expressions
        rows["images"].append(images.clamp(0.0, 1.0) if float_photos else (images * 255 + 0.5).byte())
        rows["coarse"].append((scene.render_mask * coarse + (1 - scene.render_mask) * photo).mul(255).add(0.5).byte())
        rows["coefficients"].append(variants)
        for key in ("uv_textures", "texture_valid", "expression_maps"):
            rows[key].append(inputs[key])
        rows["gt"].append(gt)
        rows["albedo"].append(scene.albedo_map)  # the true albedo of the synthetic photos (``--oracle-albedo``)
        rows["position_map"].append(scene.position_map)
        rows["normal_map"].append(scene.normal_map)
        rows["zone"].append((pattern.abs().amax(0) > 0.05)[None, None].expand(expressions, -1, -1, -1))
        rows["style"] += [styles[i]] * expressions
    data = {k: (torch.cat(v) if k not in ("face_ids", "identity", "style") else v) for k, v in rows.items()}
    data["identity"] = np.array(data["identity"])
    data["uv_valid"] = renderer.uv_valid
    data["region"] = face_region_uv(renderer)
    return data


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """Photos or UV textures in [0, 1] float from the stored uint8 (or, ``--float-photos``, float) ones."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def face_tensors(data: dict[str, Any], index: np.ndarray) -> FaceTensors:
    idx = torch.as_tensor(index, dtype=torch.long)
    images = data["images"][idx]
    return FaceTensors([data["face_ids"][i] for i in index], images, torch.ones_like(images[:, :1], dtype=torch.bool),
                       data["coefficients"][idx], data["uv_textures"][idx], data["texture_valid"][idx], data["expression_maps"][idx])


class ErrorPool:
    """Accumulates squared displacement errors and normal angles over texels."""

    def __init__(self) -> None:
        self.sq, self.angle, self.count = 0.0, 0.0, 0

    def add(self, predicted: torch.Tensor, gt: torch.Tensor, predicted_normals: torch.Tensor, gt_normals: torch.Tensor,
            where: torch.Tensor) -> None:
        where = where.expand_as(gt).bool()
        self.sq += float(((predicted - gt) ** 2)[where].sum())
        self.angle += float(normal_angle_degrees(predicted_normals, gt_normals)[where].sum())
        self.count += int(where.sum())

    def result(self, mm_per_unit: float) -> dict[str, float]:
        n = max(1, self.count)
        return {"displacement_rmse_mm": math.sqrt(self.sq / n) * mm_per_unit, "normal_error_deg": self.angle / n}


@torch.no_grad()
def evaluate(trainer: DetailTrainer, data: dict[str, Any], index: np.ndarray,
             oracle_albedo: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Held-out metrics (module docstring) and the tensors for the pictures.

    ``oracle_albedo``: the image-space losses use the data's true albedo (what an oracle-albedo run trained with)
    instead of the trainer's estimate."""
    generator, renderer = trainer.generator.eval(), trainer.renderer
    mm = trainer.face_model.mm_per_unit
    pools = {name: ErrorPool() for name in ("coarse", "detailed", "coarse_zone", "detailed_zone",
                                             "retarget_coarse", "retarget", "retarget_coarse_zone", "retarget_zone")}
    idx = torch.as_tensor(index, dtype=torch.long)
    surface = UVSurface(data["position_map"][idx], data["normal_map"][idx], data["uv_valid"])
    gt = data["gt"][idx]
    embedding = generator.embed(data["uv_textures"][idx], data["texture_valid"][idx])
    predicted = generator.displacement_from(embedding, data["expression_maps"][idx]).float() * data["uv_valid"]
    _, gt_normals = renderer.detailed_maps(surface, gt)
    _, pred_normals = renderer.detailed_maps(surface, predicted)
    region, zone = data["region"], data["zone"][idx] & data["region"]
    pools["coarse"].add(torch.zeros_like(gt), gt, surface.normal_map, gt_normals, region)
    pools["detailed"].add(predicted, gt, pred_normals, gt_normals, region)
    pools["coarse_zone"].add(torch.zeros_like(gt), gt, surface.normal_map, gt_normals, zone)
    pools["detailed_zone"].add(predicted, gt, pred_normals, gt_normals, zone)
    # re-targeting: each identity's most wrinkled variant lends its embedding to the identity's other variants
    identity = data["identity"][index]
    drivers = wrinkle_drivers(trainer.face_model, data["coefficients"][idx][:, trainer.face_model.layout.slices["exp"]]).sum(1)
    retarget_pred = torch.zeros_like(gt)
    retarget_rows: list[int] = []
    for person in np.unique(identity):
        rows = np.flatnonzero(identity == person)
        source = rows[int(torch.argmax(drivers[rows]))]
        targets = rows[rows != source]
        if len(targets) == 0:
            continue
        t = torch.as_tensor(targets)
        d = generator.displacement_from(embedding[source : source + 1].expand(len(targets), -1, -1, -1),
                                        data["expression_maps"][idx][t]).float() * data["uv_valid"]
        retarget_pred[t] = d
        retarget_rows += targets.tolist()
    r = torch.as_tensor(retarget_rows, dtype=torch.long)
    sub = UVSurface(surface.position_map[r], surface.normal_map[r], surface.uv_valid)
    _, rt_normals = renderer.detailed_maps(sub, retarget_pred[r])
    pools["retarget_coarse"].add(torch.zeros_like(gt[r]), gt[r], sub.normal_map, gt_normals[r], region)
    pools["retarget"].add(retarget_pred[r], gt[r], rt_normals, gt_normals[r], region)
    pools["retarget_coarse_zone"].add(torch.zeros_like(gt[r]), gt[r], sub.normal_map, gt_normals[r], zone[r])
    pools["retarget_zone"].add(retarget_pred[r], gt[r], rt_normals, gt_normals[r], zone[r])
    metrics = {name: pool.result(mm) for name, pool in pools.items()}
    # is the ground truth what the training loss prefers? the image-space photometric loss (trainer's albedo)
    scene = renderer.prepare(data["coefficients"][idx], data["uv_textures"][idx], data["texture_valid"][idx])
    if oracle_albedo:
        scene.albedo_map = data["albedo"][idx]
    photos = unit_images(data["images"][idx])
    renders = {name: renderer.render(scene, renderer.detailed_maps(scene, d)[1])
               for name, d in (("coarse", torch.zeros_like(gt)), ("ground_truth", gt), ("detailed", predicted))}
    metrics["photometric"] = {name: float(masked_photometric_loss(r, photos, scene.render_mask)) for name, r in renders.items()}
    metrics["gradient_photometric"] = {name: float(masked_gradient_photometric_loss(r, photos, scene.render_mask))
                                       for name, r in renders.items()}
    metrics["normal_error_ratio"] = metrics["detailed"]["normal_error_deg"] / max(metrics["coarse"]["normal_error_deg"], 1e-9)
    metrics["retarget_over_detailed"] = metrics["retarget"]["normal_error_deg"] / max(metrics["detailed"]["normal_error_deg"], 1e-9)
    metrics["targets_met"] = bool(metrics["normal_error_ratio"] <= 0.5 and metrics["retarget_over_detailed"] <= 1.5)
    metrics["heldout_variants"] = len(index)
    metrics["retarget_variants"] = len(retarget_rows)
    shown = torch.full_like(drivers, -1.0)
    shown[r] = drivers[r]  # the pictures show re-targeted variants (most wrinkled first)
    pictures = {"gt": gt, "predicted": predicted, "retarget": retarget_pred, "images": data["images"][idx],
                "coarse": data["coarse"][idx], "drivers": shown}
    return metrics, pictures


def save_pictures(pictures: dict[str, torch.Tensor], path: Path, rows: int = 6) -> Path:
    """Grid: photo | coarse render | GT displacement | predicted from this photo | predicted from the same face's
    other photo's embedding under this expression (re-targeted); one colour scale per row (the GT's)."""
    order = torch.argsort(pictures["drivers"], descending=True)[:rows]
    scale = pictures["gt"][order].abs().flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)

    def colour(d: torch.Tensor) -> torch.Tensor:
        c = colorize_displacement(torch.cat([(d / scale).clamp(-1, 1), torch.ones_like(d[:, :, :1])], 2))  # pin the scale
        return torch.nn.functional.interpolate(c[:, :, : d.shape[2]], size=(224, 224), mode="nearest")
    tiles = [unit_images(pictures["images"][order]), pictures["coarse"][order].float() / 255,
             colour(pictures["gt"][order]), colour(pictures["predicted"][order]), colour(pictures["retarget"][order])]
    grid = torch.cat([torch.cat([t[i] for t in tiles], 2) for i in range(len(order))], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)).save(tmp)
    os.replace(tmp, path)
    return path


def use_oracle_albedo(trainer: DetailTrainer, data: dict[str, Any]) -> None:
    """Diagnostic: the trainer's per-face scenes get the data's true albedo instead of the one it de-lights from the
    unwrapped photo (the trainer's scene cache must be on: at most ``scene_cache_faces`` training variants)."""
    albedo = {face_id: data["albedo"][i : i + 1] for i, face_id in enumerate(data["face_ids"])}
    cached = trainer.cached_scene

    def oracle_scene(batch: FaceTensors):
        scene = cached(batch)
        if scene is None:
            raise RuntimeError("--oracle-albedo needs the trainer's scene cache (train.scene_cache_faces >= training variants)")
        scene.albedo_map = torch.cat([albedo[f] for f in batch.face_ids]).to(scene.albedo_map)
        return scene

    trainer.cached_scene = oracle_scene  # type: ignore[method-assign]


def free_displacement_bound(trainer: DetailTrainer, data: dict[str, Any], index: np.ndarray, steps: int, count: int = 16,
                            lr: float = 0.002, oracle_albedo: bool = False) -> dict[str, Any]:
    """Diagnostic (``--free-displacement STEPS``): no generator; one FREE displacement map per variant, optimised
    (Adam) with the trainer's photometric terms (weights ``photometric`` and ``gradient_photometric``) on the
    ``count`` most wrinkled of ``index``. Does the loss itself identify the wrinkles (fit = evaluation set, so an
    upper bound of what a generator can learn from it)? Returns the coarse and optimised normal errors / RMSE."""
    renderer, mm = trainer.renderer, trainer.face_model.mm_per_unit
    depth = data["gt"][torch.as_tensor(index)].abs().flatten(1).amax(1)
    idx = torch.as_tensor(index)[torch.argsort(depth, descending=True)[:count]]
    scene = renderer.prepare(data["coefficients"][idx], data["uv_textures"][idx], data["texture_valid"][idx])
    if oracle_albedo:
        scene.albedo_map = data["albedo"][idx]
    photos, gt, mask = unit_images(data["images"][idx]), data["gt"][idx], scene.render_mask
    w_photo, w_grad = (float(trainer.weights.get(k, 0.0)) for k in ("photometric", "gradient_photometric"))

    def loss_of(render: torch.Tensor) -> torch.Tensor:
        return w_photo * masked_photometric_loss(render, photos, mask) + w_grad * masked_gradient_photometric_loss(render, photos, mask)

    displacement = torch.zeros_like(gt, requires_grad=True)
    optimizer = torch.optim.Adam([displacement], lr=lr)
    history = []
    for step in range(steps):
        loss = loss_of(renderer.render(scene, renderer.detailed_maps(scene, displacement * scene.uv_valid)[1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    pools = {name: ErrorPool() for name in ("coarse", "free", "coarse_zone", "free_zone")}
    with torch.no_grad():
        _, gt_normals = renderer.detailed_maps(scene, gt)
        free = displacement.detach() * scene.uv_valid
        _, free_normals = renderer.detailed_maps(scene, free)
        zone = data["zone"][idx] & data["region"]
        for name, d, n, where in (("coarse", torch.zeros_like(gt), scene.normal_map, data["region"]), ("free", free, free_normals, data["region"]),
                                  ("coarse_zone", torch.zeros_like(gt), scene.normal_map, zone), ("free_zone", free, free_normals, zone)):
            pools[name].add(d, gt, n, gt_normals, where)
        gt_loss = loss_of(renderer.render(scene, gt_normals))
    out: dict[str, Any] = {name: pool.result(mm) for name, pool in pools.items()}
    out.update(variants=len(idx), steps=steps, lr=lr, loss_first=history[0], loss_last=history[-1], loss_ground_truth=float(gt_loss),
               normal_error_ratio=out["free"]["normal_error_deg"] / max(out["coarse"]["normal_error_deg"], 1e-9))
    return out


def merge_datasets(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Datasets of the same photos built with other seeds, concatenated; identity ``i`` of part ``k`` becomes
    ``i + k * n_photos`` (a photo's other styles are other people to the split: only part 0's are held out) and
    its face ids get ``__s{k}`` (the trainer caches scenes by face id)."""
    if len(parts) == 1:
        return parts[0]
    n_photos = int(parts[0]["identity"].max()) + 1
    merged: dict[str, Any] = {}
    for key, value in parts[0].items():
        if key in ("uv_valid", "region"):
            merged[key] = value
        elif key == "identity":
            merged[key] = np.concatenate([part[key] + k * n_photos for k, part in enumerate(parts)])
        elif key == "face_ids":  # unique: the trainer caches scenes by face id
            merged[key] = [face_id if k == 0 else f"{face_id}__s{k}" for k, part in enumerate(parts) for face_id in part[key]]
        elif isinstance(value, torch.Tensor):
            merged[key] = torch.cat([part[key] for part in parts])
        else:
            merged[key] = [item for part in parts for item in part[key]]
    return merged


def displacement_regression_loss(predicted: torch.Tensor, gt: torch.Tensor, where: torch.Tensor, gradient_weight: float) -> torch.Tensor:
    """Mean squared displacement error inside ``where`` plus ``gradient_weight`` x that of its texel-to-texel
    differences (the normals follow those: plain L2 leaves noise the normal error counts)."""
    error = (predicted - gt) * where
    dx, dy = error[..., :, 1:] - error[..., :, :-1], error[..., 1:, :] - error[..., :-1, :]
    return error.pow(2).mean() + gradient_weight * (dx.pow(2).mean() + dy.pow(2).mean())


class SupervisedUNet(torch.nn.Module):
    """Diagnostic network: pix2pix U-Net from the texture straight to the displacement (``output_scale`` x a linear
    output, face-model units); the detail generator's interface (``embed`` / ``displacement_from``) so
    :func:`evaluate` measures it the same way. The expression map is ignored: not riggable, re-targeting
    reproduces the source face's displacement."""

    def __init__(self, ngf: int, num_downs: int, output_scale: float = 0.01) -> None:
        super().__init__()
        from facedetail.models.generator import UNetGenerator

        self.net = UNetGenerator(4, 1, num_downs, ngf, "instance", 0.0, "none")
        self.output_scale = float(output_scale)

    def embed(self, uv_texture: torch.Tensor, texture_valid: torch.Tensor) -> torch.Tensor:
        valid = texture_valid.to(uv_texture.dtype)
        return self.net(torch.cat([(uv_texture * 2.0 - 1.0) * valid, valid], 1)) * self.output_scale

    def displacement_from(self, embedding: torch.Tensor, expression_map: torch.Tensor) -> torch.Tensor:
        return embedding

    def forward(self, uv_texture: torch.Tensor, texture_valid: torch.Tensor, expression_map: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"displacement": self.embed(uv_texture, texture_valid)}


def train_supervised(trainer: DetailTrainer, data: dict[str, Any], index: np.ndarray, steps: int, batch_size: int, lr: float,
                     net: str, gradient_weight: float, seed: int) -> list[float]:
    """Diagnostic (``--supervised STEPS``): fit ``trainer.generator`` (or, ``net="unet"``, a :class:`SupervisedUNet`
    that replaces it) to the ground-truth displacement of the ``index`` variants with
    :func:`displacement_regression_loss` (Adam, betas 0.5 / 0.999). Returns the loss every 50 steps."""
    if net == "unet":
        model = trainer.generator.config
        trainer.generator = SupervisedUNet(model["ngf"], model["num_downs"])
    generator = trainer.generator.train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    where = data["region"].float()
    rng = np.random.default_rng(seed)
    history = []
    for step in range(steps):
        batch = torch.as_tensor(rng.choice(index, min(batch_size, len(index)), replace=False))
        predicted = generator(unit_images(data["uv_textures"][batch]), data["texture_valid"][batch],
                              data["expression_maps"][batch])["displacement"]
        loss = displacement_regression_loss(predicted, data["gt"][batch], where, gradient_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            history.append(float(loss.detach()))
    return history


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["loss_weights.uv_photometric=2", "model.regions=8"]`` -> ``config`` with those (YAML-parsed) values set."""
    import yaml

    from facedetail.config import set_dotted

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        set_dotted(config, key, yaml.safe_load(value))
    return config


def train_config(params: dict[str, Any], variant: str, steps: int, batch_size: int, checkpoint_dir: str, lr: float | None,
                 overrides: list[str] = ()) -> dict[str, Any]:
    config = copy.deepcopy(params["train"])
    override = copy.deepcopy(VARIANTS[variant])
    config["loss_weights"] = {**config.get("loss_weights", {}), **override.pop("loss_weights", {})}
    config.update(override)
    apply_overrides(config, list(overrides))
    config.update(steps=steps, batch_size=batch_size, checkpoint_dir=checkpoint_dir, resume=False, checkpoint_every=10**9,
                  log_every=10**9, image_log_every=10**9, mixed_precision=False)
    if lr is not None:
        config["optimizer"] = {**config["optimizer"], "lr": lr}
    return config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="photometric", choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--uv-size", type=int, default=64)
    parser.add_argument("--expressions", type=int, default=4, help="expression variants per photo")
    parser.add_argument("--faces", type=int, default=60, help="at most this many fitted faces")
    parser.add_argument("--heldout", type=float, default=0.25, help="fraction of the photos held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--albedo-sigma", type=float, default=4.0, help="extra albedo low-pass of the synthetic photos (texels)")
    parser.add_argument("--float-photos", action="store_true",
                        help="diagnostic: float synthetic photos and textures (no 8-bit quantisation of the wrinkle shading)")
    parser.add_argument("--wrinkle-spacing", type=float, default=1.0,
                        help="factor on the ground truth's furrow / crow's-feet spacing (0.5: about real faces; data change)")
    parser.add_argument("--free-displacement", type=int, default=0, metavar="STEPS",
                        help="diagnostic: no training; optimise free displacement maps of the 16 most wrinkled held-out "
                             "variants for STEPS steps with the variant's photometric terms (does the loss identify the truth?)")
    parser.add_argument("--oracle-albedo", action="store_true",
                        help="diagnostic: the trainer shades with the data's TRUE albedo instead of its estimate from the photo")
    parser.add_argument("--supervised", type=int, default=0, metavar="STEPS",
                        help="diagnostic: fit the network to the ground-truth displacement (no photometric loss)")
    parser.add_argument("--supervised-net", default="generator", choices=("generator", "unet"))
    parser.add_argument("--supervised-gradient-weight", type=float, default=30.0)
    parser.add_argument("--data-seeds", type=int, default=1, help="training photos this many times, other styles each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train-config override after the variant's, e.g. loss_weights.gradient_photometric=2 (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the output file names (default: the variant)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "facedetail_detail_recovery"))
    parser.add_argument("--out", default=str(REPO_ROOT / "data" / "08_reporting" / "detail_recovery"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    params = project_params()
    face_model = load_face_model_from_params(params["face_model"], "cpu")
    fits = load_fits(params, work, args.faces)
    data = merge_datasets([build_dataset(face_model, fits, args.uv_size, args.expressions, args.seed + k, args.albedo_sigma,
                                         args.float_photos, args.wrinkle_spacing) for k in range(max(1, args.data_seeds))])
    n_people = len(fits["face_ids"])
    people = np.random.default_rng(args.seed).permutation(n_people)
    heldout_people = set(people[: max(1, int(round(args.heldout * n_people)))].tolist())
    photo = data["identity"] % n_people
    is_test = np.array([p in heldout_people for p in photo])
    # held out: part 0's variants of the held-out photos; their other parts are used by no one
    train_index, test_index = np.flatnonzero(~is_test), np.flatnonzero(is_test & (data["identity"] < n_people))
    prepared = time.perf_counter() - tic
    print(f"data: {n_people} photos x {args.expressions} expressions, train {len(train_index)} / held-out {len(test_index)} "
          f"variants ({prepared:.0f} s)", flush=True)
    config = train_config(params, args.variant, args.steps, args.batch_size, str(work / "checkpoints"), args.lr, args.overrides)
    embedder = None
    if config["loss_weights"].get("perceptual", 0.0) > 0:
        from facedetail.models.facenet import load_face_embedder

        cache = Path(params["weights"]["facenet_cache"])
        cache = cache if cache.is_absolute() else REPO_ROOT / cache
        if not cache.is_file():  # a fresh worktree: the main checkout's converted weights
            cache = REPO_ROOT.parent / "main" / params["weights"]["facenet_cache"]
        embedder, _ = load_face_embedder(params["weights"].get("facenet") or None, cache, "cpu")
    trainer = DetailTrainer(face_model, embedder, config, args.uv_size, torch.device("cpu"))
    if args.free_displacement > 0:
        bound = free_displacement_bound(trainer, data, test_index, args.free_displacement, oracle_albedo=args.oracle_albedo)
        name = f"detail_recovery_free_{args.variant}{'_' + args.tag if args.tag else ''}"
        summary = {"variant": args.variant, "overrides": args.overrides, "uv_size": args.uv_size, "albedo_sigma": args.albedo_sigma,
                   "oracle_albedo": args.oracle_albedo, "float_photos": args.float_photos, "wrinkle_spacing": args.wrinkle_spacing,
                   "free_displacement": bound, "seconds": round(time.perf_counter() - tic, 1)}
        atomic_write_bytes(Path(args.out) / f"{name}.json", json.dumps(summary, indent=1).encode())
        print(f"free displacement ({bound['variants']} held-out variants, {bound['steps']} steps): normal error "
              f"{bound['coarse']['normal_error_deg']:.2f} -> {bound['free']['normal_error_deg']:.2f} ({bound['normal_error_ratio']:.2f}x) "
              f"[zones {bound['coarse_zone']['normal_error_deg']:.2f} -> {bound['free_zone']['normal_error_deg']:.2f}], RMSE "
              f"{bound['coarse']['displacement_rmse_mm']:.3f} -> {bound['free']['displacement_rmse_mm']:.3f} mm; loss "
              f"{bound['loss_first']:.5f} -> {bound['loss_last']:.5f} (ground truth {bound['loss_ground_truth']:.5f})")
        print(json.dumps(summary), flush=True)
        return summary
    supervised_history: list[float] = []
    if args.supervised > 0:
        supervised_history = train_supervised(trainer, data, train_index, args.supervised, args.batch_size,
                                              args.lr or float(config["optimizer"]["lr"]), args.supervised_net,
                                              args.supervised_gradient_weight, args.seed)
        result = None
    else:
        if args.oracle_albedo:
            use_oracle_albedo(trainer, data)
        result = trainer.fit(face_tensors(data, train_index))
    trained = time.perf_counter() - tic - prepared
    metrics, pictures = evaluate(trainer, data, test_index, args.oracle_albedo)
    train_metrics, _ = evaluate(trainer, data, train_index, args.oracle_albedo)
    out = Path(args.out)
    mode = f"supervised_{args.supervised_net}" if args.supervised > 0 else args.variant
    name = f"detail_recovery_{mode}{'_' + args.tag if args.tag else ''}"
    picture = save_pictures(pictures, out / f"{name}.png")
    last = result.history[-1] if result is not None and result.history else {}
    summary = {
        "variant": args.variant, "overrides": args.overrides, "steps": args.supervised or args.steps, "data_seeds": args.data_seeds,
        "supervised": {"net": args.supervised_net, "gradient_weight": args.supervised_gradient_weight,
                       "loss_every_50_steps": supervised_history} if args.supervised > 0 else None, "uv_size": args.uv_size, "photos": n_people,
        "expressions": args.expressions, "albedo_sigma": args.albedo_sigma, "oracle_albedo": args.oracle_albedo, "float_photos": args.float_photos, "wrinkle_spacing": args.wrinkle_spacing, "train_variants": len(train_index), "heldout_variants": len(test_index),
        "loss_weights": config["loss_weights"], "detail_regularization": config["detail_regularization"],
        "heldout": metrics, "train": {k: train_metrics[k] for k in ("coarse", "detailed", "normal_error_ratio")},
        "final_losses": {k: v for k, v in last.items() if k.startswith("loss_")},
        "seconds": {"data": round(prepared, 1), "train": round(trained, 1), "total": round(time.perf_counter() - tic, 1)},
        "picture": str(picture),
    }
    atomic_write_bytes(out / f"{name}.json", json.dumps(summary, indent=1).encode())
    h = metrics
    print(f"held-out ({len(test_index)} variants of {len(heldout_people)} photos), face region:")
    for name in ("coarse", "detailed", "retarget_coarse", "retarget", "coarse_zone", "detailed_zone"):
        print(f"  {name:22s} displacement RMSE {h[name]['displacement_rmse_mm']:.3f} mm   normal error {h[name]['normal_error_deg']:.2f} deg")
    print(f"  detailed/coarse normal error {h['normal_error_ratio']:.2f} (target <= 0.5); "
          f"re-targeted/detailed {h['retarget_over_detailed']:.2f} (target <= 1.5); train detailed/coarse "
          f"{train_metrics['normal_error_ratio']:.2f}")
    print("  held-out photometric loss (coarse / ground-truth displacement / predicted): "
          + " / ".join(f"{h['photometric'][k]:.5f}" for k in ("coarse", "ground_truth", "detailed")))
    print("  held-out shading-gradient loss (coarse / ground-truth displacement / predicted): "
          + " / ".join(f"{h['gradient_photometric'][k]:.5f}" for k in ("coarse", "ground_truth", "detailed")))
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_weights"}), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
