"""Label preference pools with an AI judge from `judges` (by default the persuasion reward model).

In:  pools written by generate_preferences (`{"prompt", "response_1", "response_2", "metadata"}` per line);
     params `label_ai` (`judge`: a name under `judges`) and `judges`
Out: <out>/<pool>.jsonl   one labelled pair per prompt: `{"prompt", "chosen", "rejected", "metadata":
                          {..., "grader", "preference": "1"|"2", "is_equal", "scores", "orders_agree"?}}`
     <metrics>            the judge's identity (kind, model, DVC hash, criterion); per pool: pairs, ties, how
                          often each position won, mean score gap, and (pairwise LLM judges) how often both orders agree

    python -m stages.label_ai --pools data/preferences/ai.jsonl data/preferences/eval.jsonl \
        --out data/labelled --metrics metrics/label_ai.json

A scalar judge (reward model, scalar LLM, callable) scores both responses and the higher score wins; a pairwise
LLM judge gives P(response 1 better) = p and 1 - p. A pair whose two scores differ by at most `tie_margin` is a
tie (`is_equal`); DPO leaves ties out.
"""

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import write_metrics
from stages.lib.judges import load_judge, resolve_judges
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import LabelledPair, read_pool, write_labelled_pairs

log = get_logger("label_ai")


@dataclass
class LabelAIParams:
    judge: str  # a name under `judges`
    tie_margin: float  # |score_1 - score_2| <= tie_margin marks a tie
    batch_size: int

    def __post_init__(self):
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must not be negative, got {self.tie_margin}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def read_pools(paths: Sequence[Path]) -> dict[str, list[dict]]:
    """Each pool's records under its file's name (the name of its output file)."""
    names = [path.stem for path in paths]
    if len(set(names)) != len(names):
        raise StageError(f"--pools: two pool files share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}")
    pools = {}
    for name, path in zip(names, paths):
        pools[name] = read_pool(path)
        if not pools[name]:
            raise StageError(f"{path}: no pairs to label")
    return pools


def labelled_pair(row: dict, scores: tuple[float, float], grader: str, tie_margin: float,
                  orders_agree: bool | None) -> dict:
    first, second = scores
    is_equal = abs(first - second) <= tie_margin
    preference = "1" if is_equal or first > second else "2"
    chosen, rejected = (row["response_1"], row["response_2"]) if preference == "1" else (row["response_2"], row["response_1"])
    metadata = {**row["metadata"], "grader": grader, "preference": preference, "is_equal": is_equal,
                "scores": [round(first, 6), round(second, 6)]}
    if orders_agree is not None:
        metadata["orders_agree"] = orders_agree
    return LabelledPair(prompt=row["prompt"], chosen=chosen, rejected=rejected, metadata=metadata)


def pool_metrics(pairs: list[dict]) -> dict:
    gaps = [abs(p["metadata"]["scores"][0] - p["metadata"]["scores"][1]) for p in pairs]
    ties = sum(p["metadata"]["is_equal"] for p in pairs)
    metrics = {
        "pairs": len(pairs),
        "ties": ties,
        "preferred_1": sum(1 for p in pairs if not p["metadata"]["is_equal"] and p["metadata"]["preference"] == "1"),
        "preferred_2": sum(1 for p in pairs if not p["metadata"]["is_equal"] and p["metadata"]["preference"] == "2"),
        "mean_score_gap": round(sum(gaps) / len(gaps), 4),
    }
    agree = [p["metadata"]["orders_agree"] for p in pairs if "orders_agree" in p["metadata"]]
    if agree:
        metrics["orders_agree"] = round(sum(agree) / len(agree), 4)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--pools", required=True, type=Path, nargs="+", help="pool JSONL files to label")
    parser.add_argument("--out", required=True, type=Path, help="directory for <pool>.jsonl")
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "label_ai", LabelAIParams)
    log_config(log, "label_ai", params)
    [ref] = resolve_judges(args.params, [("label_ai.judge", params.judge)])
    pools = read_pools(args.pools)

    started = time.perf_counter()
    judge = load_judge(ref, params.batch_size)
    grader = f"{ref.spec.kind}:{ref.name}"
    labelled, metrics = {}, {"judge": judge.identity()}
    for name, rows in pools.items():
        verdict = judge.pairs([r["prompt"] for r in rows], [r["response_1"] for r in rows],
                              [r["response_2"] for r in rows])
        agree = verdict.orders_agree or [None] * len(rows)
        labelled[name] = [labelled_pair(row, s, grader, params.tie_margin, a)
                          for row, s, a in zip(rows, verdict.scores, agree)]
        metrics[name] = pool_metrics(labelled[name])
        log.info("%s: %d pairs, %d ties", name, len(rows), metrics[name]["ties"])
    metrics["seconds"] = round(time.perf_counter() - started, 1)

    # Everything is judged before anything is written; each file appears whole.
    args.out.mkdir(parents=True, exist_ok=True)
    for name, pairs in labelled.items():
        write_labelled_pairs(args.out / f"{name}.jsonl", pairs)
    write_metrics(args.metrics, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(main)
