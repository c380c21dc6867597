"""Queued DVC experiments on the real dvc.yaml, run two at a time (`dvc exp run --queue`, `dvc queue start -j 2`).

Apart from tests/test_experiments.py so that pytest-xdist can hand the two to different workers."""

import json
import time

import pytest

pytestmark = pytest.mark.slow


def test_queued_experiments_run_two_at_a_time_each_with_its_own_beta(experiment_repo):
    repo = experiment_repo
    beta = "dpo.defaults.trainer.beta"

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
    assert {"beta-03", "beta-04"} <= set(experiments)
    for name, value in (("beta-03", 0.3), ("beta-04", 0.4)):
        data = experiments[name]["data"]
        assert data["params"]["params.yaml"]["data"]["dpo"]["defaults"]["trainer"]["beta"] == value
        assert "eval_reward_margin" in data["metrics"]["metrics/dpo/rlhf.json"]["data"]
    # Each trained with its own beta: the loss -log sigmoid(beta x log-ratio margin) differs even where the
    # margins, rounded to 4 decimals on a tiny model, may not.
    results = [experiments[name]["data"]["metrics"]["metrics/dpo/rlhf.json"]["data"] for name in ("beta-03", "beta-04")]
    keys = ("eval_loss", "eval_reward_margin", "train_loss")
    assert [results[0][k] for k in keys] != [results[1][k] for k in keys], results
