"""Gather every model's evaluation into one page: reports/summary.md, with its plots.

In:  --evals    metrics/eval/<model>.json files written by the evaluate stage (the order given is the order shown)
     --compare  metrics/compare.json: every persuasion model judged against the SFT samples, per judge, and each
                judge's agreement with people; the style replies per style judge
     --samples  plots/eval (each model's replies) and --pool (the held-out prompts), for replies side by side
     --stages   metrics of the training stages to quote (sft, dpo, rl, reward models), optional
Out: reports/summary.md    the persuasion study first (one row per approach, one column per judge, with 95%
                           intervals and each judge's kappa against people), three held-out prompts with every
                           model's reply, the style RL, then one table per task and the training stages
     reports/win_rate.png  the study's win rates per model and judge, with 95% intervals
     reports/win_rate.tsv  the same numbers (dvc plots draws them as bars)

    python -m stages.report --evals metrics/eval/*.json --compare metrics/compare.json --samples plots/eval \
        --pool data/preferences/eval.jsonl --out reports
"""

import argparse
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, read_json
from stages.lib.log import get_logger
from stages.lib.io import iter_jsonl
from stages.lib.records import read_pool

log = get_logger("report")

# Columns shown per task, in order; any other numeric key of the block follows them.
COLUMNS = {
    "persuasion": ["prompts", "mean_words", "empty_replies"],
    "agent": ["assistant_token_loss", "tool_call_validity", "tool_call_expected_tools", "tool_call_exact",
              "tool_call_rate", "tool_call_parsed", "tool_call_known_tool", "tool_prompts"],
    "persona": ["valid", "valid_json", "right_count", "all_headers", "examples"],
    "style": ["kl_to_reference", "mean_words", "replies"],
    "perplexity": ["perplexity", "assistant_tokens", "examples"],
}
TITLES = {"persuasion": "Persuasion: the replies the study judges (final-eval pool)",
          "agent": "Agent: assistant-token loss and tool-call validity (test split)",
          "persona": "Persona: valid JSON with exactly N types and every required header (val split)",
          "style": "Style: KL to the RL start policy (held-out starters)",
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


# The study's approaches in its order, then DPO on imported pairs; other models follow under their own names.
STUDY = {"base": "Base", "sft_persuasion": "SFT", "dpo_rlhf": "RLHF only (DPO on people's labels)",
         "dpo_rlaif": "RLAIF (DPO on AI labels)", "dpo_rlaif_rlhf": "RLAIF → RLHF",
         "dpo_imported": "DPO on imported pairs"}


def interval(block: dict) -> str:
    return f"{block['win_rate']:.2f} [{block['win_rate_low']:.2f}, {block['win_rate_high']:.2f}]"


def judges_table(compare: dict) -> list[str]:
    lines = ["| judge | kind | what it measures | its verdicts trained | agrees with people | Cohen's κ | "
             "people's pairs | orders agree |", "|---" * 8 + "|"]
    for name, info in compare["judges"].items():
        people = info.get("people") or {}
        lines.append(f"| `{name}` | {info['kind']} ({info.get('model') or info.get('function')}) | {info['criterion']} | "
                     f"{info.get('trained_on') or 'nothing: independent'} | {cell(people.get('agreement'))} | "
                     f"{cell(people.get('kappa'))} | {cell(people.get('pairs'))} | {cell(people.get('orders_agree'))} |")
    return lines + [""]


def study_table(compare: dict) -> list[str]:
    judges = [j for j in compare["judges"] if any(j in by for by in compare["persuasion"].values())]
    marked = {j: " †" if compare["judges"][j].get("trained_on") else "" for j in judges}
    lines = ["| approach | " + " | ".join(f"`{j}`{marked[j]} win rate [95%] | LC" for j in judges) + " | words |",
             "|---" * (2 * len(judges) + 2) + "|"]
    for model in [*[m for m in STUDY if m in compare["persuasion"]],
                  *[m for m in compare["persuasion"] if m not in STUDY]]:
        by = compare["persuasion"][model]
        cells = [f"{interval(by[j])} | {by[j]['lc_win_rate']:.2f}" if j in by else "– | –" for j in judges]
        words = next(iter(by.values()))["mean_words"] if by else None
        lines.append(f"| {STUDY.get(model, model)} | " + " | ".join(cells) + f" | {cell(words)} |")
    sft_words = next((b["sft_mean_words"] for by in compare["persuasion"].values() for b in by.values()), None)
    lines += ["", f"Each cell: the share of comparisons the model's reply wins against the SFT samples of the same "
              f"prompt ({compare['reference']}; ties count half), its 95% bootstrap interval over the "
              f"{compare['prompts']} prompts, and the length-controlled win rate (LC: the win probability at equal "
              f"length). SFT replies average {cell(sft_words)} words. A pairwise LLM judge counts a win only when "
              f"both orders pick the same reply."]
    if any(marked.values()):
        lines.append("† this judge's verdicts are training data of some of these models (see the judges table): "
                     "their win rates under it are not an independent measurement.")
    return lines + [""]


def side_by_side(pool: Path, samples: Path, models: list[str], count: int = 3) -> list[str]:
    rows = read_pool(pool)[:count]
    replies = {}
    for model in models:
        path = samples / model / "persuasion.jsonl"
        if path.is_file():
            replies[model] = {str(r["prompt_id"]): r.get("reply", "") for _, r in iter_jsonl(path)
                              if r.get("task") == "persuasion"}
    lines = [f"### {count} held-out prompts, every model's reply", ""]
    for row in rows:
        prompt_id = row["metadata"]["prompt_id"]
        last = next((m.get("content") or "" for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        shown = " ".join(last.split())
        lines += [f"**{prompt_id}**: {shown[-400:] if len(shown) > 400 else shown}", "", "| model | reply |",
                  "|---|---|", f"| SFT sample 1 (the reference) | {flat(row['response_1'])} |"]
        lines += [f"| {STUDY.get(m, m)} | {flat(replies[m].get(prompt_id, '–'))} |" for m in models if m in replies]
        lines.append("")
    return lines


def flat(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def style_section(compare: dict) -> list[str]:
    style = compare.get("style") or {}
    if not style:
        return []
    judges = list(next(iter(style.values())))
    marked = {j: " †" if compare["judges"].get(j, {}).get("trained_on") else "" for j in judges}
    lines = ["## Style RL: the policy's replies to held-out starters", "",
             "| model | " + " | ".join(f"`{j}`{marked[j]} mean score" for j in judges) + " | replies |",
             "|---" * (len(judges) + 2) + "|"]
    for model, by in style.items():
        lines.append(f"| {model} | " + " | ".join(cell(by[j]["mean_score"]) for j in judges)
                     + f" | {cell(next(iter(by.values()))['replies'])} |")
    lines += ["", "† the reward the policy was trained on; the other judge was not part of its training.", ""]
    return lines


def plot(out: Path, compare: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(model, judge, block) for model, by in compare["persuasion"].items() for judge, block in by.items()]
    if not rows:
        return []
    with (out / "win_rate.tsv").open("w", encoding="utf-8") as handle:
        handle.write("label\tmodel\tjudge\twin_rate\tlow\thigh\n")
        handle.writelines(f"{m} / {j}\t{m}\t{j}\t{b['win_rate']}\t{b['win_rate_low']}\t{b['win_rate_high']}\n"
                          for m, j, b in rows)
    models = list(compare["persuasion"])
    judges = list(dict.fromkeys(j for _, j, _ in rows))
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(models) * max(1, len(judges) / 2) + 1.5))
    height = 0.8 / len(judges)
    for k, judge in enumerate(judges):
        ys, rates, errors = [], [], [[], []]
        for i, model in enumerate(models):
            block = compare["persuasion"][model].get(judge)
            if block:
                ys.append(i + k * height), rates.append(block["win_rate"])
                errors[0].append(block["win_rate"] - block["win_rate_low"])
                errors[1].append(block["win_rate_high"] - block["win_rate"])
        ax.barh(ys, rates, height=height, xerr=errors, capsize=3, label=judge)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(models))], [STUDY.get(m, m) for m in models])
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xlim=(0, 1), xlabel="win rate against the SFT samples (95% bootstrap interval)",
           title="Persuasion study: win rate per judge")
    ax.legend(fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "win_rate.png", dpi=80)
    plt.close(fig)
    return ["win_rate.png"]


