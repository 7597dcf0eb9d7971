"""``facedetail`` command line: ``fit``, ``reconstruct`` and ``retarget`` on folders of photos.

Examples::

    facedetail fit ../shared/assets/faces/portraits out/fit
    facedetail reconstruct ../shared/assets/faces/in_the_wild out/recon            # latest trained checkpoint
    facedetail reconstruct photos/ out/ --model models:/facedetail-detail-generator@champion
    facedetail retarget source.jpg smile.jpg frown.jpg out/retarget --checkpoint model.pt

Parameters come from the project's ``conf/`` (``--conf-source``, ``--env``) through Kedro's
``OmegaConfigLoader`` with the project's settings, so a user's ``conf/local`` applies exactly as for
``kedro run``; relative paths in them are taken from the project root (the folder holding ``conf/``).
Exit status: 0 on success, 1 when nothing could be produced (no face in any image), 2 for bad input
(missing folder, no images, missing checkpoint, bad configuration), with a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import click

logger = logging.getLogger("facedetail.cli")

#: Default location of the trained checkpoint (the train pipeline's versioned ``detail_model`` dataset).
DEFAULT_CHECKPOINT = "data/06_models/detail_generator.pt"
#: URI prefixes resolved through MLflow (anything else is a local path).
MLFLOW_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
#: Parameter paths (block, key) that name files/folders, resolved against the project root when relative.
PATH_PARAMETERS = (
    ("face_model", "ict_path"), ("face_model", "bfm_path"), ("face_model", "bfm_uv_path"),
    ("weights", "bisenet"), ("weights", "deng_regressor"), ("weights", "facenet"), ("weights", "facenet_cache"),
    ("estimation", "cache_dir"), ("inference", "output_dir"),
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- configuration


def find_project_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder (``start`` or a parent; default the working directory) holding ``conf/base``; else None.

    Never the checkout this package was installed from: outside a project the CLI uses
    :func:`packaged_conf_source` and :func:`user_cache_dir` instead.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "conf" / "base").is_dir():
            return folder
    return None


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/facedetail`` (default ``~/.cache/facedetail``): the CLI's root outside a Kedro project
    (estimation cache, default checkpoint ``data/06_models/...``, ``mlruns.db``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "facedetail"


def packaged_conf_source() -> Path:
    """The ``conf/`` defaults shipped in the package (``facedetail/default_conf/base`` = the project's
    ``conf/base``: a symlink in the source tree, copied into wheels)."""
    return Path(__file__).resolve().parent / "default_conf"


def _conf_source(conf_source: str | None) -> tuple[Path, Path]:
    """``(conf folder, project root)``; outside a project the packaged defaults and the user cache dir."""
    if conf_source:
        path = Path(conf_source).expanduser().resolve()
        if not (path / "base").is_dir():
            raise CliError(f"--conf-source {conf_source}: no 'base' folder there (expected a Kedro conf/ folder with base/)")
        return path, path.parent
    root = find_project_root()
    if root is not None:
        return root / "conf", root
    packaged = packaged_conf_source()
    if not (packaged / "base").is_dir():
        raise CliError("no Kedro project here and no packaged defaults (reinstall facedetail or pass --conf-source PATH)")
    cache = user_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    print(f"facedetail: no Kedro project here; packaged default configuration, cache and outputs of relative "
          f"paths in {cache}", file=sys.stderr)
    return packaged, cache


def _resolve_paths(params: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """Make the file/folder parameters of :data:`PATH_PARAMETERS` absolute (relative = from the project root)."""
    for block, key in PATH_PARAMETERS:
        section = params.get(block)
        if not isinstance(section, dict):
            continue
        value = section.get(key)
        if isinstance(value, str) and value.strip() not in ("", "None", "null") and not Path(value).is_absolute():
            section[key] = str((project_root / value).resolve())
    return params


def load_project_config(conf_source: str | None = None, env: str | None = None) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """``(parameters, mlflow config, project root)`` from the project's conf/ with the project's loader settings.

    Raises:
        CliError: no conf/ folder, an unknown environment or malformed YAML.
    """
    # kedro only here: the reconstruction modules stay Kedro-free
    from facedetail.config_loader import ProjectConfigLoader, UnknownEnvironmentError
    from facedetail.settings import CONFIG_LOADER_ARGS

    source, root = _conf_source(conf_source)
    if env is None and not (source / str(CONFIG_LOADER_ARGS["default_run_env"])).is_dir():
        env = str(CONFIG_LOADER_ARGS["base_env"])  # no conf/local (packaged defaults, fresh clone): base only
    try:
        loader = ProjectConfigLoader(conf_source=str(source), env=env, **CONFIG_LOADER_ARGS)
    except UnknownEnvironmentError as error:
        raise CliError(f"--env {env}: {error}") from error
    try:
        parameters = dict(loader["parameters"])
        try:
            mlflow_config = dict(loader["mlflow"])
        except Exception:  # noqa: BLE001 - no mlflow.yml is fine
            mlflow_config = {}
    except CliError:
        raise
    except Exception as error:  # noqa: BLE001 - YAML/interpolation errors
        raise CliError(f"cannot load the configuration from {source}: {type(error).__name__}: {error}") from error
    return _resolve_paths(parameters, root), mlflow_config, root


def tracking_uri_from_config(mlflow_config: dict[str, Any], project_root: Path) -> str:
    """MLflow tracking URI of ``mlflow.yml`` (default ``sqlite:///mlruns.db``), relative SQLite paths from the project root."""
    uri = str((mlflow_config.get("server") or {}).get("mlflow_tracking_uri") or "sqlite:///mlruns.db")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((project_root / uri[len(prefix):]).resolve())
    return uri


# ---------------------------------------------------------------------------------------------- inputs


def list_images(folder: str | os.PathLike, extensions: Sequence[str] | None = None) -> tuple[list[Path], list[str]]:
    """:func:`facedetail.engine.inputs.list_images` (default: its image extensions), its errors as :class:`CliError`."""
    from facedetail.engine.inputs import DEFAULT_IMAGE_EXTENSIONS, InputError, list_images as engine_list_images

    try:
        return engine_list_images(folder, extensions or DEFAULT_IMAGE_EXTENSIONS)
    except InputError as error:
        raise CliError(str(error)) from error


def resolve_checkpoint(model_uri_or_path: str | None, project_root: str | os.PathLike | None = None,
                       tracking_uri: str | None = None) -> Path:
    """Find the checkpoint file to load.

    Args:
        model_uri_or_path: None (the latest version of ``data/06_models/detail_generator.pt`` under the project
            root), a file / Kedro versioned folder, or an MLflow URI (``models:/<name>/<version-or-alias>``,
            ``runs:/<run>/<path>``): the registered pyfunc's artifact ``checkpoint`` is downloaded.
        project_root: folder the default and relative paths are taken from (default: working directory).
        tracking_uri: MLflow tracking/registry URI for model URIs.

    Raises:
        CliError: nothing found (message says where it looked and what to do).
    """
    from facedetail.engine.checkpoint import latest_versioned_file
    from facedetail.training.checkpoint import CheckpointError

    root = Path(project_root) if project_root is not None else Path.cwd()
    if model_uri_or_path and model_uri_or_path.startswith(MLFLOW_URI_SCHEMES):
        return _download_mlflow_checkpoint(model_uri_or_path, tracking_uri)
    path = Path(model_uri_or_path) if model_uri_or_path else root / DEFAULT_CHECKPOINT
    if not path.is_absolute() and not path.exists() and (root / path).exists():
        path = root / path
    try:
        return latest_versioned_file(path)
    except CheckpointError as error:
        hint = "" if model_uri_or_path else " (no trained model yet: run `kedro run --pipelines=train`, or pass --checkpoint/--model)"
        raise CliError(f"{error}{hint}") from error


def describe_model(model_uri: str | None, tracking_uri: str | None) -> str:
    """``"<uri> (version N, registry <tracking uri>), "`` for an MLflow model URI (version looked up for
    ``models:/<name>@<alias>``); ``""`` for local checkpoints."""
    if not model_uri:
        return ""
    version = ""
    body = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    try:
        if "@" in body:
            from mlflow import MlflowClient

            name, alias = body.rstrip("/").split("@", 1)
            version = f"version {MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias).version}, "
        elif body.count("/") == 1 and body.split("/")[1].isdigit():
            version = f"version {body.split('/')[1]}, "
    except Exception:  # noqa: BLE001 - the description is informative only
        version = ""
    return f"{model_uri} ({version}registry {tracking_uri}), "


def _checkpoint_artifact_path(mlmodel_file: Path, model_uri: str) -> str:
    """Relative path of the ``checkpoint`` artifact recorded in a pyfunc model's MLmodel file."""
    import yaml

    spec = yaml.safe_load(mlmodel_file.read_text()) or {}
    artifacts = (spec.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    if "checkpoint" not in artifacts:
        raise CliError(f"{model_uri} has no artifact named 'checkpoint' (artifacts: {sorted(artifacts)}); is it a facedetail model?")
    return str(artifacts["checkpoint"]["path"])


def _download_mlflow_checkpoint(model_uri: str, tracking_uri: str | None) -> Path:
    """Download the ``checkpoint`` artifact of a registered pyfunc model (its MLmodel names the file).

    Registered URIs (``models:/<name>/<version>``, ``models:/<name>@<alias>``) fetch only MLmodel and the checkpoint;
    other URIs (``models:/m-<logged model id>``, ``runs:/...``) download the whole model folder.
    """
    import tempfile

    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    uri = model_uri.rstrip("/")
    target = Path(tempfile.mkdtemp(prefix="facedetail_model_"))
    try:
        try:
            mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(target / "meta")))
            relative = _checkpoint_artifact_path(mlmodel, model_uri)
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{relative}", dst_path=str(target)))
        except CliError:
            raise
        except Exception:  # noqa: BLE001 - URI forms without sub-paths: fetch the whole model
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target / "model")))
            return folder / _checkpoint_artifact_path(folder / "MLmodel", model_uri)
    except CliError:
        raise
    except Exception as error:  # noqa: BLE001 - registry/network/missing model errors
        raise CliError(f"cannot load the checkpoint of {model_uri} from MLflow ({tracking_uri or mlflow.get_tracking_uri()}): "
                       f"{type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------- commands


def _write_report(rows: list[dict[str, Any]], path: Path) -> Path:
    from facedetail.engine.export import write_report

    return write_report(rows, path)


def _setup(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], Path]:
    params, mlflow_config, root = load_project_config(args.conf_source, args.env)
    if args.device:
        params["device"] = args.device
    if getattr(args, "units", None):
        params["inference"] = {**(params.get("inference") or {}), "export_units": args.units}
    if getattr(args, "no_cache", False):
        params.setdefault("estimation", {})["cache"] = False
    if getattr(args, "export_size", None):
        if args.export_size < 8:
            raise CliError(f"--export-size must be >= 8 texels, got {args.export_size}")
        params["inference"] = {**(params.get("inference") or {}), "export_size": int(args.export_size)}
    _validate(params)
    _check_device(str(params.get("device", "auto")))  # after the schema: a malformed name gets the schema's message
    return params, mlflow_config, root


