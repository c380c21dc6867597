"""Gather every model's evaluation into one page: reports/summary.md, with its plots.

In:  --evals    metrics/eval/<model>.json files written by the evaluate stage (the order given is the order shown)
     --samples  plots/eval (per-model reward tables from the evaluate stage)
     --stages   metrics of the training stages to quote (sft, dpo, rl, reward model), optional
Out: reports/summary.md    one table per task with every model that ran it, the plots below it
     reports/win_rate.png  persuasion win rate against the SFT model, with 95% intervals
     reports/win_rate.tsv  the same numbers (dvc plots draws them as bars)
     reports/rewards.png   reward distributions: persuasion replies per model, style replies before / after RL

    python -m stages.report --evals metrics/eval/*.json --samples plots/eval --out reports
"""

import argparse
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, read_json
from stages.lib.log import get_logger
from stages.lib.records import read_rewards, rewards_path

log = get_logger("report")

# Columns shown per task, in order; any other numeric key of the block follows them.
COLUMNS = {
    "persuasion": ["win_rate_vs_sft", "win_rate_low", "win_rate_high", "mean_reward", "sft_mean_reward", "prompts"],
    "agent": ["assistant_token_loss", "tool_call_validity", "tool_call_rate", "tool_call_parsed",
              "tool_call_known_tool", "tool_prompts"],
    "persona": ["valid", "valid_json", "right_count", "all_headers", "examples"],
    "style": ["mean_reward", "kl_to_reference", "replies"],
    "perplexity": ["perplexity", "assistant_tokens", "examples"],
}
TITLES = {"persuasion": "Persuasion: AI-judge win rate against the SFT model (final-eval pool)",
          "agent": "Agent: assistant-token loss and tool-call validity (test split)",
          "persona": "Persona: valid JSON with exactly N types and every required header (val split)",
          "style": "Style: reward and KL to the RL start policy (held-out starters)",
          "perplexity": "Held-out perplexity (persuasion test split, assistant tokens)"}


def read_evals(paths: Sequence[Path]) -> list[dict]:
    evals = []
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise StageError(f"{path}: not an evaluation file (expected an object with 'model')")
        evals.append(data)
    if not evals:
        raise StageError("--evals: no evaluation files given")
    return evals


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def task_table(evals: list[dict], task: str) -> list[str]:
    rows = [e for e in evals if isinstance(e.get(task), dict)]
    if not rows:
        return []
    keys = [k for k in COLUMNS[task] if any(k in e[task] for e in rows)]
    keys += sorted({k for e in rows for k, v in e[task].items()
                    if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)})
    lines = [f"## {TITLES[task]}", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {e['model']} | " + " | ".join(cell(e[task].get(k)) for k in keys) + " |" for e in rows]
    return lines + [""]


def plot(out: Path, evals: list[dict], samples: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    persuasion = [e for e in evals if isinstance(e.get("persuasion"), dict)]
    if persuasion:
        names = [e["model"] for e in persuasion]
        rates = [e["persuasion"]["win_rate_vs_sft"] for e in persuasion]
        errors = [[r - e["persuasion"]["win_rate_low"] for r, e in zip(rates, persuasion)],
                  [e["persuasion"]["win_rate_high"] - r for r, e in zip(rates, persuasion)]]
        with (out / "win_rate.tsv").open("w", encoding="utf-8") as handle:
            handle.write("model\twin_rate\tlow\thigh\n")
            handle.writelines(f"{e['model']}\t{e['persuasion']['win_rate_vs_sft']}\t{e['persuasion']['win_rate_low']}"
                              f"\t{e['persuasion']['win_rate_high']}\n" for e in persuasion)
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
        ax.barh(names, rates, xerr=errors, color="#4C72B0", capsize=4)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), xlabel="win rate against the SFT samples (95% bootstrap interval)",
               title="Persuasion: AI-judge win rate")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "win_rate.png", dpi=80)
        plt.close(fig)
        images.append("win_rate.png")
    series = [(f"{e['model']} (persuasion)", read_rewards(rewards_path(samples / e["model"], "persuasion")))
              for e in persuasion]
    series += [(f"{e['model']} (style)", read_rewards(rewards_path(samples / e["model"], "style")))
               for e in evals if isinstance(e.get("style"), dict)]
    series = [(name, values) for name, values in series if values]
    if series:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(series) + 1.5))
        ax.boxplot([values for _, values in series], vert=False, showmeans=True)
        ax.set_yticks(range(1, len(series) + 1), [name for name, _ in series])
        ax.set(xlabel="reward-model score", title="Reward of each model's replies")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "rewards.png", dpi=80)
        plt.close(fig)
        images.append("rewards.png")
    return images


def stage_lines(paths: Sequence[Path]) -> list[str]:
    """The headline numbers of training stages, one row per metrics file."""
    if not paths:
        return []
    keep = ("eval_loss", "eval_reward_margin", "eval_reward_accuracy", "eval_human_reward_margin",
            "eval_human_reward_accuracy", "reward_before", "reward_after", "roc_auc", "accuracy", "train_seconds",
            "seconds")
    lines = ["## Training stages", "", "| metrics file | " + " | ".join(keep) + " |", "|---" * (len(keep) + 1) + "|"]
    for path in paths:
        data = read_json(path)
        lines.append(f"| `{path}` | " + " | ".join(cell(data.get(k)) for k in keep) + " |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evals", nargs="+", required=True, type=Path)
    parser.add_argument("--samples", type=Path, default=Path("plots/eval"))
    parser.add_argument("--stages", nargs="*", default=[], type=Path)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)

    evals = read_evals(args.evals)
    with atomic_dir(args.out) as tmp:
        images = plot(tmp, evals, args.samples)
        lines = ["# Evaluation summary", "",
                 f"{len(evals)} models: " + ", ".join(f"`{e['model']}` ({e.get('path', '?')})" for e in evals) + ".",
                 "Every number is measured on data no training stage read; see `metrics/eval/<model>.json`.", ""]
        for task in COLUMNS:
            lines += task_table(evals, task)
        lines += [f"![{name}]({name})" for name in images] + [""]
        lines += stage_lines(args.stages)
        (tmp / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    log.info("wrote %s (%d models, %d plots)", args.out / "summary.md", len(evals), len(images))
    return {"models": len(evals), "plots": images}


if __name__ == "__main__":
    run_stage(main)