def stage_lines(paths: Sequence[Path]) -> list[str]:
    """The headline numbers of training stages, one row per metrics file."""
    if not paths:
        return []
    keep = ("eval_loss", "eval_reward_margin", "eval_reward_accuracy", "eval_human_reward_margin",
            "eval_human_reward_accuracy", "reward_before", "reward_after", "roc_auc", "accuracy",
            "pairwise_accuracy", "train_seconds",
            "seconds")
    lines = ["## Training stages", "", "| metrics file | " + " | ".join(keep) + " |", "|---" * (len(keep) + 1) + "|"]
    for path in paths:
        data = read_json(path)
        lines.append(f"| `{path}` | " + " | ".join(cell(data.get(k)) for k in keep) + " |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evals", nargs="+", required=True, type=Path)
    parser.add_argument("--compare", required=True, type=Path)
    parser.add_argument("--samples", type=Path, default=Path("plots/eval"))
    parser.add_argument("--pool", type=Path, default=Path("data/preferences/eval.jsonl"))
    parser.add_argument("--stages", nargs="*", default=[], type=Path)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)

    evals = read_evals(args.evals)
    compare = read_json(args.compare)
    if not isinstance(compare, dict) or not {"judges", "persuasion"} <= set(compare):
        raise StageError(f"{args.compare}: not a comparison file (expected 'judges' and 'persuasion')")
    with atomic_dir(args.out) as tmp:
        images = plot(tmp, compare)
        lines = ["# Evaluation summary", "",
                 "## The persuasion study: which approach writes the more persuasive replies?", "",
                 "Each model replied once to every held-out prompt (the final-eval pool, which no stage trains on). "
                 "The judges:", ""]
        lines += judges_table(compare) + study_table(compare)
        lines += [f"![{name}]({name})" for name in images] + [""]
        lines += side_by_side(args.pool, args.samples, list(compare["persuasion"]))
        lines += style_section(compare)
        lines += [f"{len(evals)} models: " + ", ".join(f"`{e['model']}` ({e.get('path', '?')})" for e in evals) + ".",
                  "Every number is measured on data no training stage read; see `metrics/eval/<model>.json`.", ""]
        for task in COLUMNS:
            lines += task_table(evals, task)
        lines += stage_lines(args.stages)
        (tmp / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    log.info("wrote %s (%d models, %d plots)", args.out / "summary.md", len(evals), len(images))
    return {"models": len(evals), "plots": images}


if __name__ == "__main__":
    run_stage(main)
