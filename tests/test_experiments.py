"""DVC experiments on the real dvc.yaml: `dvc exp run -S` and `dvc exp diff` (queued ones: test_experiment_queue.py)."""

import json

import pytest

from tests.pipeline import stages_run

pytestmark = pytest.mark.slow


def test_an_experiment_changes_one_variants_beta_and_diffs_against_the_baseline(experiment_repo):
    repo = experiment_repo

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
