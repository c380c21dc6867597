"""Label preference pools with an AI judge: the trained reward model, or an LLM judge prompt.

In:  pools written by generate_preferences (`{"prompt", "response_1", "response_2", "metadata"}` per line);
     the reward model (models/reward) and a local causal LM for the LLM judge (models/base or any
     policy directory); params `label_ai`
Out: <out>/<pool>.jsonl   one labelled pair per prompt: `{"prompt", "chosen", "rejected", "metadata":
                          {..., "grader", "preference": "1"|"2", "is_equal", "scores", "reasoning"?}}`
     <metrics>            per pool: pairs, ties, how often each position won, mean score gap

    python -m stages.label_ai --pools data/preferences/ai.jsonl data/preferences/eval.jsonl \
        --reward-model models/reward --judge-model models/base \
        --out data/labelled --metrics metrics/label_ai.json

Judges:
- `reward_model` scores each response with the reward model; the higher score wins.
- `llm` asks a causal LM which reply is better and reads its next-token probabilities for "1" and
  "2" (no sampling, so labels are reproducible); with `swap` it asks again with the replies in the
  other order and averages, which cancels the judge's preference for a position. With
  `reasoning_tokens` > 0 it first writes a short comparison, kept in the metadata.
A pair whose two scores differ by at most `tie_margin` is a tie (`is_equal`); DPO leaves ties out.
"""

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import write_json
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.policy import load_policy, require_policy_dir
from stages.lib.records import LabelledPair, read_pool, write_labelled_pairs
from stages.lib.reward import REWARD_CONFIG, load_reward_fn

log = get_logger("label_ai")

JUDGE_SYSTEM = "You are a careful, impartial judge of conversation replies."
DECISION_PREFIX = "The better reply is Reply "
REASONING_PREFIX = "Comparison:"


@dataclass
class LLMJudgeParams:
    criterion: str
    max_context_tokens: int  # the conversation is cut from the start to fit; the replies are kept whole
    swap: bool               # judge both orders and average (removes position bias, costs 2x)
    reasoning_tokens: int    # > 0: write a short comparison first (greedy) and keep it as `reasoning`

    def __post_init__(self):
        if self.max_context_tokens < 16:
            raise ValueError(f"max_context_tokens must be at least 16, got {self.max_context_tokens}")
        if self.reasoning_tokens < 0:
            raise ValueError(f"reasoning_tokens must not be negative, got {self.reasoning_tokens}")


@dataclass
class LabelAIParams:
    judge: Literal["reward_model", "llm"]
    tie_margin: float  # |score_1 - score_2| <= tie_margin marks a tie
    batch_size: int
    llm: LLMJudgeParams

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


def reward_model_scores(reward_dir: Path, rows: list[dict], batch_size: int) -> list[tuple[float, float]]:
    reward_fn = load_reward_fn(reward_dir, batch_size=batch_size)
    flat = reward_fn([text for row in rows for text in (row["response_1"], row["response_2"])])
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(rows))]


def conversation_text(messages: list[dict], tokenizer, max_tokens: int) -> str:
    """The chat without its system turn, one `Role: text` block per turn, cut from the start to fit."""
    text = "\n\n".join(f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages if m["role"] != "system")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return "[...] " + tokenizer.decode(ids[-max_tokens:])


def judge_messages(context: str, first: str, second: str, criterion: str, reasoning: bool) -> list[dict]:
    ask = ("Compare the two replies in two or three sentences, then name the better one."
           if reasoning else "Answer with the number of the better reply.")
    body = (f"Conversation so far:\n{context}\n\nReply 1:\n{first}\n\nReply 2:\n{second}\n\n"
            f"{criterion} {ask}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise StageError(f"label_ai.judge: the judge's tokenizer splits {text!r} into {len(ids)} tokens; "
                         f"the LLM judge needs '1' and '2' to be single tokens")
    return ids[0]


class LLMJudge:
    """P(reply 1 is better) read from a causal LM's next-token distribution over '1' and '2'."""

    def __init__(self, model_dir: Path, params: LabelAIParams):
        self.model, self.tokenizer = load_policy(model_dir)
        self.params = params
        self.choice_ids = [single_token(self.tokenizer, "1"), single_token(self.tokenizer, "2")]

    def _prompts(self, items: list[tuple[str, str, str]], reasoning: bool) -> list[str]:
        criterion = self.params.llm.criterion
        return [self.tokenizer.apply_chat_template(judge_messages(c, a, b, criterion, reasoning), tokenize=False,
                                                   add_generation_prompt=True) for c, a, b in items]

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.params.llm.reasoning_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def _first_wins(self, prompts: list[str]) -> list[float]:
        import torch

        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, self.choice_ids].float()
        return torch.softmax(logits, dim=-1)[:, 0].tolist()

    def judge(self, items: list[tuple[str, str, str]]) -> tuple[list[float], list[str | None]]:
        """For (context, reply_1, reply_2) items: P(reply 1 better), and the reasoning text if asked."""
        reasoning = self.params.llm.reasoning_tokens > 0
        prompts = self._prompts(items, reasoning)
        notes = self._generate([p + REASONING_PREFIX for p in prompts]) if reasoning else [None] * len(items)
        decided = [p + (f"{REASONING_PREFIX} {n}\n" if n else "") + DECISION_PREFIX for p, n in zip(prompts, notes)]
        first = self._first_wins(decided)
        if not self.params.llm.swap:
            return first, notes
        swapped = self._prompts([(c, b, a) for c, a, b in items], reasoning)
        swapped_notes = self._generate([p + REASONING_PREFIX for p in swapped]) if reasoning else [None] * len(items)
        second = self._first_wins([p + (f"{REASONING_PREFIX} {n}\n" if n else "") + DECISION_PREFIX
                                   for p, n in zip(swapped, swapped_notes)])
        return [(a + (1 - b)) / 2 for a, b in zip(first, second)], notes


