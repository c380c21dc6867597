"""End to end: the real dvc.yaml, run by `dvc repro` in a temp copy of the repository."""

import json

import pytest

from tests.pipeline import PipelineRepo, error_lines, stages_run, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir):
    repo = PipelineRepo.copy_of_project(tmp_path_factory.mktemp("pipeline") / "repo")
    repo.set_params(tiny_overrides(tiny_model_dir))
    return repo


def test_full_pipeline_runs_then_is_up_to_date(repo):
    first = repo.repro()
    assert "base_model" in stages_run(first)

    metrics = json.loads(repo.path("metrics/base_model.json").read_text())
    assert metrics["hidden_size"] == 32 and metrics["vocab_size"] == 384
    assert json.loads(repo.path("models/base/config.json").read_text())["num_hidden_layers"] == 2

    second = repo.repro()
    assert stages_run(second) == []
    assert "up to date" in second.stdout
    assert "changed" not in repo.dvc("status").stdout


def test_changed_param_reruns_only_its_stage(repo):
    repo.repro()
    repo.set_params({"base_model.dtype": "bfloat16"})
    try:
        assert stages_run(repo.repro()) == ["base_model"]
        assert json.loads(repo.path("metrics/base_model.json").read_text())["dtype"] == "bfloat16"
    finally:
        repo.set_params({"base_model.dtype": "float32"})
        repo.repro()


@pytest.mark.parametrize("overrides, expected", [
    ({"base_model.sourse": "embedded"}, "error: base_model.sourse: unknown key (did you mean 'source'?)"),
    ({"base_model.trust_remote_code": "no"}, "error: base_model.trust_remote_code: expected true or false, got a string 'no'"),
    ({"base_model.source": ...}, "error: base_model.source: missing required key"),
    ({"base_model.source": "./models/does-not-exist"}, "error: base_model.source: path './models/does-not-exist' does not exist"),
])
def test_bad_params_stop_dvc_repro_with_one_line(repo, tiny_model_dir, overrides, expected):
    repo.set_params(overrides)
    try:
        result = repo.repro(check=False)
        assert result.returncode != 0
        assert error_lines(result) == [expected]
        assert "Traceback" not in result.stderr
        assert not list(repo.path("models").glob(".base.*"))
    finally:
        repo.set_params({"base_model.sourse": ..., "base_model.trust_remote_code": False,
                         **tiny_overrides(tiny_model_dir)})
