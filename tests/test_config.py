"""Parameters are validated before any work: schemas (facedetail.config), the Kedro hook and the CLI."""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

import pytest

from facedetail.cli import load_project_config, main
from facedetail.config import SECTION_SCHEMAS, ParameterError, parameter_problems, validate_parameters

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"


@pytest.fixture(scope="module")
def base_params():
    params, _, _ = load_project_config(str(CONF))
    return params


@pytest.mark.parametrize("env", [None, "gpu"])
def test_shipped_confs_validate_clean(env):
    params, _, _ = load_project_config(str(CONF), env)
    assert parameter_problems(params) == []
    assert set(params) <= set(SECTION_SCHEMAS)  # every shipped section has a schema


def _bad(base, **changes):
    params = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = params
        for part in parents:
            node = node[part]
        node[last] = value
    return params


@pytest.mark.parametrize(("change", "expected"), [
    ({"train__checkpoint_every": 0}, "train.checkpoint_every: must be >= 1 (got 0)"),
    ({"train__steps": 0}, "train.steps: must be >= 1 (got 0)"),
    ({"data_prep__detection__min_probability": 1.5}, "data_prep.detection.min_probability: must be <= 1 (got 1.5)"),
    ({"train__validation_fraction": -0.1}, "train.validation_fraction: must be >= 0 (got -0.1)"),
    ({"uv_maps__uv_size": 100}, "uv_maps.uv_size: must be a multiple of 2**train.model.num_downs = 32 (got 100"),
    ({"train__stpes": 3}, "train.stpes: unknown key (did you mean 'steps'?)"),
    ({"train__model__nmu_downs": 3}, "train.model.nmu_downs: unknown key (did you mean 'num_downs'?)"),
    ({"estimation__landmarks__backend": "openpose"}, "estimation.landmarks.backend: must be 'mediapipe', 'dlib', 'face_alignment' or 'auto'"),
    ({"inference__backend": "opengl"}, "inference.backend: must be 'auto', 'fast' or 'pytorch3d'"),
    ({"train__albedo_shading": "fine"}, "train.albedo_shading: must be 'coarse' or 'detailed'"),
    ({"device": "gpu"}, "device: must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got 'gpu')"),
    ({"train__batch_size": "four"}, "train.batch_size: must be a valid integer"),
    ({"data_prep__detection__stage_thresholds": [0.6, 2, 0.7]}, "data_prep.detection.stage_thresholds[1]: must be <= 1"),
])
def test_bad_values_are_named_with_their_dotted_key(base_params, change, expected):
    problems = parameter_problems(_bad(base_params, **change))
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_landmark_weights_accept_a_name_or_68_numbers(base_params):
    for good in ("uniform", "deng", [1.0] * 68):
        assert parameter_problems(_bad(base_params, estimation__fitting__landmark_weights=good)) == []
    for bad in ("even", [1.0] * 67):
        problems = parameter_problems(_bad(base_params, estimation__fitting__landmark_weights=bad))
        assert problems and all(p.startswith("estimation.fitting.landmark_weights") for p in problems), problems


def test_every_problem_in_one_line(base_params):
    params = _bad(base_params, train__checkpoint_every=0, train__steps=0, train__stpes=3,
                  data_prep__detection__min_probability=1.5, uv_maps__uv_size=100)
    with pytest.raises(ParameterError) as caught:
        validate_parameters(params)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("invalid parameters (5 problems): ")
    for key in ("train.checkpoint_every", "train.steps", "train.stpes", "data_prep.detection.min_probability", "uv_maps.uv_size"):
        assert key in message
    assert len(caught.value.problems) == 5


def test_gpu_sizes_check_uv_size_against_depth(base_params):
    assert parameter_problems(_bad(base_params, uv_maps__uv_size=256, train__model__num_downs=8)) == []
    assert parameter_problems(_bad(base_params, uv_maps__uv_size=64, train__model__num_downs=8)) == [
        "uv_maps.uv_size: must be a multiple of 2**train.model.num_downs = 256 (got 64; e.g. 256)"]


def test_section_typo_is_an_error_new_section_a_warning(base_params, caplog):
    assert parameter_problems({**base_params, "trian": {"steps": 1}}) == ["trian: unknown section (did you mean 'train'?)"]
    assert parameter_problems({**base_params, "distributed": {"world_size": 2}}) == []
    assert "distributed" in caplog.text


