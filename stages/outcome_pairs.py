"""Pair, for each ChangeMyView post, the reply that won a delta with the reply that did not: persuasion outcomes.

In:  a ConvoKit "winning arguments" corpus directory, current layout (`speaker`, `conversation_id`)
     or old layout (`user`, `root`): utterances.jsonl and conversations.json are read
Out: <out>/train.jsonl and <out>/test.jsonl, one outcome pair a line, in corpus order:
       {"prompt": [{"role": "user", "content": "<post title>\n\n<post body>"}],
        "chosen": <the reply that opened the delta-winning branch>, "rejected": <the one that won nothing>,
        "metadata": {"source": "cmv", "conversation_id", "pair_id", "chosen_id", "rejected_id"}}
     metrics JSON: pair ids seen, pairs and posts per split, dropped replies and pair ids per reason,
     duplicate pairs, mean chosen / rejected characters per split

A pair id (`meta.pair_ids`) names, within one post, the direct replies to the post that opened the
branches compared: those with `success` 1 won, those with 0 did not (comments deeper in a branch carry
its pair ids too, but only the reply that opened it is paired). Every winner x loser combination of a
pair id is a pair; a combination already made under another pair id is kept once. Replies whose body
is `[deleted]`, `[removed]` or empty are dropped, and so is a pair id left without a winner or a loser.
Texts are cleaned as in cmv_preprocess (HTML entities unescaped, Reddit markdown kept); the post body is
the conversation's `op-text-body`, or the post utterance's text when that is missing.

Pairs of one post compare replies to the same text, so posts are split, not pairs: the sorted post ids
are shuffled with `seed` and dealt to test, whole, until test holds `test_ratio` of the pairs; the rest
are train.

    python -m stages.outcome_pairs --corpus data/raw/cmv --out data/persuasion/outcome_pairs \
        --metrics metrics/outcome_pairs.json
"""

import argparse
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.convokit import (
    CONVERSATIONS, REMOVED_BODIES, UTTERANCES, Utterance, clean_text, read_conversations, read_utterances)
from stages.lib.io import atomic_dir, require_path, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import write_labelled_pairs

log = get_logger("outcome_pairs")

SPLITS = ("train", "test")
DROP_REASONS = ("deleted", "removed", "empty")
OUTCOMES = {1: "chosen", 0: "rejected"}


@dataclass
class OutcomePairsParams:
    test_ratio: float  # share of the pairs (whole posts) held out for the reward model's test
    seed: int

    def __post_init__(self):
        if not 0 < self.test_ratio < 1:
            raise ValueError(f"test_ratio must be between 0 and 1 (exclusive), got {self.test_ratio}")


def post_prompt(conversation: dict, root: Utterance) -> str:
    title, body = conversation.get("op-title"), conversation.get("op-text-body")
    title = clean_text(title if isinstance(title, str) else "")
    body = clean_text(body if isinstance(body, str) and body.strip() else root.text)
    return "\n\n".join(part for part in (title, body) if part) or "[deleted]"


def pair_ids_of(utterance: Utterance) -> list[str]:
    pair_ids = utterance.meta.get("pair_ids") or []
    return [str(p) for p in pair_ids] if isinstance(pair_ids, list) else [str(pair_ids)]