def _check_device(device: str) -> None:
    """``cuda`` on a machine without CUDA (or a malformed device) -> :class:`CliError` (one line, exit status 2)."""
    from facedetail.utils import resolve_device

    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as error:
        raise CliError(f"--device {device}: {error}") from error


def _validate(params: dict[str, Any]) -> None:
    """Check the parameters (with the command-line overrides) against ``facedetail.config``'s schemas.

    Raises:
        CliError: every problem, in one line (exit status 2).
    """
    from facedetail.config import ParameterError, validate_parameters

    try:
        validate_parameters(params)
    except ParameterError as error:
        raise CliError(f"{error} (fix them in conf/ or with the matching option)") from error


def _extensions(params: dict[str, Any]) -> list[str]:
    from facedetail.engine.inputs import DEFAULT_IMAGE_EXTENSIONS

    return list(params.get("data_prep", {}).get("image_extensions", DEFAULT_IMAGE_EXTENSIONS))


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"OUT_DIR {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_fit(args: argparse.Namespace) -> int:
    """``facedetail fit IMAGE_DIR OUT_DIR``: landmarks, mask source and coefficients per face (JSON + overlay)."""
    from tqdm.auto import tqdm

    from facedetail.engine.export import export_fit
    from facedetail.engine.fitter import FaceFitter, torch_threads
    from facedetail.io.face_ids import image_stems

    params, _, _ = _setup(args)
    files, names = list_images(args.image_dir, _extensions(params))
    out = _out_dir(args.out_dir)
    fitter = FaceFitter.from_params(params, params.get("device", "auto"))
    stems = image_stems(names)
    rows: list[dict[str, Any]] = []
    faces_written = 0
    try:
        with tqdm(total=len(files), desc="fit", unit="image") as bar:
            for start in range(0, len(files), args.chunk_size):
                part = slice(start, start + args.chunk_size)
                with torch_threads((params.get("inference") or {}).get("cpu_threads")):
                    faces = fitter.fit_images(files[part], names[part], stems=stems[part], progress=False)
                for face in faces:
                    export_fit(face, out, fitter.face_model)
                faces_written += len(faces)
                rows.extend(fitter.last_report)
                bar.update(len(files[part]))
    finally:
        fitter.close()
    report = _write_report(rows, out / "fit_report.csv")
    skipped = sorted({row["image"] for row in rows if row["status"] != "ok"})
    print(f"fit: {faces_written} face(s) from {len(files)} image(s) -> {out}; {len(skipped)} image(s) with problems (see {report})")
    if faces_written == 0:
        raise CliError(f"no face could be fitted in {args.image_dir} (reasons in {report})", code=1)
    return 0


