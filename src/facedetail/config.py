"""Schemas of the project's parameters, checked before any work (Kedro-free).

One pydantic model per top-level section of ``conf/*/parameters*.yml`` (``device``, ``seed``, ``assets``,
``face_model``, ``weights``, ``data_prep``, ``estimation``, ``uv_maps``, ``train``, ``evaluate``, ``inference``).
Every model forbids unknown keys (a typo such as ``train.stpes`` is an error), checks types and ranges, and
:func:`validate_parameters` reports EVERY problem in one line with its dotted key::

    from facedetail.config import ParameterError, validate_parameters
    validate_parameters(params)        # raises ParameterError("invalid parameters (2 problems): train.steps: ...")

Adding a key is one line in its section's model; adding a section is one model plus one line in
:data:`SECTION_SCHEMAS`. Top-level sections without a schema are accepted with a warning (a typo of a
known section name is reported as an error with the close match).

Wiring: :class:`facedetail.hooks.ValidateParametersHook` (``before_pipeline_run`` of every ``kedro run``)
and ``facedetail.cli._setup`` (every CLI command) call :func:`validate_parameters`.
"""
from __future__ import annotations

import difflib
import logging
import re
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ParameterError", "validate_parameters", "parameter_problems", "SECTION_SCHEMAS"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- building blocks

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
#: A file/folder setting; empty (or null) means "not set" where the code allows it.
PathSetting = str | None
RasterBackend = Literal["auto", "fast", "pytorch3d"]
NormKind = Literal["instance", "batch", "none"]
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Section(BaseModel):
    """A parameters block: unknown keys are errors, values are checked as given (never rewritten)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- parameters.yml


class FaceModelParams(Section):
    kind: Literal["ict", "bfm"] = "ict"
    ict_path: str
    bfm_path: str
    bfm_uv_path: PathSetting = None
    close_holes: bool = True


class WeightsParams(Section):
    bisenet: PathSetting = None
    deng_regressor: PathSetting = None
    facenet: PathSetting = None
    dlib_landmarks: PathSetting = None
    facenet_cache: str


class AssetsParams(Section):
    root: str


# ---------------------------------------------------------------------------------------------- data_prep


class DetectionParams(Section):
    min_face_size: NonNegativeFloat = 40
    min_probability: Probability = 0.95
    max_detection_side: PositiveInt = 1600
    stage_thresholds: Annotated[list[Probability], Field(min_length=3, max_length=3)] = [0.6, 0.7, 0.7]
    low_confidence_floor: NonNegativeFloat = 1.0
    retry_window_factors: list[PositiveFloat] = []
    fallback: Literal["none", "mediapipe"] = "none"
    extra_detector: Literal["none", "yunet"] = "none"
    extra_min_score: Probability = 0.3
    confirmer: Literal["none", "mmod"] = "none"
    yunet_model: str = ""
    mmod_model: str = ""


class AlignmentParams(Section):
    crop_size: PositiveInt = 224
    rescale_factor: PositiveFloat = 102.0


class ContactSheetParams(Section):
    max_faces: PositiveInt = 48
    tile_size: PositiveInt = 160


class DataPrepParams(Section):
    shard_size: PositiveInt = 256
    image_extensions: Annotated[list[str], Field(min_length=1)]
    max_image_pixels: PositiveInt
    detection: DetectionParams = DetectionParams()
    alignment: AlignmentParams = AlignmentParams()
    contact_sheet: ContactSheetParams = ContactSheetParams()


# ---------------------------------------------------------------------------------------------- estimation


class LandmarksParams(Section):
    backend: Literal["mediapipe", "dlib", "face_alignment", "auto"] = "auto"
    blend_inner: bool = True
    mirror_average: bool = True
    dlib_box: Literal["mediapipe", "hog"] = "mediapipe"


class MasksParams(Section):
    mask_labels: list[Annotated[int, Field(ge=0, le=18)]] = [1, 2, 3, 10, 12, 13]  # BiSeNet labels 0..18
    skin_threshold: Probability = 0.5
    hole_margin: NonNegativeFloat = 0.03
    min_skin_fraction: Probability = 0.2


class FittingParams(Section):
    """Mirror of :class:`facedetail.estimation.fitting.FitSettings` (tests/test_config.py keeps the two in step)."""

    rigid_steps: NonNegativeInt = 60
    landmark_steps: NonNegativeInt = 400
    photometric_steps: NonNegativeInt = 30
    lr_angles: PositiveFloat = 0.02
    lr_trans_cm: PositiveFloat = 0.2
    lr_id: PositiveFloat = 0.05
    lr_exp: PositiveFloat = 0.03
    lr_tex: PositiveFloat = 0.05
    lr_gamma: PositiveFloat = 0.01
    photometric_lr_scale: PositiveFloat = 0.1
    landmark_lr_final: PositiveFloat = 0.02
    w_landmark: NonNegativeFloat = 0.3
    w_photometric: NonNegativeFloat = 1.0
    w_id: NonNegativeFloat = 2e-3
    w_exp: NonNegativeFloat = 2e-3
    w_tex: NonNegativeFloat = 2e-3
    w_gamma: NonNegativeFloat = 0.05
    lighting_ridge: NonNegativeFloat = 1e-2
    landmark_weights: Literal["uniform", "deng"] | Annotated[list[NonNegativeFloat], Field(min_length=68, max_length=68)] = "uniform"
    albedo_smoothing_steps: NonNegativeInt = 30
    albedo_every: PositiveInt = 5
    min_facing: Annotated[float, Field(ge=-1, le=1)] = 0.2
    early_stop_patience: PositiveInt = 40
    early_stop_rel_tol: NonNegativeFloat = 1e-3
    early_stop_per_face: bool = True
    photometric_size: Annotated[int, Field(ge=16)] | None = 64
    rasterize_every: PositiveInt = 5
    use_photometric: bool = True
    show_progress: bool = False
    cpu_threads: PositiveInt | None = 1
    sliding_contour: bool = False
    contour_every: PositiveInt = 5
    silhouette_landmarks: bool = True


class EstimationParams(Section):
    batch_size: PositiveInt = 8
    fit_batch_size: PositiveInt = 8
    cache: bool = True
    cache_dir: PathSetting = None
    facenet_embeddings: bool = True
    use_blendshape_init: bool = False
    bfm_use_regressor: bool = True
    landmarks: LandmarksParams = LandmarksParams()
    masks: MasksParams = MasksParams()
    fitting: FittingParams = FittingParams()


# ---------------------------------------------------------------------------------------------- uv_maps


class UVMapsParams(Section):
    uv_size: Annotated[int, Field(ge=8)]
    batch_size: PositiveInt = 8
    backend: RasterBackend = "auto"


# ---------------------------------------------------------------------------------------------- train


class GeneratorParams(Section):
    """Mirror of :class:`facedetail.models.detail_model.DetailGenerator`'s constructor (kept in step by a test)."""

    ngf: PositiveInt = 64
    num_downs: Annotated[int, Field(ge=1, le=12)] = 8
    norm: NormKind = "instance"
    embedding_channels: PositiveInt = 16
    regions: PositiveInt = 8
    kernel_size: PositiveInt = 3
    filter_pool: PositiveInt = 4
    filter_hidden: PositiveInt = 32
    guide_kernel_size: PositiveInt = 3
    max_displacement: PositiveFloat = 0.3
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    embedding_activation: str = "tanh"
    soft_regions: bool = False
    texture_channels: PositiveInt = 3
    mask_channels: PositiveInt = 1
    expression_channels: PositiveInt = 3
    texture_detail_gain: NonNegativeFloat = 0.0  # > 0: the texture's high-pass x gain as extra U-Net inputs
    texture_detail_sigma: PositiveFloat = 2.0  # texels; the blur of that high-pass
    pattern_head: bool = False  # + pattern(embedding) x drive(expression map) before the tanh (DetailGenerator)


