"""The try-out page's leaderboard: each model's win rate from people's votes, and a Bradley–Terry ranking.

A vote between models A and B is a win for one and a loss for the other, or a tie. A model's win rate
counts a tie as half a win: (wins + ties / 2) / votes it took part in. Its 95% interval is the
percentile bootstrap over votes (votes drawn with replacement, the win rate of each draw; 2.5th and
97.5th percentiles). The Bradley–Terry model P(A beats B) = 1 / (1 + exp(s_B - s_A)) is fitted by
(nearly unpenalised) logistic regression once every pair of voted-on models has at least one vote; a
tie counts as half a win each way. Strengths are centred on their mean; rank 1 is the strongest.

    python -m tools.leaderboard data/raw/labels/tryout.jsonl
"""

import argparse
import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from stages.lib import run_stage
from stages.lib.votes import DEFAULT_VOTES, Vote, read_votes


def outcomes(votes: Sequence[Vote]) -> tuple[list[str], np.ndarray]:
    """(models in first-seen order, array of (left index, right index, left's score 1 / 0.5 / 0) per vote)."""
    models: list[str] = []
    rows = []
    for vote in votes:
        for name in vote["models"]:
            if name not in models:
                models.append(name)
        left, right = (models.index(name) for name in vote["models"])
        rows.append((left, right, {"1": 1.0, "2": 0.0, "tie": 0.5}[vote["preference"]]))
    return models, np.array(rows, dtype=float).reshape(-1, 3)


def win_rates(models: list[str], rows: np.ndarray) -> np.ndarray:
    """Per model: (wins + ties / 2) / votes; NaN for a model without votes in `rows`."""
    points, games = np.zeros(len(models)), np.zeros(len(models))
    left, right, score = rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2]
    np.add.at(points, left, score)
    np.add.at(points, right, 1.0 - score)
    np.add.at(games, left, 1.0)
    np.add.at(games, right, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return points / games


def bootstrap_intervals(models: list[str], rows: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(low, high) of each model's win rate: 2.5th and 97.5th percentiles over votes drawn with replacement."""
    rng = np.random.default_rng(seed)
    draws = np.stack([win_rates(models, rows[rng.integers(0, len(rows), len(rows))]) for _ in range(resamples)])
    return np.stack([np.nanpercentile(draws, 2.5, axis=0), np.nanpercentile(draws, 97.5, axis=0)], axis=1)


def all_pairs_voted(models: list[str], rows: np.ndarray) -> bool:
    voted = {frozenset((int(a), int(b))) for a, b in rows[:, :2]}
    return all(frozenset(pair) in voted for pair in itertools.combinations(range(len(models)), 2))


def bradley_terry(models: list[str], rows: np.ndarray) -> np.ndarray:
    """Each model's strength s (log-odds scale, centred), fitted by logistic regression on the votes."""
    from sklearn.linear_model import LogisticRegression

    features, labels, weights = [], [], []
    for left, right, score in rows:
        x = np.zeros(len(models))
        x[int(left)], x[int(right)] = 1.0, -1.0
        for label, weight in ((1, score), (0, 1.0 - score)):  # a tie: half a win each way
            if weight > 0:
                features.append(x)
                labels.append(label)
                weights.append(weight)
    features = np.array(features)
    # One vote is always a win for the left model; mirroring every row (-x, 1 - y) gives both classes and an
    # unbiased intercept-free fit. C is large: the ranking comes from the votes, not from the penalty.
    features = np.concatenate([features, -features])
    labels = np.concatenate([labels, 1 - np.array(labels)])
    weights = np.concatenate([weights, weights])
    fit = LogisticRegression(C=1e4, fit_intercept=False, max_iter=10_000).fit(features, labels, sample_weight=weights)
    strengths = fit.coef_[0]
    return strengths - strengths.mean()


def leaderboard(votes: Sequence[Vote], resamples: int = 1000, seed: int = 0) -> dict:
    """{"votes", "models": [rows, best win rate first], "bradley_terry": bool (fitted), "missing_pairs"}."""
    models, rows = outcomes(votes)
    if not models:
        return {"votes": 0, "models": [], "bradley_terry": False, "missing_pairs": []}
    rates = win_rates(models, rows)
    intervals = bootstrap_intervals(models, rows, resamples, seed)
    fitted = len(models) > 1 and all_pairs_voted(models, rows)
    strengths = bradley_terry(models, rows) if fitted else None
    table = []
    for i, name in enumerate(models):
        mine = (rows[:, 0] == i) | (rows[:, 1] == i)
        mine_score = np.where(rows[:, 0] == i, rows[:, 2], 1.0 - rows[:, 2])[mine]
        table.append({"model": name, "votes": int(mine.sum()), "wins": int((mine_score == 1).sum()),
                      "ties": int((mine_score == 0.5).sum()), "losses": int((mine_score == 0).sum()),
                      "win_rate": round(float(rates[i]), 4),
                      "ci_low": round(float(intervals[i, 0]), 4), "ci_high": round(float(intervals[i, 1]), 4),
                      "bt_strength": None if strengths is None else round(float(strengths[i]), 4)})
    if strengths is not None:
        for rank, i in enumerate(np.argsort(-strengths, kind="stable"), start=1):
            table[i]["bt_rank"] = rank
        table.sort(key=lambda row: row["bt_rank"])
    else:
        table.sort(key=lambda row: -row["win_rate"])
    voted = {frozenset((models[int(a)], models[int(b)])) for a, b in rows[:, :2]}
    missing = [list(pair) for pair in itertools.combinations(models, 2) if frozenset(pair) not in voted]
    return {"votes": len(rows), "models": table, "bradley_terry": fitted, "missing_pairs": missing}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("votes", nargs="?", type=Path, default=DEFAULT_VOTES)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    board = leaderboard(read_votes(args.votes), args.resamples, args.seed)
    print(json.dumps(board, indent=2))
    return board


if __name__ == "__main__":
    run_stage(main)
