"""Throughput of the token_analysis stage against its limit and against the naive loop.

All run in one process on the same conversations and tokenizer:
  stage        render + one batched tokenization + truncation curve from sorted positions
  limit        one batched tokenizer call on the already rendered texts (rendering not timed)
  naive        one conversation at a time, re-counting at every truncation step: each step
               tokenizes the conversation again and counts the assistant tokens past the cut
  naive-once   one conversation at a time, tokenized once, the lost tokens summed per step
               (a stronger baseline: on 2 cores the limit itself is only ~2-3x this)

    python benchmarks/token_analysis.py --data data/persuasion/sft --tokenizer models/base
    python benchmarks/token_analysis.py --data chats.jsonl --tokenizer DIR --min-examples 20 \
        --naive-examples 4 --repeats 1

Throughput is tokens of the dataset analysed per second (each conversation counted once);
the naive loops run on the first --naive-examples conversations. Targets: stage >= 50% of
limit, stage >= 3x naive. Prints one line with the ratios.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.lib.chat import render_chats, resolve_chat_template  # noqa: E402
from stages.lib.models import load_tokenizer  # noqa: E402
from stages.lib.token_lengths import (max_length_for_loss, read_conversations, token_counts,  # noqa: E402
                                      truncation_loss_curve)


def best_of(repeats: int, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_stage(records, tokenizer, template, step):
    counts, positions = token_counts(records, tokenizer, template)
    grid = np.arange(step, counts["total"].max() + step, step)
    truncation_loss_curve(positions, counts["total"], grid)
    max_length_for_loss(positions, 0.01)
    return int(counts["total"].sum())


def assistant_mask(record, tokenizer, template):
    return tokenizer.apply_chat_template(record["messages"], tools=record["tools"], chat_template=template,
                                         tokenize=True, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]


def run_naive(records, tokenizer, template, step):
    total = 0
    for record in records:
        length = len(assistant_mask(record, tokenizer, template))
        total += length
        for cut in range(step, length + step, step):
            sum(assistant_mask(record, tokenizer, template)[cut:])
    return total


def run_naive_once(records, tokenizer, template, step):
    total = 0
    for record in records:
        mask = assistant_mask(record, tokenizer, template)
        total += len(mask)
        for cut in range(step, len(mask) + step, step):
            sum(mask[cut:])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data/persuasion/sft", help="a JSONL file or a directory")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models/base", help="a tokenizer (model) directory")
    parser.add_argument("--min-examples", type=int, default=2000, help="repeat the data up to this many")
    parser.add_argument("--step", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-examples", type=int, default=100)
    args = parser.parse_args()

    records = read_conversations(args.data)
    records = (records * (args.min_examples // len(records) + 1))[:max(args.min_examples, len(records))]
    tokenizer = load_tokenizer(args.tokenizer)
    template = resolve_chat_template(tokenizer, "auto", needs_assistant_mask=True,
                                     needs_tools=any(r["tools"] for r in records))

    texts, _, _ = render_chats(records, tokenizer, template)
    limit_s, _ = best_of(args.repeats, lambda: tokenizer(texts, add_special_tokens=False))
    stage_s, tokens = best_of(args.repeats, lambda: run_stage(records, tokenizer, template, args.step))
    subset = records[:args.naive_examples]
    naive_s, naive_tokens = best_of(1, lambda: run_naive(subset, tokenizer, template, args.step))
    once_s, once_tokens = best_of(1, lambda: run_naive_once(subset, tokenizer, template, args.step))
    assert naive_tokens == once_tokens

    stage_tps, limit_tps = tokens / stage_s, tokens / limit_s
    naive_tps, once_tps = naive_tokens / naive_s, once_tokens / once_s
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}"
    print(f"token_analysis: {stage_tps / limit_tps:.2f}x of limit (target >= 0.50), "
          f"{stage_tps / naive_tps:.1f}x naive (target >= 3), {stage_tps / once_tps:.1f}x naive-once | "
          f"stage {stage_tps:,.0f} tok/s, limit {limit_tps:,.0f} tok/s, naive {naive_tps:,.0f} tok/s, "
          f"naive-once {once_tps:,.0f} tok/s | {len(records)} conversations, {tokens:,} tokens "
          f"(naive: first {len(subset)}), step {args.step}, data {args.data} | {machine}")


if __name__ == "__main__":
    main()