class DiscriminatorParams(Section):
    ndf: PositiveInt = 64
    n_layers: PositiveInt = 3
    norm: NormKind = "instance"
    conditional: bool = True


class OptimizerParams(Section):
    lr: PositiveFloat
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.999)
    lr_decay_final: Probability = 1.0


class LossWeightsParams(Section):
    photometric: NonNegativeFloat = 1.0
    perceptual: NonNegativeFloat = 0.0
    adversarial: NonNegativeFloat = 0.0
    uv_photometric: NonNegativeFloat = 0.0  # DECA-style photometric term in UV space (training.loop); 0 = off
    gradient_photometric: NonNegativeFloat = 0.0  # shading-gradient (high-pass) photometric term (training.loop); 0 = off
    detail_lowpass: NonNegativeFloat = 0.0  # low-pass displacement regulariser (training.loop); 0 = off


class ScheduleParams(Section):
    """``facedetail.losses.schedules`` (start/end >= 0; exponential needs both > 0)."""

    start: NonNegativeFloat
    end: NonNegativeFloat
    decay_steps: NonNegativeInt
    kind: Literal["linear", "exponential", "cosine", "constant"]

    @model_validator(mode="after")
    def _exponential_positive(self) -> "ScheduleParams":
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError(f"exponential decay needs start > 0 and end > 0 (got start={self.start}, end={self.end}); "
                             "use linear or cosine")
        return self


