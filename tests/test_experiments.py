"""DVC experiments on the real dvc.yaml: `dvc exp run -S`, `dvc exp diff`, queued experiments run in parallel."""

import json
import time

import pytest

from tests.conftest import git
from tests.pipeline import stages_run

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(built_pipeline, tmp_path):
    """A copy of the built tiny-model pipeline (tests.pipeline.BuiltPipeline), shared with tests/test_pipeline.py."""
    return built_pipeline.copy_to(tmp_path / "repo")


def test_experiments_change_dpo_beta_then_compare_and_queue(repo):
    repo.repro()
    git(repo.root, "add", "-A")
    git(repo.root, "commit", "-q", "-m", "baseline results")
    beta = "dpo.defaults.trainer.beta"

    # One variant's beta, a key its section does not have yet (`+`): that variant, the one that stacks on it, and
    # what reads their models run again, and no other DPO. compare judges again only if a model's replies changed
    # (a tiny model's greedy-ish samples may come out the same under a slightly different adapter).
    samples = [f"plots/eval/{model}/persuasion.jsonl" for model in ("dpo_rlaif", "dpo_rlaif_rlhf")]
    before = [repo.path(path).read_text() for path in samples]
    result = repo.dvc("exp", "run", "-n", "rlaif-beta-02", "-S", "+dpo.rlaif.trainer.beta=0.2")
    replies_changed = [repo.path(path).read_text() for path in samples] != before
    assert sorted(stages_run(result)) == sorted(["dpo@rlaif", "dpo@rlaif_rlhf", "evaluate@dpo_rlaif",
                                                 "evaluate@dpo_rlaif_rlhf", "report"] + ["compare"] * replies_changed)
    diff = json.loads(repo.dvc("exp", "diff", "HEAD", "rlaif-beta-02", "--json").stdout)
    assert diff["params"]["params.yaml"] == {"dpo.rlaif.trainer.beta": {"old": None, "new": 0.2}}
    changed = diff["metrics"]["metrics/dpo/rlaif.json"]
    # With twice the beta, the implicit rewards (beta x log-ratio) of the same update differ.
    assert changed["eval_reward_margin"]["old"] != changed["eval_reward_margin"]["new"]
    assert "metrics/eval/dpo_rlaif.json" in diff["metrics"] and "metrics/dpo/rlaif_rlhf.json" in diff["metrics"]
    assert not {"metrics/dpo/rlhf.json", "metrics/dpo/imported.json", "metrics/sft/persona.json"} & set(diff["metrics"])

    # Queued experiments of one target each, run two at a time.
    for value in (0.3, 0.4):
        repo.dvc("exp", "run", "--queue", "-n", f"beta-0{int(value * 10)}", "-S", f"{beta}={value}", "dpo@rlhf")
    repo.dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = repo.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp for baseline in shown for exp in (baseline.get("experiments") or [])
                   for exp in exp["revs"]}
    assert {"rlaif-beta-02", "beta-03", "beta-04"} <= set(experiments)
    for name, value in (("beta-03", 0.3), ("beta-04", 0.4)):
        data = experiments[name]["data"]
        assert data["params"]["params.yaml"]["data"]["dpo"]["defaults"]["trainer"]["beta"] == value
        assert "eval_reward_margin" in data["metrics"]["metrics/dpo/rlhf.json"]["data"]
    # Each trained with its own beta: the loss -log sigmoid(beta x log-ratio margin) differs even where the
    # margins, rounded to 4 decimals on a tiny model, may not.
    results = [experiments[name]["data"]["metrics"]["metrics/dpo/rlhf.json"]["data"] for name in ("beta-03", "beta-04")]
    keys = ("eval_loss", "eval_reward_margin", "train_loss")
    assert [results[0][k] for k in keys] != [results[1][k] for k in keys], results