def llm_scores(judge: LLMJudge, rows: list[dict], progress=None) -> tuple[list[tuple[float, float]], list]:
    size = judge.params.batch_size
    scores, notes = [], []
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        items = [(conversation_text(r["prompt"], judge.tokenizer, judge.params.llm.max_context_tokens),
                  r["response_1"], r["response_2"]) for r in batch]
        wins, reasoning = judge.judge(items)
        scores.extend((p, 1 - p) for p in wins)
        notes.extend(reasoning)
        if progress:
            progress.update(len(batch))
    return scores, notes


def labelled_pair(row: dict, scores: tuple[float, float], grader: str, tie_margin: float, reasoning: str | None) -> dict:
    first, second = scores
    is_equal = abs(first - second) <= tie_margin
    preference = "1" if is_equal or first > second else "2"
    chosen, rejected = (row["response_1"], row["response_2"]) if preference == "1" else (row["response_2"], row["response_1"])
    metadata = {**row["metadata"], "grader": grader, "preference": preference, "is_equal": is_equal,
                "scores": [round(first, 6), round(second, 6)]}
    if reasoning:
        metadata["reasoning"] = reasoning
    return LabelledPair(prompt=row["prompt"], chosen=chosen, rejected=rejected, metadata=metadata)


def pool_metrics(pairs: list[dict]) -> dict:
    gaps = [abs(p["metadata"]["scores"][0] - p["metadata"]["scores"][1]) for p in pairs]
    ties = sum(p["metadata"]["is_equal"] for p in pairs)
    return {
        "pairs": len(pairs),
        "ties": ties,
        "preferred_1": sum(1 for p in pairs if not p["metadata"]["is_equal"] and p["metadata"]["preference"] == "1"),
        "preferred_2": sum(1 for p in pairs if not p["metadata"]["is_equal"] and p["metadata"]["preference"] == "2"),
        "mean_score_gap": round(sum(gaps) / len(gaps), 4),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--pools", required=True, type=Path, nargs="+", help="pool JSONL files to label")
    parser.add_argument("--reward-model", required=True, type=Path, help="judge `reward_model`")
    parser.add_argument("--judge-model", required=True, type=Path, help="judge `llm`: a causal LM or adapter dir")
    parser.add_argument("--out", required=True, type=Path, help="directory for <pool>.jsonl")
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "label_ai", LabelAIParams)
    log_config(log, "label_ai", params)
    pools = read_pools(args.pools)
    if params.judge == "reward_model":
        if not (args.reward_model / REWARD_CONFIG).is_file():
            raise StageError(f"--reward-model: '{args.reward_model}' is not a reward model directory (no {REWARD_CONFIG})")
        grader = f"reward_model:{args.reward_model.name}"
    else:
        require_policy_dir(args.judge_model, "--judge-model")
        grader = f"llm:{args.judge_model.name}"

    from tqdm import tqdm

    started = time.perf_counter()
    labelled, metrics = {}, {"judge": params.judge}
    judge = LLMJudge(args.judge_model, params) if params.judge == "llm" else None
    for name, rows in pools.items():
        if judge is None:
            scores, notes = reward_model_scores(args.reward_model, rows, params.batch_size), [None] * len(rows)
        else:
            with tqdm(total=len(rows), desc=f"judging {name}", unit="pair") as progress:
                scores, notes = llm_scores(judge, rows, progress)
        labelled[name] = [labelled_pair(row, s, grader, params.tie_margin, n) for row, s, n in zip(rows, scores, notes)]
        metrics[name] = pool_metrics(labelled[name])
        log.info("%s: %d pairs, %d ties", name, len(rows), metrics[name]["ties"])
    metrics["seconds"] = round(time.perf_counter() - started, 1)

    # Everything is judged before anything is written; each file appears whole.
    args.out.mkdir(parents=True, exist_ok=True)
    for name, pairs in labelled.items():
        write_labelled_pairs(args.out / f"{name}.jsonl", pairs)
    write_json(args.metrics, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(main)