class StreamingParams(Section):
    shuffle_buffer: NonNegativeInt = 256
    num_workers: NonNegativeInt = 0
    prefetch_factor: PositiveInt = 2
    split: Literal["auto", "sample", "shard"] = "auto"
    min_shards_per_consumer: PositiveInt = 2


class TrainParams(Section):
    validation_fraction: Probability
    split_seed: int = 0
    image_size: PositiveInt = 224
    model: GeneratorParams
    discriminator: DiscriminatorParams
    optimizer: OptimizerParams
    steps: PositiveInt
    batch_size: PositiveInt
    albedo_blur_sigma: NonNegativeFloat = 2.0
    albedo_shading: Literal["coarse", "detailed"] = "coarse"  # de-light with the coarse or the current detailed shading
    detail_lowpass_sigma: PositiveFloat = 3.0  # texels; blur of the loss_weights.detail_lowpass term
    loss_weights: LossWeightsParams
    detail_regularization: ScheduleParams
    nan_tolerance: NonNegativeInt = 5
    mixed_precision: bool = True
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 3
    checkpoint_dir: str = "data/06_models/checkpoints"
    resume: bool = True
    log_checkpoint_artifact: bool = True
    log_every: PositiveInt = 10
    image_log_every: PositiveInt = 100
    registered_model_name: Annotated[str, Field(min_length=1)]
    backend: RasterBackend = "auto"
    scene_cache_faces: NonNegativeInt = 512
    streaming: StreamingParams = StreamingParams()


# ---------------------------------------------------------------------------------------------- evaluate, inference


class EvaluateParams(Section):
    faces: Literal["validation", "all"] = "validation"
    facenet: bool = True
    batch_size: PositiveInt = 8


class InferenceParams(Section):
    output_dir: str
    batch_size: PositiveInt = 4
    chunk_size: PositiveInt = 8
    export_size: Annotated[int, Field(ge=8)] = 256
    export_units: Literal["mm", "cm", "m"] = "cm"
    backend: RasterBackend = "auto"
    cpu_threads: PositiveInt | None = None


# ---------------------------------------------------------------------------------------------- execution


class ExecutionParams(Section):
    scheduler: Annotated[str, Field(pattern=r"^(local|synchronous|(tcp|tls|ucx|inproc)://.+)$")] = "local"
    n_workers: PositiveInt | None = None
    threads_per_worker: PositiveInt = 1
    retries: Annotated[int, Field(ge=0)] = 2
    connect_timeout: PositiveFloat = 10
    work_dir: str = "data/02_intermediate/shard_work"


# ---------------------------------------------------------------------------------------------- scalars


class DeviceParam(BaseModel):
    value: str

    @field_validator("value")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class SeedParam(BaseModel):
    value: Annotated[int, Field(ge=0)]


#: Top-level key -> schema. Scalar settings use a model with one field ``value``.
SECTION_SCHEMAS: dict[str, type[BaseModel]] = {
    "device": DeviceParam,
    "seed": SeedParam,
    "assets": AssetsParams,
    "face_model": FaceModelParams,
    "weights": WeightsParams,
    "data_prep": DataPrepParams,
    "estimation": EstimationParams,
    "uv_maps": UVMapsParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "inference": InferenceParams,
    "execution": ExecutionParams,
}
_SCALAR_SECTIONS = {"device", "seed"}