def _reconstructor(args: argparse.Namespace, params: dict[str, Any], mlflow_config: dict[str, Any], root: Path):
    from facedetail.engine.reconstructor import Reconstructor
    from facedetail.training.checkpoint import CheckpointError

    if args.model and args.checkpoint:
        raise CliError("pass either --model or --checkpoint, not both")
    tracking_uri = tracking_uri_from_config(mlflow_config, root)
    checkpoint = resolve_checkpoint(args.model or args.checkpoint, root, tracking_uri)
    print(f"model: {describe_model(args.model, tracking_uri)}checkpoint {checkpoint}")
    try:
        return Reconstructor.from_params(checkpoint, params, params.get("device", "auto"))
    except CheckpointError as error:
        raise CliError(str(error)) from error


def command_reconstruct(args: argparse.Namespace) -> int:
    """``facedetail reconstruct IMAGE_DIR OUT_DIR``: meshes, maps, coefficients, strips and JSON per face."""
    from facedetail.engine.export import export_face

    params, mlflow_config, root = _setup(args)
    files, names = list_images(args.image_dir, _extensions(params))
    out = _out_dir(args.out_dir)
    faces_written = 0
    units = (params.get("inference") or {}).get("export_units")
    with _reconstructor(args, params, mlflow_config, root) as reconstructor:
        rows_by_face: dict[str, dict[str, Any]] = {}
        for rec in reconstructor.iter_reconstructions(files, names, chunk_size=args.chunk_size):
            written = export_face(rec, out, reconstructor.face_model, units=units)
            rows_by_face[rec.face_id] = {name: Path(path).name for name, path in written.items()}
            faces_written += 1
        rows = [{**row, **rows_by_face.get(row["face_id"], {})} for row in reconstructor.last_report]
    report = _write_report(rows, out / "reconstruct_report.csv")
    skipped = sorted({row["image"] for row in rows if row["status"] != "ok"})
    print(f"reconstruct: {faces_written} face(s) from {len(files)} image(s) -> {out}; "
          f"{len(skipped)} image(s) with problems (see {report})")
    if faces_written == 0:
        raise CliError(f"no face could be reconstructed in {args.image_dir} (reasons in {report})", code=1)
    return 0


