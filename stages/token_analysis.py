"""Token lengths of a chat dataset, and how many assistant tokens each max length would cut.

In:  a chat dataset (a JSONL file, or a directory whose *.jsonl files are read in name order)
     of `{"messages": [...], "tools"?: [...]}` records; the base model's tokenizer.
Out: <out>/lengths.png             five panels: total tokens; assistant tokens lost by truncation
                                   position; system tokens; assistant tokens; tokens without the system turn
     <out>/truncation_loss.tsv     max_length -> assistant tokens lost (count, %), examples cut (%)
     <out>/length_percentiles.tsv  percentile -> total / system / assistant / without-system tokens
     <metrics>                     percentiles, and the smallest max length losing at most
                                   `max_loss_fraction` of assistant tokens

    python -m stages.token_analysis --data data/persona --tokenizer models/base \
        --out plots/token_analysis/persona --metrics metrics/token_analysis/persona.json

Each conversation is rendered once with a template that marks assistant turns and the texts
are tokenized in one batched call; the loss at every max length then comes from sorted
token positions, not from re-tokenizing at each truncation step.
"""

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from stages.lib import StageError, run_stage
from stages.lib.chat import read_chat_records, resolve_chat_template, tokenize_chats
from stages.lib.io import atomic_dir, atomic_file, write_json
from stages.lib.log import get_logger, log_config
from stages.lib.models import load_tokenizer
from stages.lib.params import DEFAULT_PARAMS, load_section

log = get_logger("token_analysis")

PERCENTILES = (50, 90, 95, 99, 100)
KINDS = ("total", "system", "assistant", "without_system")


@dataclass
class TokenAnalysisParams:
    num_samples: int | None = None  # analyse a seeded sample of this many examples; null = all
    remove_system_messages: bool = False
    step: int = 128  # max-length grid of the truncation curve
    max_loss_fraction: float = 0.01
    chat_template: str = "auto"  # auto | model | chatml | path to a .jinja file
    seed: int = 42

    def __post_init__(self):
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1 or null, got {self.num_samples}")
        if self.step < 1:
            raise ValueError(f"step must be at least 1, got {self.step}")
        if not 0 <= self.max_loss_fraction < 1:
            raise ValueError(f"max_loss_fraction must be in [0, 1), got {self.max_loss_fraction}")


def read_conversations(data: Path) -> list[dict]:
    files = sorted(data.glob("*.jsonl")) if data.is_dir() else [data] if data.exists() else []
    if not files:
        raise StageError(f"{data}: no JSONL files found")
    records = [record for path in files for record in read_chat_records(path)]
    if not records:
        raise StageError(f"{data}: no records")
    return records


def sample(records: list[dict], num_samples: int | None, seed: int) -> list[dict]:
    if num_samples is None or num_samples >= len(records):
        return records
    indices = sorted(random.Random(seed).sample(range(len(records)), num_samples))
    return [records[i] for i in indices]


def token_counts(records: list[dict], tokenizer, template: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-example counts of each kind, and every assistant token's position (for truncation loss)."""
    tokenized = tokenize_chats(records, tokenizer, template)
    counts = {
        "total": np.array([t.n_tokens for t in tokenized]),
        "system": np.array([t.system_tokens for t in tokenized]),
        "assistant": np.array([sum(last - first for first, last in t.assistant_spans) for t in tokenized]),
    }
    counts["without_system"] = counts["total"] - counts["system"]
    positions = [np.arange(first, last, dtype=np.int64) for t in tokenized for first, last in t.assistant_spans]
    return counts, np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)


def truncation_loss_curve(positions: np.ndarray, totals: np.ndarray, grid: np.ndarray) -> list[dict]:
    """Assistant tokens at position >= L are lost when conversations are cut to L tokens."""
    ordered = np.sort(positions)
    lost = len(ordered) - np.searchsorted(ordered, grid, side="left")
    totals_sorted = np.sort(totals)
    cut = len(totals_sorted) - np.searchsorted(totals_sorted, grid, side="right")
    return [{"max_length": int(length), "assistant_tokens_lost": int(n),
             "assistant_tokens_lost_pct": round(100.0 * n / max(len(ordered), 1), 4),
             "examples_truncated_pct": round(100.0 * c / len(totals), 4)}
            for length, n, c in zip(grid, lost, cut)]