class ParameterError(ValueError):
    """Invalid parameters; ``problems`` holds one ``"dotted.key: reason"`` string per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"invalid parameters ({count} problem{'s' if count != 1 else ''}): " + "; ".join(self.problems))


_WORDING = (("Input should be", "must be"), ("greater than or equal to", ">="), ("less than or equal to", "<="),
            ("greater than", ">"), ("less than", "<"))


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> dict[str, Any]:
    """Set ``tree["a"]["b"]["c"] = value`` for ``dotted_key`` ``"a.b.c"`` (missing levels are created); returns ``tree``.

    The one home of parameter overrides written as dotted keys (``--params a.b=1``, benchmark ``--set``)."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return tree


def _dotted(section: str, loc: tuple[Any, ...]) -> str:
    key = section
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}"
    return key


def _describe(error: Mapping[str, Any], section: str, schema: type[BaseModel]) -> str:
    loc = tuple(error.get("loc", ()))
    if section in _SCALAR_SECTIONS:
        loc = loc[1:]  # drop the wrapper field "value"
    key = _dotted(section, loc)
    if error["type"] == "extra_forbidden":
        model: Any = schema
        for part in loc[:-1]:  # walk to the model holding the unknown key, to suggest a close known one
            field = getattr(model, "model_fields", {}).get(part)
            model = getattr(field, "annotation", None) if field is not None else None
        known = list(getattr(model, "model_fields", {}) or [])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (known: {', '.join(known)})" if known else "")
        return f"{key}: unknown key{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    for long, short in _WORDING:
        message = message.replace(long, short)
    if error["type"] == "missing":
        return f"{key}: missing (required)"
    value = error.get("input")
    return f"{key}: {message}" if isinstance(value, Mapping) else f"{key}: {message} (got {value!r})"


def _cross_checks(params: Mapping[str, Any]) -> list[str]:
    """Checks spanning sections (only when both sides are present and valid on their own)."""
    problems = []
    uv_size = (params.get("uv_maps") or {}).get("uv_size") if isinstance(params.get("uv_maps"), Mapping) else None
    model = (params.get("train") or {}).get("model") if isinstance(params.get("train"), Mapping) else None
    num_downs = model.get("num_downs") if isinstance(model, Mapping) else None
    if isinstance(uv_size, int) and isinstance(num_downs, int) and 1 <= num_downs <= 12 and uv_size % 2**num_downs:
        problems.append(f"uv_maps.uv_size: must be a multiple of 2**train.model.num_downs = {2**num_downs} "
                        f"(got {uv_size}; e.g. {max(1, round(uv_size / 2**num_downs)) * 2**num_downs})")
    return problems


def parameter_problems(params: Mapping[str, Any], sections: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Every problem of ``params`` (a Kedro ``parameters`` dict) as ``"dotted.key: reason"``; empty when valid.

    Args:
        params: the merged parameters (all envs and runtime overrides applied).
        sections: only these top-level sections (default: every section present).
    """
    problems: list[str] = []
    for section, value in params.items():
        if sections is not None and section not in sections:
            continue
        schema = SECTION_SCHEMAS.get(section)
        if schema is None:
            close = difflib.get_close_matches(section, list(SECTION_SCHEMAS), n=1, cutoff=0.8)
            if close:
                problems.append(f"{section}: unknown section (did you mean '{close[0]}'?)")
            else:
                logger.warning("parameters section '%s' has no schema in facedetail.config: not validated", section)
            continue
        try:
            if section in _SCALAR_SECTIONS:
                schema.model_validate({"value": value})
            elif not isinstance(value, Mapping):
                problems.append(f"{section}: must be a mapping of settings (got {value!r})")
            else:
                schema.model_validate(dict(value))
        except ValidationError as error:
            problems.extend(_describe(e, section, schema) for e in error.errors())
    problems.extend(_cross_checks(params))
    return problems


def validate_parameters(params: Mapping[str, Any], sections: list[str] | tuple[str, ...] | None = None) -> None:
    """Raise :class:`ParameterError` listing every problem of ``params`` (see :func:`parameter_problems`)."""
    problems = parameter_problems(params, sections)
    if problems:
        raise ParameterError(problems)