def build_pairs(corpus: Path) -> tuple[list[dict], dict]:
    """Outcome pairs in corpus order (pair ids by first appearance; winners x losers in file order) and counts."""
    utterances = read_utterances(require_path(corpus / UTTERANCES, "ConvoKit utterances file"))
    conversations = read_conversations(require_path(corpus / CONVERSATIONS, "ConvoKit conversations file"))

    # (conversation, pair id) -> {"chosen": [...], "rejected": [...]}: a pair id never reaches across posts.
    sides: dict[tuple[str, str], dict[str, list[Utterance]]] = {}
    posts: dict[str, Utterance] = {}
    texts, dropped = {}, Counter()
    for utterance in utterances.values():
        post = utterances.get(utterance.reply_to) if utterance.reply_to is not None else None
        side = OUTCOMES.get(utterance.meta.get("success"))
        if post is None or post.reply_to is not None or side is None:
            continue
        groups = [sides.setdefault((utterance.conversation_id, p), {"chosen": [], "rejected": []})
                  for p in pair_ids_of(utterance)]
        if not groups:
            continue
        posts[utterance.conversation_id] = post
        text = clean_text(utterance.text)
        reason = "empty" if not text else REMOVED_BODIES.get(text)
        if reason is not None:
            dropped[reason] += 1
            continue
        texts[utterance.id] = text
        for group in groups:
            group[side].append(utterance)

    pairs, incomplete, seen, duplicates = [], Counter(), set(), 0
    prompts: dict[str, str] = {}
    for (conversation_id, pair_id), group in sides.items():
        if not group["chosen"] or not group["rejected"]:
            incomplete["no_winner" if not group["chosen"] else "no_loser"] += 1
            continue
        if conversation_id not in prompts:
            prompts[conversation_id] = post_prompt(conversations.get(conversation_id, {}), posts[conversation_id])
        for chosen in group["chosen"]:
            for rejected in group["rejected"]:
                if (chosen.id, rejected.id) in seen:
                    duplicates += 1
                    continue
                seen.add((chosen.id, rejected.id))
                pairs.append({
                    "prompt": [{"role": "user", "content": prompts[conversation_id]}],
                    "chosen": texts[chosen.id],
                    "rejected": texts[rejected.id],
                    "metadata": {"source": "cmv", "conversation_id": conversation_id, "pair_id": pair_id,
                                 "chosen_id": chosen.id, "rejected_id": rejected.id},
                })
    counts = {"utterances": len(utterances), "pair_ids": len(sides),
              **{f"dropped_{reason}": dropped[reason] for reason in DROP_REASONS},
              "pair_ids_without_winner": incomplete["no_winner"], "pair_ids_without_loser": incomplete["no_loser"],
              "duplicate_pairs": duplicates}
    return pairs, counts


def split_by_post(pairs: list[dict], params: OutcomePairsParams) -> dict[str, list[dict]]:
    """Posts shuffled with the seed and dealt to test, whole, until test holds test_ratio of the pairs."""
    sizes = Counter(pair["metadata"]["conversation_id"] for pair in pairs)
    order = sorted(sizes)
    random.Random(params.seed).shuffle(order)
    test_posts, dealt = set(), 0
    for post in order:
        if dealt >= params.test_ratio * len(pairs):
            break
        test_posts.add(post)
        dealt += sizes[post]
    if len(test_posts) == len(sizes):
        raise StageError(f"outcome_pairs.test_ratio: {params.test_ratio} leaves no post for train "
                         f"({len(pairs)} pairs in {len(sizes)} posts)")
    return {"train": [p for p in pairs if p["metadata"]["conversation_id"] not in test_posts],
            "test": [p for p in pairs if p["metadata"]["conversation_id"] in test_posts]}


def mean_chars(pairs: list[dict], side: str) -> float:
    return round(sum(len(p[side]) for p in pairs) / len(pairs), 2)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--corpus", required=True, type=Path, help="ConvoKit winning-args corpus directory")
    parser.add_argument("--out", required=True, type=Path, help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "outcome_pairs", OutcomePairsParams)
    log_config(log, "outcome_pairs", params)

    pairs, counts = build_pairs(args.corpus)
    if not pairs:
        reasons = ", ".join(f"{key}={value}" for key, value in counts.items()
                            if value and key not in ("utterances", "pair_ids")) or "nothing dropped"
        raise StageError(f"{args.corpus}: no outcome pairs ({counts['pair_ids']} pair ids on direct replies to a "
                         f"post; {reasons})")
    splits = split_by_post(pairs, params)

    with atomic_dir(args.out) as tmp:
        for name in SPLITS:
            write_labelled_pairs(tmp / f"{name}.jsonl", splits[name])

    metrics = {**counts, "pairs": len(pairs)}
    for name in SPLITS:
        metrics[f"{name}_pairs"] = len(splits[name])
        metrics[f"{name}_posts"] = len({p["metadata"]["conversation_id"] for p in splits[name]})
        metrics[f"{name}_chosen_chars_mean"] = mean_chars(splits[name], "chosen")
        metrics[f"{name}_rejected_chars_mean"] = mean_chars(splits[name], "rejected")
    write_metrics(args.metrics, metrics)
    log.info("wrote %d outcome pairs from %d pair ids: train %d (%d posts), test %d (%d posts); dropped %s",
             len(pairs), counts["pair_ids"], metrics["train_pairs"], metrics["train_posts"], metrics["test_pairs"],
             metrics["test_posts"], ", ".join(f"{key.removeprefix('dropped_')} {value}" for key, value in counts.items()
                                             if value and key not in ("utterances", "pair_ids")) or "nothing")
    return metrics


if __name__ == "__main__":
    run_stage(main)