def max_length_for_loss(positions: np.ndarray, fraction: float) -> int:
    """The smallest L such that cutting at L loses at most `fraction` of assistant tokens."""
    if len(positions) == 0:
        return 0
    allowed = int(np.floor(fraction * len(positions)))
    if allowed >= len(positions):
        return 0
    # Sorted descending, the (allowed+1)-th largest position must be kept: L = that position + 1.
    kth_largest = np.partition(positions, len(positions) - 1 - allowed)[len(positions) - 1 - allowed]
    return int(kth_largest) + 1


def analyse(records: list[dict], tokenizer, template: str, remove_system: bool):
    if remove_system:
        records = [{**r, "messages": [m for m in r["messages"] if m["role"] != "system"]} for r in records]
    return token_counts(records, tokenizer, template)


def plot_lengths(path: Path, counts: dict[str, np.ndarray], curve: list[dict], name: str, cutoff: int,
                 fraction: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (axes[0, 0], counts["total"], "Total tokens per conversation"),
        (axes[0, 2], counts["system"], "System tokens"),
        (axes[1, 0], counts["assistant"], "Assistant tokens"),
        (axes[1, 1], counts["without_system"], "Tokens without the system message"),
    ]
    for ax, values, title in panels:
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="#4C72B0")
        ax.axvline(np.median(values), color="black", linestyle="--", linewidth=1, label="median")
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.set_ylabel("conversations")
        ax.legend()
    ax = axes[0, 1]
    ax.plot([p["max_length"] for p in curve], [p["assistant_tokens_lost_pct"] for p in curve], color="#C44E52")
    ax.axvline(cutoff, color="black", linestyle="--", linewidth=1, label=f"{fraction:.0%} lost at {cutoff}")
    ax.set_title("Assistant tokens lost by truncation position")
    ax.set_xlabel("max length (tokens)")
    ax.set_ylabel("assistant tokens lost (%)")
    ax.legend()
    axes[1, 2].axis("off")
    lines = [f"{kind}: p50 {np.percentile(counts[kind], 50):.0f}, p95 {np.percentile(counts[kind], 95):.0f}, "
             f"max {counts[kind].max()}" for kind in KINDS]
    axes[1, 2].text(0, 0.5, "\n".join([f"{name}: {len(counts['total'])} conversations", *lines]),
                    va="center", family="monospace", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=80)
    plt.close(fig)


def write_tsv(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    with atomic_file(path) as handle:
        handle.write("\t".join(columns) + "\n")
        for row in rows:
            handle.write("\t".join(str(row[c]) for c in columns) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--name", default=None, help="dataset name shown in the plot")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "token_analysis", TokenAnalysisParams)
    log_config(log, "token_analysis", params)
    name = args.name or args.data.stem

    records = sample(read_conversations(args.data), params.num_samples, params.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    template = resolve_chat_template(tokenizer, params.chat_template, needs_assistant_mask=True,
                                     needs_tools=any(r["tools"] for r in records),
                                     key="token_analysis.chat_template")
    counts, positions = analyse(records, tokenizer, template, params.remove_system_messages)
    if len(positions) == 0:
        raise StageError(f"{args.data}: no assistant tokens in {len(records)} conversations")

    cutoff = max_length_for_loss(positions, params.max_loss_fraction)
    top = int(counts["total"].max())
    grid = np.arange(params.step, top + params.step, params.step)
    curve = truncation_loss_curve(positions, counts["total"], grid)
    percentiles = [{"percentile": q, **{kind: round(float(np.percentile(counts[kind], q)), 1) for kind in KINDS}}
                   for q in range(0, 101, 5)]

    metrics = {
        "examples": len(records),
        "tokens": int(counts["total"].sum()),
        "assistant_tokens": int(counts["assistant"].sum()),
        **{f"{kind}_p{q}": round(float(np.percentile(counts[kind], q)), 1) for kind in KINDS for q in PERCENTILES},
        "max_length_for_loss": cutoff,
        "max_loss_fraction": params.max_loss_fraction,
    }
    with atomic_dir(args.out) as tmp:
        write_tsv(tmp / "truncation_loss.tsv", curve)
        write_tsv(tmp / "length_percentiles.tsv", percentiles)
        plot_lengths(tmp / "lengths.png", counts, curve, name, cutoff, params.max_loss_fraction)
    write_json(args.metrics, metrics)
    log.info("%s: %d conversations, %d tokens; cutting at %d loses <= %.1f%% of assistant tokens",
             name, len(records), metrics["tokens"], cutoff, 100 * params.max_loss_fraction)
    return metrics


if __name__ == "__main__":
    run_stage(main)
