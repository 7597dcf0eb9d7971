"""Tests of the ``facedetail`` command line (fit, reconstruct, retarget) and checkpoint resolution.

The commands run in-process through :func:`facedetail.cli.main` on real photos (symlinked from
../shared/assets into tmp folders) with a tiny, seeded, freshly initialised detail generator.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from facedetail.cli import CliError, list_images, main, resolve_checkpoint, tracking_uri_from_config
from facedetail.models.detail_model import DetailGenerator
from tests.conftest import CONF as CONF_DIR, EXPRESSIONS, ICT_PATH, OBAMA, REPO_ROOT, TWO_PEOPLE

PROJECT = REPO_ROOT
CONF = str(CONF_DIR)
ICT = ICT_PATH
COMMON = ["--conf-source", CONF, "--device", "cpu", "--no-cache"]

needs_assets = pytest.mark.skipif(
    not (OBAMA.is_file() and TWO_PEOPLE.is_file()),
    reason=f"needs ../shared/assets/faces/portraits ({OBAMA.name}, {TWO_PEOPLE.name}); not present on this machine",
)


def write_tiny_checkpoint(path: Path, uv_size: int = 32, step: int = 3) -> Path:
    """A checkpoint file in the train pipeline's format (seeded fresh generator)."""
    torch.manual_seed(0)
    generator = DetailGenerator.from_config({"ngf": 8, "num_downs": 3, "embedding_channels": 4, "regions": 2, "filter_hidden": 8})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": generator.state_dict(), "model_config": generator.config, "uv_size": uv_size,
                "face_model_kind": "ict", "step": step, "albedo_blur_sigma": 2.0}, path)
    return path


