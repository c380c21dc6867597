"""Changes to a built pipeline: a changed param re-runs only the stages that read it; bad params stop `dvc repro`
with one line. Each test works in a copy of the tiny-model pipeline tests/test_pipeline.py checks
(tests.pipeline.BuiltPipeline)."""

import json

import pytest

from tests.pipeline import error_lines, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(built_pipeline, tmp_path_factory):
    """A copy shared by the tests that leave it as they found it."""
    return built_pipeline.copy_to(tmp_path_factory.mktemp("pipeline") / "repo")


@pytest.fixture
def own_copy(built_pipeline, tmp_path):
    """A copy of the built pipeline for one test that changes params (cheaper than running the change back)."""
    return built_pipeline.copy_to(tmp_path / "repo")


def test_changed_param_reruns_only_the_stages_that_read_it(own_copy):
    own_copy.set_params({"token_analysis.step": 64})
    # All three analyses read the section; nothing downstream depends on their plots.
    assert sorted(stages_run(own_copy.repro())) == ["token_analysis@agent", "token_analysis@persona",
                                                    "token_analysis@persuasion"]
    curve = json.loads(own_copy.path("plots/token_analysis/persona/plots/custom/truncation_loss.json").read_text())
    assert curve[0]["max_length"] == 64


def test_changed_dataset_param_reruns_it_and_its_dependants(own_copy):
    own_copy.set_params({"persona_dataset.val_ratio": 0.4})
    # The persona data changes, so its analysis, fine-tuning and the evaluations of the models evaluated on it
    # follow; nothing else does.
    assert sorted(stages_run(own_copy.repro())) == ["evaluate@base", "evaluate@sft_persona", "persona_dataset",
                                                    "report", "sft@persona", "token_analysis@persona"]


@pytest.mark.parametrize("overrides, expected", [
    ({"base_model.sourse": "embedded"}, "error: base_model.sourse: unknown key (did you mean 'source'?)"),
    ({"base_model.trust_remote_code": "no"}, "error: base_model.trust_remote_code: expected true or false, got a string 'no'"),
    ({"base_model.source": ...}, "error: base_model.source: missing required key"),
    ({"base_model.source": "./models/does-not-exist"}, "error: base_model.source: path './models/does-not-exist' does not exist"),
])
def test_bad_params_stop_dvc_repro_with_one_line(repo, overrides, expected):
    params = repo.path("params.yaml").read_text()
    repo.set_params(overrides)
    try:
        result = repo.repro(check=False)
        assert result.returncode != 0
        assert error_lines(result) == [expected]
        assert "Traceback" not in result.stderr
        assert not list(repo.path("models").glob(".base.*"))
    finally:
        repo.path("params.yaml").write_text(params)  # the build's params: its tiny model, not this worker's
