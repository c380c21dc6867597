"""Turn people's labels of the human preference pool into labelled pairs.

In:  the human preference pool (generate_preferences' human.jsonl: prompt, response_1, response_2,
     metadata.prompt_id); the git-tracked labels file written by the labelling tool, one line per
     labelled prompt: {"prompt_id", "preference": "1" | "2" | "tie", "response_1", "response_2", "labeller"};
     params `label_human`
     optionally the held-out pool (eval.jsonl) with its own labels file (--eval-pool, --eval-labels)
     optionally the try-out page's votes (--tryout-votes, stages/lib/votes.py): each a label that carries
     its own prompt and the two models; label_human.include_tryout: true appends them to <out>
Out: <out>      one labelled pair per labelled prompt, in pool order:
                {"prompt", "chosen", "rejected", "metadata": {...pool metadata, "grader": "human",
                 "preference": "1" | "2", "is_equal", "labeller"}}  (a tie: is_equal true, chosen = response_1)
                then, with include_tryout, one pair per vote in file order, metadata {"prompt_id", "pool": "tryout",
                 "grader": "human", "preference", "is_equal", "labeller", "models", "chosen_model"}
     <eval-out> the same for the held-out pool: pairs DPO is scored on, never trained on
     <metrics>  pool size, labelled, ties, preferred_1 / preferred_2, unlabelled, labels_on_earlier_samples
                (and the same under "eval" for the held-out pool; under "tryout": votes, included, ties)

    python -m stages.label_human --pool data/preferences/human.jsonl --labels data/raw/labels/human.jsonl \
        --out data/labelled/human.jsonl --metrics metrics/label_human.json

Label the pool with `python -m tools.label_server --pool data/preferences/human.jsonl
--labels data/raw/labels/human.jsonl`. A label keeps the two texts the labeller saw, and chosen /
rejected come from those texts: a label stays valid when the pool is regenerated with other samples
for the same prompt (counted as labels_on_earlier_samples).
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import LabelledPair, read_labels, read_pool, write_labelled_pairs
from stages.lib.votes import Vote, read_votes

log = get_logger("label_human")


@dataclass
class LabelHumanParams:
    min_labels: int  # fewer labels than this stops the stage: a half-labelled pool is not silently trained on
    include_tryout: bool  # the try-out page's votes join the pool's pairs in <out> (the rlhf pairs)

    def __post_init__(self):
        if self.min_labels < 1:
            raise ValueError(f"min_labels must be at least 1, got {self.min_labels}")


def labelled_pair(record: dict, label: dict) -> dict:
    preference = label["preference"]
    first, second = label["response_1"], label["response_2"]
    chosen, rejected = (second, first) if preference == "2" else (first, second)
    metadata = {**record["metadata"], "grader": "human", "preference": "2" if preference == "2" else "1",
                "is_equal": preference == "tie", "labeller": label["labeller"]}
    return LabelledPair(prompt=record["prompt"], chosen=chosen, rejected=rejected, metadata=metadata)


def vote_pair(vote: Vote) -> dict:
    """A try-out vote as a labelled pair: its own prompt, the reply preferred (a tie: the left one) as chosen."""
    pair = labelled_pair({"prompt": vote["prompt"], "metadata": {"prompt_id": vote["prompt_id"], "pool": "tryout"}},
                         vote)
    models = vote["models"]
    pair["metadata"].update(models=models, chosen_model=models[1] if vote["preference"] == "2" else models[0])
    return pair


def label_pool(pool_path: Path, labels_path: Path, min_labels: int, key: str) -> tuple[list[dict], dict]:
    """(labelled pairs in pool order, metrics) for one pool and its labels file."""
    label_command = f"`python -m tools.label_server --pool {pool_path} --labels {labels_path}`"
    pool = read_pool(pool_path)
    if not labels_path.exists():
        raise StageError(f"{labels_path}: labels file not found; label the pool with {label_command}")
    labels = read_labels(labels_path)
    if not labels:
        raise StageError(f"{labels_path}: no labels; label the pool with {label_command}")
    by_prompt = {record["metadata"]["prompt_id"]: record for record in pool}
    for line, label in labels:
        if label["prompt_id"] not in by_prompt:
            raise StageError(f"{labels_path}:{line}: prompt_id '{label['prompt_id']}' is not in the pool {pool_path} "
                             f"(a label for an earlier pool? remove the line)")
    if len(labels) < min_labels:
        raise StageError(f"{key}: {labels_path} has {len(labels)} labels, fewer than the {min_labels} asked for; "
                         f"label more with {label_command}")

    label_of = {label["prompt_id"]: label for _, label in labels}
    pairs, earlier = [], 0
    for record in pool:
        label = label_of.get(record["metadata"]["prompt_id"])
        if label is None:
            continue
        pairs.append(labelled_pair(record, label))
        earlier += (label["response_1"], label["response_2"]) != (record["response_1"], record["response_2"])

    preferences = [label["preference"] for label in label_of.values()]
    metrics = {
        "pool_prompts": len(pool),
        "labelled": len(pairs),
        "ties": preferences.count("tie"),
        "preferred_1": preferences.count("1"),
        "preferred_2": preferences.count("2"),
        "unlabelled": len(pool) - len(pairs),
        "labels_on_earlier_samples": earlier,
    }
    return pairs, metrics


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--pool", required=True, type=Path, help="the human preference pool (JSONL)")
    parser.add_argument("--labels", required=True, type=Path, help="the labels file written by tools.label_server")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    held_out = parser.add_argument_group("people's labels of the held-out pool (all three or none)")
    held_out.add_argument("--eval-pool", type=Path, help="the held-out pool (generate_preferences' eval.jsonl)")
    held_out.add_argument("--eval-labels", type=Path, help="its labels file")
    held_out.add_argument("--eval-out", type=Path, help="held-out pairs labelled by people")
    parser.add_argument("--tryout-votes", type=Path, default=None,
                        help="votes from tools.tryout (a missing file holds none); see label_human.include_tryout")
    args = parser.parse_args(argv)
    given = [name for name in ("eval_pool", "eval_labels", "eval_out") if getattr(args, name) is not None]
    if given and len(given) < 3:
        missing = sorted({"eval_pool", "eval_labels", "eval_out"} - set(given))
        raise StageError(f"label_human: --{given[0].replace('_', '-')} needs "
                         + " and ".join(f"--{m.replace('_', '-')}" for m in missing))

    params = load_section(args.params, "label_human", LabelHumanParams)
    log_config(log, "label_human", params)
    pairs, metrics = label_pool(args.pool, args.labels, params.min_labels, "label_human.min_labels")
    eval_pairs = None
    if given:
        eval_pairs, metrics["eval"] = label_pool(args.eval_pool, args.eval_labels, 1, "--eval-labels")
    if args.tryout_votes is not None:
        votes = read_votes(args.tryout_votes)
        metrics["tryout"] = {"votes": len(votes), "included": params.include_tryout,
                             "ties": sum(vote["preference"] == "tie" for vote in votes)}
        if params.include_tryout:
            pairs += [vote_pair(vote) for vote in votes]
    elif params.include_tryout:
        raise StageError("label_human.include_tryout: true needs --tryout-votes (the try-out page's votes file)")
    write_labelled_pairs(args.out, pairs)
    if eval_pairs is not None:
        write_labelled_pairs(args.eval_out, eval_pairs)
    write_metrics(args.metrics, metrics)
    log.info("%d of %d prompts labelled (%d ties, %d on earlier samples)", metrics["labelled"],
             metrics["pool_prompts"], metrics["ties"], metrics["labels_on_earlier_samples"])
    if "tryout" in metrics:
        log.info("try-out votes: %d, %s", metrics["tryout"]["votes"],
                 "added to the pairs" if params.include_tryout else "left out (label_human.include_tryout: false)")
    if eval_pairs is not None:
        log.info("held out: %d of %d prompts labelled (%d ties)", len(eval_pairs), metrics["eval"]["pool_prompts"],
                 metrics["eval"]["ties"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