def photo_folder(folder: Path, *photos: Path) -> Path:
    """A folder of symlinks to asset photos (assets are never copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> list[str]:
    """CLI options using a user environment ``fast`` over the project's conf/base (shorter fits, absolute model path).

    Also checks that a user's conf applies: the environment's values are what the commands use.
    """
    conf = tmp_path_factory.mktemp("project") / "conf"
    conf.mkdir()
    (conf / "base").symlink_to(PROJECT / "conf" / "base")
    (conf / "fast").mkdir()
    (conf / "fast" / "parameters_fast.yml").write_text(
        f"face_model:\n  ict_path: {ICT}\n"
        "estimation:\n  fitting:\n    rigid_steps: 30\n    landmark_steps: 80\n    photometric_steps: 15\n"
        "inference:\n  cpu_threads: 1\n"
    )
    return ["--conf-source", str(conf), "--env", "fast", "--device", "cpu", "--no-cache"]


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_folder_gives_exit_2_and_names_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["fit", str(missing), str(tmp_path / "out"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "image folder not found" in err and str(missing) in err


def test_folder_without_images_gives_exit_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no photos here")
    assert main(["reconstruct", str(tmp_path / "in"), str(tmp_path / "out"), *COMMON]) == 2
    assert "no images in" in capsys.readouterr().err


@needs_assets
def test_missing_checkpoint_gives_exit_2(tmp_path, capsys):
    folder = photo_folder(tmp_path / "in", OBAMA)
    code = main(["reconstruct", str(folder), str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none.pt"), *COMMON])
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "none.pt" in err


def test_bad_conf_source_and_env(tmp_path, capsys):
    assert main(["fit", str(tmp_path), str(tmp_path / "out"), "--conf-source", str(tmp_path)]) == 2
    assert "no 'base' folder" in capsys.readouterr().err
    assert main(["fit", str(tmp_path), str(tmp_path / "out"), "--conf-source", CONF, "--env", "nope"]) == 2
    error = capsys.readouterr().err
    assert "--env nope" in error and "unknown Kedro environment 'nope'" in error and "base, gpu" in error
    assert len(error.strip().splitlines()) == 1


def test_version(capsys):
    from facedetail import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"facedetail {__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_with_status_2(tmp_path, capsys):
    photo_folder(tmp_path / "in", OBAMA)
    assert main(["fit", str(tmp_path / "in"), str(tmp_path / "out"), "--conf-source", CONF, "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "facedetail fit: error: --device cuda: device 'cuda' was requested but CUDA is not available on this "
        "machine; set --device / the 'device' parameter (FACEDETAIL_DEVICE) to 'auto' or 'cpu'"]
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_outside_a_project_uses_packaged_defaults_and_the_xdg_cache(tmp_path, capsys, monkeypatch):
    from facedetail.cli import find_project_root, load_project_config, packaged_conf_source

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert find_project_root() is None  # never the checkout the package is installed from
    params, _, root = load_project_config()
    assert root == tmp_path / "xdg" / "facedetail" and root.is_dir()
    assert params["estimation"]["cache_dir"] == str(root / "data/04_feature/estimation_cache")
    assert (packaged_conf_source() / "base" / "parameters.yml").is_file()
    photo_folder(tmp_path / "in", OBAMA)
    assert main(["reconstruct", str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "no Kedro project here" in error and str(root / "data/06_models/detail_generator.pt") in error


def test_model_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", str(tmp_path), str(tmp_path / "out"), "--model", "models:/x/1", "--checkpoint", "a.pt"])
    assert exit_info.value.code == 2


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "fit" in capsys.readouterr().err


def test_list_images_is_recursive_and_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.JPG", "1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    files, names = list_images(tmp_path)
    # every file is an input (a non-image gets its report row when read): nothing is dropped silently
    assert names == ["1.png", "b/2.JPG", "notes.txt"] and files[0] == tmp_path / "1.png"
    assert list_images(tmp_path / "1.png")[1] == ["1.png"]  # one file is accepted too


def test_console_script_and_kedro_project_cli():
    script = Path(sys.executable).parent / "facedetail"
    if not script.exists():
        pytest.skip(f"console script {script} not installed (pip install -e . --no-deps)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "reconstruct" in result.stdout
    # kedro imports facedetail.cli for project commands and needs its `cli` click group
    from kedro.framework.cli.cli import KedroCLI

    groups = KedroCLI(project_path=PROJECT).project_groups
    assert any(getattr(group, "name", "") == "facedetail" for group in groups)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resolve_checkpoint_local_paths(tmp_path, monkeypatch):
    file = write_tiny_checkpoint(tmp_path / "a.pt")
    assert resolve_checkpoint(str(file)) == file
    versioned = tmp_path / "data" / "06_models" / "detail_generator.pt"
    for version in ("2026-01-01T00.00.00.000Z", "2026-03-01T00.00.00.000Z"):
        write_tiny_checkpoint(versioned / version / "detail_generator.pt")
    latest = versioned / "2026-03-01T00.00.00.000Z" / "detail_generator.pt"
    assert resolve_checkpoint(None, project_root=tmp_path) == latest  # the train pipeline's default location
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths: the working directory first, then the project root
    assert resolve_checkpoint("data/06_models/detail_generator.pt", project_root=tmp_path) == latest
    with pytest.raises(CliError, match="kedro run --pipelines=train"):
        resolve_checkpoint(None, project_root=tmp_path / "empty")


def test_tracking_uri_is_taken_from_the_project_root(tmp_path):
    assert tracking_uri_from_config({}, tmp_path) == f"sqlite:///{tmp_path / 'mlruns.db'}"
    config = {"server": {"mlflow_tracking_uri": "sqlite:////abs/x.db"}}
    assert tracking_uri_from_config(config, tmp_path) == "sqlite:////abs/x.db"


def test_resolve_checkpoint_from_the_mlflow_registry(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    mlflow.set_tracking_uri(uri)
    checkpoint_file = write_tiny_checkpoint(tmp_path / "detail_generator.pt", step=11)

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    try:
        mlflow.set_experiment("cli-test")
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="detail_model", python_model=Echo(), artifacts={"checkpoint": str(checkpoint_file)},
                                           registered_model_name="facedetail-test", pip_requirements=["torch"])
        mlflow.MlflowClient().set_registered_model_alias("facedetail-test", "champion", "1")
        for model_uri in ("models:/facedetail-test/1", "models:/facedetail-test@champion", "models:/facedetail-test/latest",
                          info.model_uri):
            path = resolve_checkpoint(model_uri, tracking_uri=uri)
            assert torch.load(path, weights_only=True)["step"] == 11, model_uri
        with pytest.raises(CliError, match="facedetail-missing"):
            resolve_checkpoint("models:/facedetail-missing/1", tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------------------------------------- commands


@needs_assets
def test_fit_writes_one_json_per_face_and_a_report(tmp_path, capsys, fast):
    folder = photo_folder(tmp_path / "in", OBAMA, TWO_PEOPLE)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "out"
    assert main(["fit", str(folder), str(out), *fast]) == 0
    assert "3 face(s) from 3 image(s)" in capsys.readouterr().out
    for face_id in ("obama__f0", "two_people__f0", "two_people__f1"):
        data = json.loads((out / f"{face_id}.json").read_text())
        assert data["face_id"] == face_id and np.asarray(data["landmarks68"]).shape == (68, 2)
        assert set(data["coefficients"]) == {"id", "exp", "tex", "angles", "gamma", "trans"} and data["mask_source"]
        assert (out / f"{face_id}_overlay.png").is_file()
    # landmarks are in ORIGINAL pixels: the two faces of two_people lie in different halves of the photo
    left = np.asarray(json.loads((out / "two_people__f0.json").read_text())["landmarks68"])
    right = np.asarray(json.loads((out / "two_people__f1.json").read_text())["landmarks68"])
    assert left[:, 0].max() < right[:, 0].min()
    report = pd.read_csv(out / "fit_report.csv")
    broken = report[report["image"] == "broken.jpg"].iloc[0]
    assert broken["status"] == "unreadable" and "broken.jpg" in broken["reason"]


def test_fit_without_any_face_gives_exit_1(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(tmp_path / "in" / "grey.png")
    assert main(["fit", str(tmp_path / "in"), str(tmp_path / "out"), *COMMON]) == 1
    assert "no face could be fitted" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "out" / "fit_report.csv")["status"].tolist() == ["no_face"]


@needs_assets
def test_reconstruct_writes_the_exports(tmp_path, checkpoint, capsys, fast):
    folder = photo_folder(tmp_path / "in", OBAMA)
    out = tmp_path / "out"
    assert main(["reconstruct", str(folder), str(out), "--checkpoint", str(checkpoint), "--export-size", "128",
                 "--units", "m", *fast]) == 0
    for suffix in ("_coarse.obj", "_coarse.mtl", "_texture.png", "_detail.obj", "_displacement.png",
                   "_displacement.png.json", "_normal_object.png", "_normal_tangent_opengl.png", "_coarse.glb",
                   "_coefficients.npz", "_strip.png", ".json"):
        assert (out / f"obama__f0{suffix}").is_file(), suffix
    assert (out / "obama__f0_coarse.obj").read_text().splitlines()[1] == "# units: m"
    assert f"checkpoint {checkpoint}" in capsys.readouterr().out  # says which model it used
    report = pd.read_csv(out / "reconstruct_report.csv")
    assert report["status"].tolist() == ["ok"] and report["detail_obj"].tolist() == ["obama__f0_detail.obj"]


@needs_assets
def test_retarget_writes_meshes_strip_and_gif(tmp_path, checkpoint, capsys, fast):
    targets = [EXPRESSIONS / "3.jpg", EXPRESSIONS / "5.jpg"]
    if not all(t.is_file() for t in targets):
        pytest.skip(f"needs {EXPRESSIONS}")
    out = tmp_path / "out"
    code = main(["retarget", str(OBAMA), *map(str, targets), str(out), "--checkpoint", str(checkpoint), "--frames", "2",
                 "--export-size", "64", *fast])
    assert code == 0, capsys.readouterr().err
    summary = pd.read_csv(out / "retarget_summary.csv")
    assert summary["target_image"].tolist() == ["3.jpg", "5.jpg"]
    for face_id in summary["face_id"]:
        assert face_id.startswith("obama__f0__as__")
        assert (out / f"{face_id}_detail.obj").is_file() and (out / f"{face_id}_displacement.png").is_file()
    import imageio.v3 as iio

    gif = iio.imread(out / "expression_sweep.gif")
    assert gif.shape[0] == 3 and gif.shape[1:3] == (224, 672)  # source -> 3.jpg -> 5.jpg, 2 frames per segment
    strip = iio.imread(out / "retarget_strip.png")
    assert strip.shape[0] > 3 * 224  # source row + one row per target
    assert main(["retarget", str(OBAMA), str(out), *COMMON]) == 2  # no expression image
    assert "at least one EXPRESSION_IMAGE" in capsys.readouterr().err


def _bad_files(folder: Path, monkeypatch) -> Path:
    """Add a dangling symlink, a symlink loop and an unreadable file (chmod 000; the read fails even as root)."""
    import errno

    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    locked = folder / "u.jpg"
    locked.write_bytes(OBAMA.read_bytes())
    locked.chmod(0)
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", str(self)))
                        if self.name == "u.jpg" else real(self))
    return folder


@needs_assets
@pytest.mark.parametrize("command", ["fit", "reconstruct"])
def test_unreadable_files_are_rows_and_do_not_fail_their_chunk(tmp_path, checkpoint, capsys, fast, monkeypatch, command):
    folder = _bad_files(photo_folder(tmp_path / "in", OBAMA), monkeypatch)
    out = tmp_path / "out"
    extra = ["--checkpoint", str(checkpoint), "--export-size", "64"] if command == "reconstruct" else []
    assert main([command, str(folder), str(out), *extra, *fast, "--chunk-size", "8"]) == 0  # one chunk holds all four
    report = pd.read_csv(out / f"{command}_report.csv").set_index("image")
    assert sorted(report.index) == ["dangling.jpg", "loop.jpg", "obama.jpg", "u.jpg"]
    assert report.loc["obama.jpg", "status"] == "ok"
    assert report.loc["dangling.jpg", "reason"].endswith("dangling.jpg: broken symbolic link (its target "
                                                         f"{folder / 'gone.jpg'} does not exist)")
    assert "symbolic link loop" in report.loc["loop.jpg", "reason"]
    assert "u.jpg: permission denied" in report.loc["u.jpg", "reason"]
    assert set(report.loc[["dangling.jpg", "loop.jpg", "u.jpg"], "status"]) == {"unreadable"}


@needs_assets
@pytest.mark.parametrize("command", ["fit", "reconstruct"])
def test_every_pillow_format_gets_its_row(tmp_path, checkpoint, capsys, fast, command):
    """Issue 11: .pgm, animated .gif, multi-page .tif (first frame, said in the row) and a text file, by content."""
    import io

    import skimage.data
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    astronaut = Image.fromarray(skimage.data.astronaut())
    grey = Image.new("RGB", astronaut.size, (90, 90, 90))
    for name, fmt, extra in (("anim.gif", "GIF", {"save_all": True, "append_images": [grey], "duration": 100}),
                             ("pages.tif", "TIFF", {"save_all": True, "append_images": [grey, grey]}),
                             ("face.pgm", "PPM", {})):
        buffer = io.BytesIO()
        (astronaut.convert("L") if name.endswith(".pgm") else astronaut).save(buffer, format=fmt, **extra)
        (folder / name).write_bytes(buffer.getvalue())
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    extra = ["--checkpoint", str(checkpoint), "--export-size", "64"] if command == "reconstruct" else []
    assert main([command, str(folder), str(out), *extra, *fast]) == 0
    report = pd.read_csv(out / f"{command}_report.csv").set_index("image")
    assert sorted(report.index) == ["anim.gif", "face.pgm", "notes.txt", "pages.tif"]
    assert report.loc[["anim.gif", "face.pgm", "pages.tif"], "status"].tolist() == ["ok"] * 3
    assert "first of 2 frames used" in report.loc["anim.gif", "reason"] and report.loc["anim.gif", "frames"] == 2
    assert "first of 3 frames used" in report.loc["pages.tif", "reason"] and report.loc["pages.tif", "frames"] == 3
    assert report.loc["notes.txt", "status"] == "not_an_image"
    assert set(report.loc[["anim.gif", "face.pgm", "pages.tif"], "detection_status"]) == {"ok"}
