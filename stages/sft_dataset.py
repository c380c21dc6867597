"""Merge the persuasion sources into chat-format SFT splits, split by conversation.

In:  --cmv  JSONL from stages/cmv_preprocess.py   (needed while `use_cmv` is true)
     --p4g  JSONL from stages/p4g_preprocess.py   (needed while `use_p4g` is true)
     rows `{"context", "response", "metadata": {"source", "conversation_id", ...}}`
Out: <out>/train.jsonl, <out>/val.jsonl, <out>/test.jsonl, one chat record a line:
       {"messages": [{"role": "system", "content": system_prompt},
                     {"role": "user", "content": context},
                     {"role": "assistant", "content": response}],
        "metadata": {...the input row's metadata, unchanged...}}
     metrics JSON: examples per source and per split, conversations per split

With `max_examples` set, a seeded random sample of that many rows is kept (in input order).
Conversations, keyed by (source, conversation_id), are shuffled with the seed per source and
dealt into train / val / test until each split holds its ratio of that source's examples, so
no conversation is in two splits and every split sees both sources. Within a split rows keep
their input order (CMV first, then P4G).

    python -m stages.sft_dataset --cmv data/persuasion/cmv.jsonl --p4g data/persuasion/p4g.jsonl \
        --out data/persuasion/sft --metrics metrics/sft_dataset.json
"""

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, write_metrics
from stages.lib.records import read_persuasion_examples, write_chat_records
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section

log = get_logger("sft_dataset")

SPLITS = ("train", "val", "test")
SOURCES = ("cmv", "p4g")


@dataclass
class SftDatasetParams:
    use_cmv: bool
    use_p4g: bool
    max_examples: int | None  # a seeded sample of this many rows; null: all
    train_ratio: float
    val_ratio: float
    test_ratio: float
    seed: int
    system_prompt: str

    def __post_init__(self):
        if not (self.use_cmv or self.use_p4g):
            raise ValueError("no source enabled: use_cmv and use_p4g are both false")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be at least 1 or null, got {self.max_examples}")
        ratios = {"train_ratio": self.train_ratio, "val_ratio": self.val_ratio, "test_ratio": self.test_ratio}
        for key, value in ratios.items():
            if not 0 < value < 1:
                raise ValueError(f"{key} must be between 0 and 1 (exclusive), got {value}")
        if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6):
            total = sum(ratios.values())
            raise ValueError(f"the split ratios must sum to 1, got train_ratio + val_ratio + test_ratio = {total:g}")


def assign_splits(rows: list[dict], params: SftDatasetParams) -> list[str]:
    """The split of each row: whole conversations, dealt per source in seeded order."""
    rng = random.Random(params.seed)
    cumulative = [params.train_ratio, params.train_ratio + params.val_ratio]
    split_of_conversation = {}
    for source in SOURCES:
        sizes: dict[str, int] = {}
        for row in rows:
            if row["metadata"]["source"] == source:
                conversation = str(row["metadata"]["conversation_id"])
                sizes[conversation] = sizes.get(conversation, 0) + 1
        order = sorted(sizes)
        rng.shuffle(order)
        total, dealt = sum(sizes.values()), 0
        for conversation in order:
            # A conversation goes where the running share of examples sits when it starts.
            share = dealt / total
            split = SPLITS[sum(share >= bound for bound in cumulative)]
            split_of_conversation[(source, conversation)] = split
            dealt += sizes[conversation]
    return [split_of_conversation[(row["metadata"]["source"], str(row["metadata"]["conversation_id"]))]
            for row in rows]


def chat_record(row: dict, system_prompt: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": row["context"]},
            {"role": "assistant", "content": row["response"]},
        ],
        "metadata": row["metadata"],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--cmv", type=Path, help="rows from cmv_preprocess")
    parser.add_argument("--p4g", type=Path, help="rows from p4g_preprocess")
    parser.add_argument("--out", required=True, type=Path, help="directory for train/val/test.jsonl")
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "sft_dataset", SftDatasetParams)
    log_config(log, "sft_dataset", params)

    rows = []
    for source, enabled, path in (("cmv", params.use_cmv, args.cmv), ("p4g", params.use_p4g, args.p4g)):
        if not enabled:
            continue
        if path is None:
            raise StageError(f"sft_dataset.use_{source} is true but no --{source} file was given")
        source_rows = read_persuasion_examples(path, source)
        for row in source_rows:
            row["metadata"] = {"source": source, **row["metadata"]}
        rows.extend(source_rows)
    examples_in = len(rows)

    if params.max_examples is not None and params.max_examples < len(rows):
        chosen = sorted(random.Random(params.seed).sample(range(len(rows)), params.max_examples))
        rows = [rows[i] for i in chosen]

    splits = assign_splits(rows, params)
    by_split = {name: [row for row, split in zip(rows, splits) if split == name] for name in SPLITS}
    conversations = {name: len({(r["metadata"]["source"], str(r["metadata"]["conversation_id"]))
                                for r in by_split[name]}) for name in SPLITS}
    for name in SPLITS:
        if not by_split[name]:
            counts = ", ".join(f"{n} {len(by_split[n])} examples / {conversations[n]} conversations" for n in SPLITS)
            raise StageError(f"sft_dataset: split '{name}' is empty ({counts}); "
                             f"too few conversations for sft_dataset.{name}_ratio={getattr(params, name + '_ratio')}")

    with atomic_dir(args.out) as tmp:
        for name in SPLITS:
            write_chat_records(tmp / f"{name}.jsonl", (chat_record(row, params.system_prompt) for row in by_split[name]))

    metrics = {"examples_in": examples_in, "examples": len(rows)}
    for source in SOURCES:
        metrics[f"examples_{source}"] = sum(row["metadata"]["source"] == source for row in rows)
    for name in SPLITS:
        metrics[f"{name}_examples"] = len(by_split[name])
        metrics[f"{name}_conversations"] = conversations[name]
        for source in SOURCES:
            metrics[f"{name}_{source}"] = sum(row["metadata"]["source"] == source for row in by_split[name])
    write_metrics(args.metrics, metrics)
    log.info("wrote %s to %s", ", ".join(f"{n} {len(by_split[n])}" for n in SPLITS), args.out)
    return metrics


if __name__ == "__main__":
    run_stage(main)
