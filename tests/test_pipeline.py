"""End to end: the real dvc.yaml, run by `dvc repro` in a temp copy of the repository."""

import json
import math

import pytest

from tests.pipeline import ALL_STAGES, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(built_pipeline, tmp_path_factory):
    """A copy of the built pipeline (tests.pipeline.BuiltPipeline: the pools sampled, labelled as a person would,
    then everything else run). tests/test_pipeline_changes.py changes copies of its own."""
    repo = built_pipeline.copy_to(tmp_path_factory.mktemp("pipeline") / "repo")
    repo.preferences = built_pipeline.preferences
    return repo


def test_full_pipeline_runs_then_is_up_to_date(built_pipeline, repo):
    # The build ran every stage once: the preference pools first, then the rest.
    assert sorted(built_pipeline.upstream + built_pipeline.first_run) == sorted(ALL_STAGES)

    metrics = json.loads(repo.path("metrics/base_model.json").read_text())
    assert metrics["hidden_size"] == 32 and metrics["vocab_size"] == 384
    assert json.loads(repo.path("models/base/config.json").read_text())["num_hidden_layers"] == 2

    persona = json.loads(repo.path("metrics/persona_dataset.json").read_text())
    train = repo.path("data/persona/train.jsonl").read_text().splitlines()
    assert len(train) == persona["train_games"] > 0
    analysis = json.loads(repo.path("metrics/token_analysis/persona.json").read_text())
    assert analysis["examples"] == persona["train_games"] + persona["val_games"]

    for workflow in ("persona", "persuasion", "agent"):
        sft = json.loads(repo.path(f"metrics/sft/{workflow}.json").read_text())
        assert sft["steps"] == 2 and sft["tokens_seen"] > 0
        assert (repo.path(f"models/sft/{workflow}") / "adapter_model.safetensors").is_file()
    reward = json.loads(repo.path("metrics/reward_model/style.json").read_text())
    assert reward["test_examples"] == 60 and 0 <= reward["roc_auc"] <= 1
    outcomes = json.loads(repo.path("metrics/outcome_pairs.json").read_text())
    persuasion = json.loads(repo.path("metrics/reward_model/persuasion.json").read_text())
    assert persuasion["test_pairs"] == outcomes["test_pairs"] > 0 and 0 <= persuasion["pairwise_accuracy"] <= 1
    pools = json.loads(repo.path("metrics/generate_preferences.json").read_text())
    assert (pools["ai_prompts"], pools["human_prompts"], pools["eval_prompts"]) == (24, 6, 12)
    assert len(repo.path("data/preferences/eval.jsonl").read_text().splitlines()) == 12

    judged = json.loads(repo.path("metrics/label_ai.json").read_text())
    assert (judged["ai"]["pairs"], judged["eval"]["pairs"]) == (24, 12)
    assert (judged["judge"]["name"], judged["judge"]["model"]) == ("persuasion_rm", "models/reward/persuasion")
    human = [json.loads(line) for line in repo.path("data/labelled/human.jsonl").read_text().splitlines()]
    assert [p["metadata"]["preference"] for p in human] == [{"tie": "1"}.get(p, p) for p in repo.preferences["human"]]
    assert [p["metadata"]["is_equal"] for p in human] == [p == "tie" for p in repo.preferences["human"]]
    held_out = [json.loads(line) for line in repo.path("data/labelled/eval_human.jsonl").read_text().splitlines()]
    assert [p["metadata"]["is_equal"] for p in held_out] == [p == "tie" for p in repo.preferences["eval"]]
    assert all(p["metadata"]["pool"] == "eval" for p in held_out)
    imported = json.loads(repo.path("metrics/import_pairs.json").read_text())
    assert (imported["records"], imported["pairs"]) == (24, 24)
    for variant, pairs in (("rlhf", 4), ("rlaif", 24 - judged["ai"]["ties"]), ("rlaif_rlhf", 4), ("imported", 24)):
        dpo = json.loads(repo.path(f"metrics/dpo/{variant}.json").read_text())
        assert dpo["train_pairs"] == pairs and dpo["eval_pairs"] == 12 and dpo["eval_human_pairs"] == 8, variant
        assert math.isfinite(dpo["eval_human_reward_margin"]) and 0 <= dpo["eval_human_reward_accuracy"] <= 1
    stack = json.loads(repo.path("models/dpo/rlaif_rlhf/stack.json").read_text())
    assert stack == {"base": "models/base", "adapters": ["models/sft/persuasion", "models/dpo/rlaif"]}
    stack = json.loads(repo.path("models/dpo/imported/stack.json").read_text())
    assert stack == {"base": "models/base", "adapters": ["models/sft/persuasion"]}  # dpo.imported.start
    rl = json.loads(repo.path("metrics/rl.json").read_text())
    assert (rl["algorithm"], rl["steps"], rl["eval_replies"]) == ("ppo", 2, 4)

    evals = {path.stem: json.loads(path.read_text()) for path in repo.path("metrics/eval").glob("*.json")}
    assert set(evals) == {"base", "sft_persona", "sft_persuasion", "sft_agent", "dpo_rlhf", "dpo_rlaif",
                          "dpo_rlaif_rlhf", "dpo_imported", "rl"}
    assert set(evals["base"]) >= {"persuasion", "agent", "persona", "style", "perplexity"}
    assert evals["base"]["style"]["kl_to_reference"] == 0 and evals["rl"]["style"]["kl_to_reference"] != 0
    # Every tool-calling turn of the agent test split.
    assert evals["dpo_rlaif"]["persuasion"]["prompts"] == 12 and evals["sft_agent"]["agent"]["tool_prompts"] == 15
    compared = json.loads(repo.path("metrics/compare.json").read_text())
    assert set(compared["persuasion"]) == {"base", "sft_persuasion", "dpo_rlhf", "dpo_rlaif", "dpo_rlaif_rlhf",
                                           "dpo_imported"}
    assert all(set(by) == {"llm_persuasion", "persuasion_rm"} for by in compared["persuasion"].values())
    assert compared["judges"]["persuasion_rm"]["trained_on"] and not compared["judges"]["llm_persuasion"]["trained_on"]
    assert compared["judges"]["llm_persuasion"]["people"]["pairs"] > 0 and set(compared["style"]) == {"base", "rl"}
    summary = repo.path("reports/summary.md").read_text()
    assert all(f"| {name} |" in summary for name in evals) and "![win_rate.png](win_rate.png)" in summary
    assert summary.index("| RLAIF → RLHF |") < summary.index("## Style RL")

    second = repo.repro()
    assert stages_run(second) == []
    assert "up to date" in second.stdout
    assert "changed" not in repo.dvc("status").stdout
