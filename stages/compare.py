"""Judge every model's held-out replies against the SFT model's, with judges that are named, pinned and checked.

In:  --pool     the final-eval pool (data/preferences/eval.jsonl): the prompts and two SFT samples of each
     --samples  the evaluate stages' sample directories (plots/eval/<model>/<task>.jsonl): each model's replies,
                sampled once per model, so adding a judge never re-samples
     --models   the models judged on persuasion, in the order shown; --style-models the models judged on style
     --people   people's labelled pairs (label_human's outputs): each AI judge's agreement with people
     params `compare` (which judges), `judges`, `label_ai.judge` and `rl.rewards` (the judges that labelled or
     rewarded training data: their verdicts are marked, never silently used as an independent judgment)
Out: <out>      metrics: per judge its identity and agreement with people (share of people's non-tie pairs where
                it picks the same reply, Cohen's kappa, pairs); per model and judge wins / ties / losses against the
                SFT samples, win rate with a 95% bootstrap interval over prompts, length-controlled win rate, how
                often the two orders agree (pairwise LLM judges), mean reply length of both sides; per style model
                and style judge the mean score
     <details>  verdicts.jsonl (every comparison), win_rates.json (for dvc plots), people.jsonl (judge vs people)

    python -m stages.compare --pool data/preferences/eval.jsonl --samples plots/eval \
        --models base sft_persuasion dpo_rlhf dpo_rlaif dpo_rlaif_rlhf --style-models base rl \
        --people data/labelled/eval_human.jsonl data/labelled/human.jsonl \
        --out metrics/compare.json --details plots/compare

Outcomes: a scalar judge (reward model, scalar LLM, callable) wins the reply with the higher score; a pairwise LLM
judge asked in both orders counts a win only when both orders pick the same reply, otherwise a tie (MT-Bench's
rule). The length-controlled win rate is the win probability at equal length from a logistic fit of the outcome on
the length difference (length-controlled AlpacaEval).
"""

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, iter_jsonl, write_json, write_jsonl, write_metrics
from stages.lib.judges import Judge, PairScores, load_judge, resolve_judges
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_params, parse_section
from stages.lib.records import read_labelled_pairs, read_pool

log = get_logger("compare")



@dataclass
class CompareParams:
    judges: list[str]  # judges of persuasion, each a name under `judges`
    style_judges: list[str]  # judges of the style replies (scalar judges)
    sft_samples: int  # 1 or 2: how many of the pool's SFT samples each reply is compared with
    batch_size: int
    bootstrap_resamples: int
    seed: int

    def __post_init__(self):
        if not self.judges:
            raise ValueError("judges must name at least one judge")
        if self.sft_samples not in (1, 2):
            raise ValueError(f"sft_samples must be 1 or 2, got {self.sft_samples}")
        if self.batch_size < 1 or self.bootstrap_resamples < 1:
            raise ValueError("batch_size and bootstrap_resamples must be at least 1")


def training_judges(params_path: Path) -> dict[str, str]:
    """Judges whose verdicts some model was trained on: name -> what they did."""
    params = load_params(params_path)
    used = {}
    label = (params.get("label_ai") or {}).get("judge")
    if isinstance(label, str):
        used[label] = "labelled the RLAIF training pairs (label_ai.judge)"
    for reward in (params.get("rl") or {}).get("rewards") or []:
        if isinstance(reward, dict) and isinstance(reward.get("judge"), str):
            used.setdefault(reward["judge"], "rewarded the RL policy (rl.rewards)")
    return used


def read_replies(samples: Path, model: str, task: str) -> dict[str, tuple[str, list[str]]]:
    """prompt_id -> (the prompt's text if the sample keeps it, the model's replies) for `task`."""
    path = samples / model / f"{task}.jsonl"
    if not path.is_file():
        raise StageError(f"--samples: {path} not found (run `dvc repro evaluate@{model}`)")
    replies: dict[str, list[str]] = {}
    for line, row in iter_jsonl(path, required=["task"]):
        if row["task"] != task:
            continue
        if "prompt_id" not in row:
            raise StageError(f"{path}:{line}: {task} sample has no prompt_id")
        texts = row.get("replies", [row.get("reply")])
        if not all(isinstance(t, str) for t in texts):
            raise StageError(f"{path}:{line}: replies must be strings")
        replies[str(row["prompt_id"])] = (str(row.get("prompt") or ""), texts)
    if not replies:
        raise StageError(f"{path}: no {task} samples (is '{task}' among evaluate@{model}'s tasks?)")
    return replies