def test_schemas_mirror_the_code_they_configure():
    """The fitting and generator schemas list exactly the settings their classes accept (no drift)."""
    from facedetail.models.detail_model import DetailGenerator
    from facedetail.estimation.fitting import FitSettings

    train, estimation = SECTION_SCHEMAS["train"], SECTION_SCHEMAS["estimation"]
    fitting = estimation.model_fields["fitting"].annotation
    generator = train.model_fields["model"].annotation
    assert set(fitting.model_fields) == {f.name for f in dataclasses.fields(FitSettings)}
    assert set(generator.model_fields) == set(DetailGenerator.config_keys())


# ---------------------------------------------------------------------------------------------- CLI


def _conf_with_local(tmp_path: Path, local_yaml: str) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF / "base", conf / "base")
    (conf / "local").mkdir()
    (conf / "local" / "parameters.yml").write_text(local_yaml)
    return conf


def test_cli_bad_parameter_is_one_line_rc2(tmp_path, capsys):
    conf = _conf_with_local(tmp_path, "train:\n  checkpoint_every: 0\n")
    (tmp_path / "photos").mkdir()
    rc = main(["fit", str(tmp_path / "photos"), str(tmp_path / "out"), "--conf-source", str(conf)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0
    assert err.startswith("facedetail fit: error: invalid parameters (1 problem): train.checkpoint_every: must be >= 1 (got 0)")
    assert not (tmp_path / "out").exists()  # nothing done


def test_cli_bad_device_option(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    rc = main(["fit", str(tmp_path / "photos"), str(tmp_path / "out"), "--conf-source", str(CONF), "--device", "cuda1"])
    assert rc == 2
    assert "device: must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got 'cuda1')" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- kedro run


def test_kedro_run_with_bad_parameter_fails_before_any_node(tmp_path, monkeypatch):
    """A real KedroSession (project hooks + kedro-mlflow): the hook stops the run before data_prep's first node."""
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from facedetail.hooks import InvalidParametersError

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    monkeypatch.chdir(project)
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    monkeypatch.setenv("FACEDETAIL_DEVICE", "cpu")
    from kedro.runner import AbstractRunner

    started = []  # the runner is where nodes run: a call means work started
    monkeypatch.setattr(AbstractRunner, "run", lambda self, pipeline, *a, **k: started.append(pipeline.nodes[0].name))
    while mlflow.active_run() is not None:
        mlflow.end_run()
    bootstrap_project(project)
    tic = time.perf_counter()
    with pytest.raises(InvalidParametersError) as caught:
        with KedroSession.create(project_path=project, conf_source=str(CONF),
                                 runtime_params={"train": {"checkpoint_every": 0, "stpes": 3}}) as session:
            session.run(pipeline_names=["__default__"])
    assert caught.value.exit_code == 2
    assert caught.value.problems == ["train.checkpoint_every: must be >= 1 (got 0)",
                                     "train.stpes: unknown key (did you mean 'steps'?)"]
    assert started == []
    assert not (project / "data").exists()  # no dataset was written
    assert mlflow.active_run() is None  # validated before kedro-mlflow opened a run
    assert time.perf_counter() - tic < 60


def test_config_module_is_kedro_and_torch_free():
    import subprocess
    import sys

    code = "import sys, facedetail.config; print(sorted(m for m in ('kedro', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT / "src")}).stdout.strip()
    assert out == "[]"


def test_set_dotted_creates_levels_and_keeps_siblings():
    from facedetail.config import set_dotted
    from facedetail.pipelines.train.torchrun import parse_params

    tree = {"train": {"model": {"ngf": 16}, "steps": 5}}
    assert set_dotted(tree, "train.model.regions", 8) is tree
    assert set_dotted(tree, "uv_maps.uv_size", 32) == {"train": {"model": {"ngf": 16, "regions": 8}, "steps": 5},
                                                        "uv_maps": {"uv_size": 32}}
    assert parse_params("train.steps=3, train.model.ngf=8,device=cpu") == {"train": {"steps": 3, "model": {"ngf": 8}},
                                                                          "device": "cpu"}
