"""Token lengths of a chat dataset, and how many assistant tokens each max length would cut.

In:  a chat dataset (a JSONL file, or a directory whose *.jsonl files are read in name order)
     of `{"messages": [...], "tools"?: [...]}` records; the base model's tokenizer.
Out: <out>/lengths.png   five panels: total tokens; assistant tokens lost by truncation position;
                         system tokens; assistant tokens; tokens without the system turn
     <out>/plots/custom/truncation_loss.json     DVCLive plot data: max_length -> assistant tokens
                                                 lost (count, %), examples cut (%)
     <out>/plots/custom/length_percentiles.json  DVCLive plot data: percentile -> total / system /
                                                 assistant / without-system tokens
     <metrics>           percentiles, and the smallest max length losing at most `max_loss_fraction`
                         of assistant tokens

    python -m stages.token_analysis --data data/persona --tokenizer models/base \
        --out plots/token_analysis/persona --metrics metrics/token_analysis/persona.json

The counting and the truncation curve are in stages/lib/token_lengths.py.
"""

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from stages.lib import StageError, run_stage
from stages.lib.chat import resolve_chat_template
from stages.lib.io import atomic_dir, atomic_file, write_json, write_metrics
from stages.lib.live import open_live
from stages.lib.log import get_logger, log_config
from stages.lib.models import load_tokenizer
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.token_lengths import max_length_for_loss, read_conversations, token_counts, truncation_loss_curve

log = get_logger("token_analysis")

PERCENTILES = (50, 90, 95, 99, 100)
KINDS = ("total", "system", "assistant", "without_system")


@dataclass
class TokenAnalysisParams:
    num_samples: int | None  # analyse a seeded sample of this many examples; null = all
    remove_system_messages: bool
    step: int  # max-length grid of the truncation curve
    max_loss_fraction: float
    chat_template: str  # auto | model | chatml | path to a .jinja file
    seed: int

    def __post_init__(self):
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1 or null, got {self.num_samples}")
        if self.step < 1:
            raise ValueError(f"step must be at least 1, got {self.step}")
        if not 0 <= self.max_loss_fraction < 1:
            raise ValueError(f"max_loss_fraction must be in [0, 1), got {self.max_loss_fraction}")


def sample(records: list[dict], num_samples: int | None, seed: int) -> list[dict]:
    if num_samples is None or num_samples >= len(records):
        return records
    indices = sorted(random.Random(seed).sample(range(len(records)), num_samples))
    return [records[i] for i in indices]


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


def write_plot_data(out: Path, curve: list[dict], percentiles: list[dict]) -> None:
    # Live.end() is not called: it would add an empty metrics.json, and under `dvc exp run` it git-adds
    # the files of its directory, here the temporary one that becomes --out.
    live = open_live(out)
    live.log_plot("truncation_loss", curve, x="max_length", y="assistant_tokens_lost_pct",
                  title="Assistant tokens lost by truncation")
    live.log_plot("length_percentiles", percentiles, x="percentile", y=["total", "assistant"],
                  title="Token length percentiles")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--name", default=None, help="dataset name shown in the plot")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--lengths", default=None, type=Path,
                        help="the length percentiles alone (no measurement of the run), for stages that size by them")
    args = parser.parse_args(argv)

    params = load_section(args.params, "token_analysis", TokenAnalysisParams)
    log_config(log, "token_analysis", params)
    name = args.name or args.data.stem

    records = sample(read_conversations(args.data), params.num_samples, params.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    template = resolve_chat_template(tokenizer, params.chat_template, needs_assistant_mask=True,
                                     needs_tools=any(r["tools"] for r in records),
                                     key="token_analysis.chat_template")
    counts, positions = token_counts(records, tokenizer, template, params.remove_system_messages)
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
        write_plot_data(tmp, curve, percentiles)
        plot_lengths(tmp / "lengths.png", counts, curve, name, cutoff, params.max_loss_fraction)
    if args.lengths is not None:
        write_json(args.lengths, {key: value for key, value in metrics.items() if key == "examples" or
                                  key.startswith(tuple(f"{kind}_p" for kind in KINDS))})
    write_metrics(args.metrics, metrics)
    log.info("%s: %d conversations, %d tokens; cutting at %d loses <= %.1f%% of assistant tokens",
             name, len(records), metrics["tokens"], cutoff, 100 * params.max_loss_fraction)
    return metrics


if __name__ == "__main__":
    run_stage(main)