def share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4)


def words(text: str) -> int:
    return len(text.split())


def outcomes(verdict: PairScores) -> list[float]:
    """1 win, 0.5 tie, 0 loss for the first reply of each pair."""
    results = []
    for i, (first, second) in enumerate(verdict.scores):
        if verdict.orders_agree is not None and not verdict.orders_agree[i]:
            results.append(0.5)
        else:
            results.append(1.0 if first > second else 0.0 if first < second else 0.5)
    return results


def bootstrap_interval(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` (one per prompt), resampling prompts."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def length_controlled(results: list[float], length_gaps: list[float]) -> float:
    """P(win) at zero length difference, from a logistic fit of the outcome on the length gap (in 100 words)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x, y, weight = [], [], []
    for result, gap in zip(results, length_gaps):
        for label, share in ((1, result), (0, 1 - result)):
            if share > 0:
                x.append([gap / 100]), y.append(label), weight.append(share)
    if len(set(y)) < 2:  # every comparison went one way: nothing to regress
        return float(y[0]) if y else 0.5
    fit = LogisticRegression(C=10.0).fit(np.array(x), np.array(y), sample_weight=np.array(weight))
    return float(1 / (1 + math.exp(-fit.intercept_[0])))


def judge_model(judge: Judge, rows: list[dict], replies: dict[str, list[str]], sft_samples: int,
                params: CompareParams, verdict_log: list, model: str) -> dict:
    prompts, firsts, seconds, owners = [], [], [], []
    for index, row in enumerate(rows):
        reply = replies[row["metadata"]["prompt_id"]][1][0]
        for k in range(1, sft_samples + 1):
            prompts.append(row["prompt"]), firsts.append(reply), seconds.append(row[f"response_{k}"])
            owners.append(index)
    verdict = judge.pairs(prompts, firsts, seconds)
    results = outcomes(verdict)
    per_prompt = [[] for _ in rows]
    for i, result in enumerate(results):
        per_prompt[owners[i]].append(result)
        verdict_log.append({"model": model, "judge": judge.name, "prompt_id": rows[owners[i]]["metadata"]["prompt_id"],
                            "sft_sample": i % sft_samples + 1, "scores": [round(s, 6) for s in verdict.scores[i]],
                            "orders_agree": verdict.orders_agree[i] if verdict.orders_agree else None,
                            "outcome": result})
    means = [sum(r) / len(r) for r in per_prompt]
    low, high = bootstrap_interval(means, params.bootstrap_resamples, params.seed)
    gaps = [words(a) - words(b) for a, b in zip(firsts, seconds)]
    block = {"wins": sum(r == 1 for r in results), "ties": sum(r == 0.5 for r in results),
             "losses": sum(r == 0 for r in results), "win_rate": round(sum(results) / len(results), 4),
             "win_rate_low": round(low, 4), "win_rate_high": round(high, 4),
             "lc_win_rate": round(length_controlled(results, gaps), 4),
             "mean_words": round(sum(map(words, firsts)) / len(firsts), 1),
             "sft_mean_words": round(sum(map(words, seconds)) / len(seconds), 1)}
    if verdict.orders_agree is not None:
        block["orders_agree"] = share(verdict.orders_agree)
    return block


def agreement_with_people(judge: Judge, pairs: list[dict], people_log: list) -> dict:
    """The judge on the two replies people compared, in the order people saw them; people's ties left out."""
    from sklearn.metrics import cohen_kappa_score

    decided = [p for p in pairs if not p["metadata"]["is_equal"]]
    if not decided:
        return {"pairs": 0, "people_ties": len(pairs)}
    firsts = [p["chosen"] if p["metadata"]["preference"] == "1" else p["rejected"] for p in decided]
    seconds = [p["rejected"] if p["metadata"]["preference"] == "1" else p["chosen"] for p in decided]
    verdict = judge.pairs([p["prompt"] for p in decided], firsts, seconds)
    people = [p["metadata"]["preference"] for p in decided]
    ai = ["1" if a > b else "2" for a, b in verdict.scores]
    for pair, human, machine, scores in zip(decided, people, ai, verdict.scores):
        people_log.append({"judge": judge.name, "prompt_id": pair["metadata"]["prompt_id"], "people": human,
                           "judge_choice": machine, "scores": [round(s, 6) for s in scores]})
    kappa = cohen_kappa_score(people, ai) if len(set(people) | set(ai)) > 1 else 1.0
    block = {"pairs": len(decided), "people_ties": len(pairs) - len(decided),
             "agreement": round(sum(h == m for h, m in zip(people, ai)) / len(decided), 4),
             "kappa": round(float(kappa), 4) if not math.isnan(kappa) else None}
    if verdict.orders_agree is not None:
        block["orders_agree"] = share(verdict.orders_agree)
    return block


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--pool", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path)
    parser.add_argument("--models", required=True, nargs="+")
    parser.add_argument("--style-models", nargs="*", default=[])
    parser.add_argument("--people", nargs="*", type=Path, default=[])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--details", required=True, type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    params = parse_section(load_params(args.params), "compare", CompareParams)
    log_config(log, "compare", params)
    refs = resolve_judges(args.params, [(f"compare.judges[{i}]", n) for i, n in enumerate(params.judges)])
    style_refs = resolve_judges(args.params, [(f"compare.style_judges[{i}]", n)
                                              for i, n in enumerate(params.style_judges)], scalar=True)
    rows = read_pool(args.pool)
    if not rows:
        raise StageError(f"{args.pool}: no prompts to compare on")
    replies = {model: read_replies(args.samples, model, "persuasion") for model in args.models}
    for model, found in replies.items():
        missing = [r["metadata"]["prompt_id"] for r in rows if r["metadata"]["prompt_id"] not in found]
        if missing:
            raise StageError(f"{args.samples / model / 'persuasion.jsonl'}: no reply to prompt {missing[0]!r} of {args.pool}")
    style = {model: read_replies(args.samples, model, "style") for model in args.style_models}
    people = [pair for path in args.people for pair in read_labelled_pairs(path)]
    used = training_judges(args.params)

    loaded: dict[str, Judge] = {}
    metrics: dict = {"reference": f"the SFT samples of {args.pool} ({params.sft_samples} per prompt)",
                     "prompts": len(rows), "judges": {}, "persuasion": {m: {} for m in args.models}, "style": {}}
    verdicts, people_log = [], []
    for ref in [*refs, *style_refs]:
        if ref.name in loaded:
            continue
        judge = loaded[ref.name] = load_judge(ref, params.batch_size)
        info = {**judge.identity(), "trained_on": used.get(ref.name)}
        if people:
            info["people"] = agreement_with_people(judge, people, people_log)
        metrics["judges"][ref.name] = info
    for ref in refs:
        for model in args.models:
            block = judge_model(loaded[ref.name], rows, replies[model], params.sft_samples, params, verdicts, model)
            metrics["persuasion"][model][ref.name] = block
            log.info("%s by %s: win rate %.3f [%.3f, %.3f], W/T/L %d/%d/%d", model, ref.name, block["win_rate"],
                     block["win_rate_low"], block["win_rate_high"], block["wins"], block["ties"], block["losses"])
    for model, by_prompt in style.items():
        metrics["style"][model] = {}
        pairs = [(prompt, text) for prompt, texts in by_prompt.values() for text in texts]
        for ref in style_refs:
            scores = loaded[ref.name].score([[{"role": "user", "content": p}] for p, _ in pairs], [t for _, t in pairs])
            metrics["style"][model][ref.name] = {"mean_score": round(sum(scores) / len(scores), 4),
                                                "replies": len(scores)}
    metrics["seconds"] = round(time.perf_counter() - started, 1)

    win_rates = [{"model": model, "judge": name, "win_rate": block["win_rate"], "low": block["win_rate_low"],
                  "high": block["win_rate_high"]} for model, by_judge in metrics["persuasion"].items()
                 for name, block in by_judge.items()]
    with atomic_dir(args.details) as tmp:
        write_jsonl(tmp / "verdicts.jsonl", verdicts)
        write_jsonl(tmp / "people.jsonl", people_log)
        write_json(tmp / "win_rates.json", win_rates)
    write_metrics(args.out, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(main)
