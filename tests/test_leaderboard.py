import json
import math

import numpy as np
import pytest

from tools.leaderboard import leaderboard, main


def vote(i: int, left: str, right: str, preference: str) -> dict:
    return {"prompt_id": f"tryout-{i:04d}", "preference": preference, "response_1": f"l{i}", "response_2": f"r{i}",
            "labeller": "ana", "prompt": [{"role": "user", "content": f"m{i}"}], "models": [left, right],
            "settings": {}}


# A beats B 3-1 (one of A's wins from the right side), A and C tie twice, C beats B twice.
VOTES = [vote(0, "A", "B", "1"), vote(1, "B", "A", "2"), vote(2, "A", "B", "1"), vote(3, "A", "B", "2"),
         vote(4, "A", "C", "tie"), vote(5, "C", "A", "tie"), vote(6, "B", "C", "2"), vote(7, "C", "B", "1")]


def write_votes(path, votes):
    path.write_text("".join(json.dumps(v) + "\n" for v in votes))
    return path


def test_win_rates_counts_and_bradley_terry_on_hand_made_votes(tmp_path, capsys):
    board = main([str(write_votes(tmp_path / "votes.jsonl", VOTES)), "--resamples", "400"])
    assert json.loads(capsys.readouterr().out) == board
    rows = {row["model"]: row for row in board["models"]}
    assert board["votes"] == 8 and board["bradley_terry"] and board["missing_pairs"] == []
    # (wins + ties / 2) / votes, by hand
    assert {m: (r["votes"], r["wins"], r["ties"], r["losses"]) for m, r in rows.items()} == {
        "A": (6, 3, 2, 1), "B": (6, 1, 0, 5), "C": (4, 2, 2, 0)}
    assert rows["A"]["win_rate"] == round(4 / 6, 4) and rows["B"]["win_rate"] == round(1 / 6, 4)
    assert rows["C"]["win_rate"] == 0.75
    for row in rows.values():
        assert 0 <= row["ci_low"] <= row["win_rate"] <= row["ci_high"] <= 1
    assert rows["C"]["ci_high"] == 1.0 and rows["B"]["ci_low"] == 0.0

    # Bradley-Terry: at the maximum-likelihood strengths each model's expected points equal its points.
    strength = {m: r["bt_strength"] for m, r in rows.items()}
    assert math.isclose(sum(strength.values()), 0, abs_tol=1e-3)
    expected = dict.fromkeys(strength, 0.0)
    for v in VOTES:
        left, right = v["models"]
        p = 1 / (1 + math.exp(strength[right] - strength[left]))
        expected[left] += p
        expected[right] += 1 - p
    points = {m: r["wins"] + r["ties"] / 2 for m, r in rows.items()}
    for model in strength:
        assert expected[model] == pytest.approx(points[model], abs=0.02)
    assert [row["model"] for row in board["models"]] == ["C", "A", "B"]
    assert [row["bt_rank"] for row in board["models"]] == [1, 2, 3]


def test_the_interval_is_the_bootstrap_over_votes_and_repeats_with_its_seed():
    first, again = leaderboard(VOTES, resamples=300, seed=5), leaderboard(VOTES, resamples=300, seed=5)
    assert first == again
    # Model A, independently: resample the eight votes, A's points over A's votes in each draw.
    rng = np.random.default_rng(5)
    rates = []
    for _ in range(300):
        draw = [VOTES[i] for i in rng.integers(0, len(VOTES), len(VOTES))]
        mine = [v for v in draw if "A" in v["models"]]
        if mine:
            points = sum({"1": 1.0, "2": 0.0, "tie": 0.5}[v["preference"]] if v["models"][0] == "A"
                         else {"1": 0.0, "2": 1.0, "tie": 0.5}[v["preference"]] for v in mine)
            rates.append(points / len(mine))
    a = next(row for row in first["models"] if row["model"] == "A")
    assert (a["ci_low"], a["ci_high"]) == (round(float(np.percentile(rates, 2.5)), 4),
                                           round(float(np.percentile(rates, 97.5)), 4))


def test_no_ranking_until_every_pair_has_votes():
    board = leaderboard(VOTES[:4] + VOTES[6:], resamples=50)  # A and C never met
    assert not board["bradley_terry"] and board["missing_pairs"] == [["A", "C"]]
    assert [row["model"] for row in board["models"]] == ["C", "A", "B"]  # by win rate: 1.0, 0.75, 1/6
    assert all(row["bt_strength"] is None and "bt_rank" not in row for row in board["models"])
    assert leaderboard([]) == {"votes": 0, "models": [], "bradley_terry": False, "missing_pairs": []}