def command_retarget(args: argparse.Namespace) -> int:
    """``facedetail retarget SOURCE EXPRESSION... OUT_DIR``: the source face with each photo's expression."""
    from facedetail.engine.retarget import NoFaceError, retarget_photos

    if len(args.paths) < 3:
        raise CliError("retarget needs SOURCE_IMAGE, at least one EXPRESSION_IMAGE (or folder) and OUT_DIR")
    source_path, expression_args, out_arg = Path(args.paths[0]), args.paths[1:-1], args.paths[-1]
    params, mlflow_config, root = _setup(args)
    if not source_path.is_file():
        raise CliError(f"source image not found: {source_path}")
    expression_files: list[Path] = []
    for item in expression_args:
        files, _ = list_images(item, _extensions(params))
        expression_files.extend(files)
    out = _out_dir(out_arg)
    with _reconstructor(args, params, mlflow_config, root) as reconstructor:
        try:
            outcome = retarget_photos(reconstructor, source_path, expression_files, out, source_face=args.source_face,
                                      frames=args.frames, fps=args.fps,
                                      units=(params.get("inference") or {}).get("export_units"))
        except NoFaceError as error:
            raise CliError(str(error), code=1) from error
        except ValueError as error:
            raise CliError(str(error)) from error
    print(f"retarget: {outcome.source.face_id} with {len(outcome.results)} expression(s) -> {out} "
          f"(retarget_strip.png, expression_sweep.gif, {outcome.frames} frames)")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from facedetail import __version__

    parser = argparse.ArgumentParser(prog="facedetail", description="Detailed 3D face reconstruction from photos.")
    parser.add_argument("--version", action="version", version=f"facedetail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{fit,reconstruct,retarget}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--conf-source", default=None, help="Kedro conf/ folder (default: the project's conf/)")
        p.add_argument("--env", default=None, help="configuration environment over base (default: local)")
        p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: parameters' device)")
        p.add_argument("--no-cache", action="store_true", help="do not read/write the per-face estimation cache")
        p.add_argument("--chunk-size", type=int, default=8, help="images detected/estimated together (memory bound)")
        p.add_argument("--verbose", action="store_true",
                       help="show INFO logs and MediaPipe/TFLite native logging (quiet by default)")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--export-size", type=int, default=None,
                       help="UV side of the exported maps and dense mesh (default: inference.export_size, 256)")
        p.add_argument("--units", choices=("mm", "cm", "m"), default=None,
                       help="units of the OBJ meshes and displacement values (default: inference.export_units, cm); "
                            "the GLB is always in metres")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--model", default=None, help="MLflow model URI, e.g. models:/facedetail-detail-generator/1")
        group.add_argument("--checkpoint", default=None,
                           help=f"checkpoint file or Kedro versioned folder (default: latest {DEFAULT_CHECKPOINT})")

    fit = sub.add_parser("fit", help="landmarks, masks and 3DMM coefficients per face (JSON + overlay)")
    fit.add_argument("image_dir", help="folder of photos (searched recursively) or one photo")
    fit.add_argument("out_dir")
    common(fit)
    fit.set_defaults(handler=command_fit)

    recon = sub.add_parser("reconstruct", help="detailed meshes, displacement/normal maps, renders per face")
    recon.add_argument("image_dir", help="folder of photos (searched recursively) or one photo")
    recon.add_argument("out_dir")
    model_options(recon)
    common(recon)
    recon.set_defaults(handler=command_reconstruct)

    retarget = sub.add_parser("retarget", help="give a source face the expressions of other photos (riggable details)")
    retarget.add_argument("paths", nargs="+", metavar="PATH", help="SOURCE_IMAGE EXPRESSION_IMAGES... OUT_DIR")
    retarget.add_argument("--source-face", type=int, default=0, help="which face of the source photo (left to right)")
    retarget.add_argument("--frames", type=int, default=12, help="frames per expression in expression_sweep.gif")
    retarget.add_argument("--fps", type=float, default=12.0)
    model_options(retarget)
    common(retarget)
    retarget.set_defaults(handler=command_retarget)
    return parser


@click.group(name="facedetail")
def cli() -> None:
    """Project commands for the ``kedro`` CLI (none).

    Kedro imports ``<package>.cli`` on every ``kedro`` command and refuses to start when it has no ``cli`` click
    group; the user-facing commands are the ``facedetail`` console script (:func:`main`), not ``kedro`` ones.
    """


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``facedetail`` console script; returns the exit status."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        from facedetail import native_logging

        native_logging(verbose=True)  # before MediaPipe/TFLite are imported (the commands import them lazily)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "chunk_size", 1) < 1:
        print("facedetail: error: --chunk-size must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from facedetail.utils import SettingError  # here: utils imports torch, `kedro` imports this module on every command

    try:
        return int(args.handler(args) or 0)
    except CliError as error:
        print(f"facedetail {args.command}: error: {error}", file=sys.stderr)
        return error.code
    except (FileNotFoundError, SettingError) as error:  # one line, no traceback: the path and the setting to change
        print(f"facedetail {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full: name the file being written
            print(f"facedetail {args.command}: error: {error.strerror}: '{error.filename}' (free space there, or "
                  "choose another OUT_DIR / estimation.cache_dir)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
