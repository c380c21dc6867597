"""Evaluate one model of the pipeline on held-out data that no stage trained on.

In:  --model   any policy the pipeline wrote: models/base, an SFT / DPO / RL adapter (with its stack), a full model
     --tasks   comma-separated, any of:
       persuasion  one sampled reply per prompt of the final-eval pool (data/preferences/eval.jsonl), kept in
                   persuasion.jsonl for the compare stage, which judges them against the pool's SFT samples
       agent       assistant-token loss on the agent test split; tool-call validity at its tool-calling turns
                   (the call parses, names a tool of the record's schemas, its arguments fit that tool's schema)
       persona     share of greedy outputs on the persona val split that are JSON with exactly N types, each
                   text holding every REQUIRED_HEADER of its prompt, under generate's repetition penalty
                   (evaluate.persona.repetition_penalty); an output caught in a loop is cut there (and counted
                   as `repeating`, never as finished)
       style       replies to the RL stage's held-out starters (`rl` params: same split, seed, temperature,
                   length), kept for the compare stage's style judges, and KL to --reference (the RL start policy)
       perplexity  assistant-token perplexity on the persuasion test split
     params `evaluate` (sample sizes, generation settings), `rl` (style)
Out: metrics/eval/<name>.json   one block per task
     plots/eval/<name>/         <task>.jsonl: every reply of that task, one line per prompt (the judges read
                                persuasion.jsonl and style.jsonl, so adding a judge never samples again)

    python -m stages.evaluate --model models/dpo/rlaif --name dpo_rlaif --tasks persuasion,perplexity \
        --out metrics/eval/dpo_rlaif.json --samples plots/eval/dpo_rlaif
"""

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.chat import resolve_chat_template
from stages.lib.generation import RepeatStop, generate_batches, keeps_logits, reply_logprobs, sample_replies
from stages.lib.io import atomic_dir, iter_jsonl, read_json, require_path, write_jsonl, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, build, load_params, parse_section
from stages.lib.policy import load_policy, policy_stack, require_policy_dir
from stages.lib.records import read_chat_records, read_pool, read_starters, split_starters
from stages.lib.schema import schema_errors

log = get_logger("evaluate")

TASKS = ("persuasion", "agent", "persona", "style", "perplexity")


def _at_least(obj, names: Sequence[str], least: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


@dataclass
class PersuasionEval:
    max_prompts: int | None  # null: the whole final-eval pool
    max_new_tokens: int  # as generate_preferences, so the model's replies compare with the SFT samples
    temperature: float
    top_p: float

    def __post_init__(self):
        _at_least(self, ["max_prompts", "max_new_tokens"])


@dataclass
class AgentEval:
    max_examples: int | None  # test conversations for the assistant-token loss (about 4.5k tokens each)
    max_tool_prompts: int | None  # tool-calling turns to generate at, in file order; null: all of them
    max_new_tokens: int

    def __post_init__(self):
        _at_least(self, ["max_examples", "max_tool_prompts", "max_new_tokens"])


@dataclass
class PersonaEval:
    max_examples: int | None
    max_new_tokens: int | None  # null: the longest persona answer of the token analysis (--persona-lengths)
    repetition_penalty: float  # generate's (CTRL's): logits of tokens already in prompt or answer, / or x it

    def __post_init__(self):
        _at_least(self, ["max_examples", "max_new_tokens"])
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 leaves the logits alone), got {self.repetition_penalty}")


@dataclass
class PerplexityEval:
    max_examples: int | None

    def __post_init__(self):
        _at_least(self, ["max_examples"])


@dataclass
class EvaluateParams:
    batch_size: int  # prompts per generate call
    max_batch_tokens: int | None  # KV-cache tokens per generate call (rows x (prompt + new tokens)); null: no bound
    seed: int
    persuasion: PersuasionEval
    agent: AgentEval
    persona: PersonaEval
    perplexity: PerplexityEval

    def __post_init__(self):
        _at_least(self, ["batch_size", "max_batch_tokens"])


@dataclass
class StyleStarters:
    """The keys of the `rl` section that pick its held-out starters and sample replies to them as the rl stage does."""
    seed: int
    eval_prompts: int
    batch_size: int
    eval_generations: int
    response_length: int
    temperature: float


def style_starters_params(params_path: Path) -> StyleStarters:
    section = load_params(params_path).get("rl")
    if not isinstance(section, dict):
        raise StageError("rl: section missing from params")
    names = {f.name for f in fields(StyleStarters)}
    return build(StyleStarters, {key: value for key, value in section.items() if key in names}, "rl")


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise StageError(f"--tasks: unknown task '{unknown[0] if unknown else text}' (have: {', '.join(TASKS)})")
    return list(dict.fromkeys(tasks))


def first(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, params: EvaluateParams,
             temperature: float = 0.0, top_p: float = 1.0, ended: list | None = None,
             repeating: list | None = None, repetition_penalty: float = 1.0) -> list[str]:
    """One reply per rendered prompt (greedy at temperature 0), in batches of similar length and bounded size.

    `ended`, when given, is filled with whether each reply stopped by itself (an end-of-sequence token) rather
    than at max_new_tokens. Greedy replies caught in a loop (`RepeatStop`: the last 256 tokens one block of at most
    64, repeated) are cut there instead of copying the block to max_new_tokens; `repeating`, when given, is filled
    with whether each reply was. `repetition_penalty` goes to generate as it is (1: none).
    """
    import torch
    from transformers import StoppingCriteriaList

    replies = [""] * len(prompts)
    for flags in (ended, repeating):
        if flags is not None:
            flags[:] = [False] * len(prompts)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {tokenizer.eos_token_id}
    torch.manual_seed(params.seed)
    stop = RepeatStop(eos)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        "stopping_criteria": StoppingCriteriaList([stop])}
    if repetition_penalty != 1:
        sampling["repetition_penalty"] = float(repetition_penalty)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for indices, new in generate_batches(model, tokenizer, encoded, 1, max_new_tokens, params.batch_size,
                                         params.max_batch_tokens, **sampling):
        cut = stop.stopped.tolist() if stop.stopped is not None else [False] * len(indices)
        stop.reset()
        for i, row, text, looped in zip(indices, new.tolist(), tokenizer.batch_decode(new, skip_special_tokens=True),
                                        cut):
            replies[i] = text.strip()
            if ended is not None:  # a cut row is padded with the pad token, which may be the EOS
                ended[i] = not looped and any(token in eos for token in row)
            if repeating is not None:
                repeating[i] = looped
    return replies


def render(tokenizer, messages: list[dict], template: str | None = None, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


def assistant_nll(model, tokenizer, records: list[dict]) -> tuple[float, int]:
    """Summed negative log-likelihood of the assistant tokens of `records`, and their count."""
    import torch

    total, count = 0.0, 0
    for record in records:
        tools = record.get("tools")
        template = resolve_chat_template(tokenizer, "auto", needs_assistant_mask=True, needs_tools=bool(tools))
        encoded = tokenizer.apply_chat_template(record["messages"], tools=tools, chat_template=template,
                                                tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([encoded["input_ids"]], device=model.device)
        # Position t predicts token t + 1: keep the positions whose next token is the assistant's.
        positions = torch.tensor(encoded["assistant_masks"][1:], dtype=torch.bool).nonzero()[:, 0].to(model.device)
        if not len(positions):
            continue
        with torch.no_grad():
            if keeps_logits(model):  # the vocabulary projection only where the loss is taken
                logits = model(ids, logits_to_keep=positions).logits[0].float()
            else:
                logits = model(ids).logits[0, positions].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, positions + 1], reduction="sum"))
        count += len(positions)
    return total, count


def eval_persuasion(model, tokenizer, params: EvaluateParams, pool_path: Path, samples: list) -> dict:
    rows = first(read_pool(pool_path), params.persuasion.max_prompts)
    if not rows:
        raise StageError(f"{pool_path}: no prompts to evaluate on")
    p = params.persuasion
    replies = generate(model, tokenizer, [render(tokenizer, r["prompt"]) for r in rows], p.max_new_tokens, params,
                       p.temperature, p.top_p)
    for row, reply in zip(rows, replies):
        samples.append({"task": "persuasion", "prompt_id": row["metadata"]["prompt_id"], "reply": reply})
    return {"prompts": len(rows), "mean_words": round(sum(len(r.split()) for r in replies) / len(replies), 1),
            "empty_replies": sum(not r for r in replies)}


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def check_tool_calls(text: str, tools: list[dict]) -> dict:
    """Whether `text` calls tools, and whether every call parses, names a known tool and fits its schema."""
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools if "function" in t}
    blocks = TOOL_CALL.findall(text)
    result = {"called": bool(blocks), "parsed": bool(blocks), "known_tool": bool(blocks), "valid": bool(blocks),
              "errors": [], "calls": []}
    for block in blocks:
        try:
            call = json.loads(block)
            arguments = call["arguments"]
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            name = call["name"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            result.update(parsed=False, known_tool=False, valid=False)
            result["errors"].append(f"unparsable call: {type(err).__name__}")
            continue
        result["calls"].append({"name": name, "arguments": arguments})
        if name not in schemas:
            result.update(known_tool=False, valid=False)
            result["errors"].append(f"unknown tool {name!r}")
            continue
        errors = schema_errors(arguments, schemas[name])
        if errors:
            result["valid"] = False
            result["errors"].extend(f"{name}: {e}" for e in errors)
    return result


def eval_agent(model, tokenizer, params: EvaluateParams, test_path: Path, samples: list) -> dict:
    records = read_chat_records(test_path)
    nll, tokens = assistant_nll(model, tokenizer, first(records, params.agent.max_examples))
    turns = [(record, i) for record in records for i, m in enumerate(record["messages"])
             if m["role"] == "assistant" and m.get("tool_calls")]
    turns = first(turns, params.agent.max_tool_prompts)
    prompts = []
    for record, i in turns:
        template = resolve_chat_template(tokenizer, "auto", needs_assistant_mask=False, needs_tools=True)
        prompts.append(render(tokenizer, record["messages"][:i], template, record.get("tools")))
    replies = generate(model, tokenizer, prompts, params.agent.max_new_tokens, params)
    checks = [check_tool_calls(reply, record.get("tools") or []) for (record, _), reply in zip(turns, replies)]
    for (record, i), reply, check in zip(turns, replies, checks):
        reference = [reference_call(c) for c in record["messages"][i]["tool_calls"]]
        # Beyond validity: did the reply call what the recorded agent called (names in order), and with the same
        # arguments? The recorded agent's calls are one correct way through the task, not the only one.
        check["expected_tools"] = check["valid"] and [c["name"] for c in check["calls"]] == [c["name"] for c in reference]
        check["exact"] = check["valid"] and check["calls"] == reference
        samples.append({"task": "agent", "turn": i, "expected_tools": [c["name"] for c in reference],
                        "reply": reply, **check})
    share = lambda key: round(sum(c[key] for c in checks) / len(checks), 4) if checks else None  # noqa: E731
    return {"assistant_token_loss": round(nll / tokens, 4), "assistant_tokens": tokens,
            "examples": min(len(records), params.agent.max_examples or len(records)),
            "tool_prompts": len(checks), "tool_call_rate": share("called"), "tool_call_parsed": share("parsed"),
            "tool_call_known_tool": share("known_tool"), "tool_call_validity": share("valid"),
            "tool_call_expected_tools": share("expected_tools"), "tool_call_exact": share("exact")}


def reference_call(call: dict) -> dict:
    """A recorded tool call (OpenAI `{function: {name, arguments}}` or flat) as {name, arguments-object}."""
    function = call.get("function", call)
    arguments = function.get("arguments") or {}
    return {"name": function["name"], "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments}


HEADER = re.compile(r"<[A-Z][A-Z_]*>")


def check_persona(text: str, n_types: int, headers: list[str]) -> dict:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        types = json.loads(body)["types"]
        texts = [t["text"] for t in types]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"valid_json": False, "right_count": False, "all_headers": False, "valid": False}
    right_count = len(texts) == n_types
    all_headers = bool(texts) and all(h in t for t in texts for h in headers)
    return {"valid_json": True, "right_count": right_count, "all_headers": all_headers,
            "valid": right_count and all_headers}


def persona_max_new_tokens(params: EvaluateParams, lengths_path: Path | None) -> int:
    """evaluate.persona.max_new_tokens, or (null) room for the longest answer the token analysis counted."""
    if params.persona.max_new_tokens is not None:
        return params.persona.max_new_tokens
    if lengths_path is None:
        raise StageError("evaluate.persona.max_new_tokens: null needs --persona-lengths "
                         "(the token lengths of the persona answers)")
    lengths = read_json(require_path(lengths_path, "--persona-lengths"))
    if not isinstance(lengths.get("assistant_p100"), (int, float)):
        raise StageError(f"{lengths_path}: no assistant_p100 (the token analysis of the persona answers)")
    return int(lengths["assistant_p100"]) + 16  # the answer, and the end-of-turn tokens after it


def eval_persona(model, tokenizer, params: EvaluateParams, val_path: Path, samples: list,
                 lengths_path: Path | None = None) -> dict:
    max_new_tokens = persona_max_new_tokens(params, lengths_path)
    lines = first(list(iter_jsonl(val_path, required=("messages", "n_players"))), params.persona.max_examples)
    records, prompts, expected = [], [], []
    for number, record in lines:
        user = next((m.get("content") or "" for m in record["messages"] if m.get("role") == "user"), "")
        line = next((line for line in user.splitlines() if line.startswith("REQUIRED_HEADERS:")), None)
        if line is None:
            raise StageError(f"{val_path}:{number}: the user turn has no REQUIRED_HEADERS line")
        records.append(record)
        expected.append((record["n_players"], HEADER.findall(line)))
        prompts.append(render(tokenizer, [m for m in record["messages"] if m["role"] != "assistant"]))
    ended, repeating = [], []
    replies = generate(model, tokenizer, prompts, max_new_tokens, params, ended=ended, repeating=repeating,
                       repetition_penalty=params.persona.repetition_penalty)
    checks = [check_persona(reply, n, headers) for reply, (n, headers) in zip(replies, expected)]
    for record, reply, check, done, looped in zip(records, replies, checks, ended, repeating):
        samples.append({"task": "persona", "game_id": record.get("game_id"), "reply": reply, "finished": done,
                        "repeating": looped, **check})
    return {**{key: round(sum(c[key] for c in checks) / len(checks), 4)
               for key in ("valid", "valid_json", "right_count", "all_headers")}, "examples": len(checks),
            "max_new_tokens": max_new_tokens, "repetition_penalty": params.persona.repetition_penalty,
            "finished": round(sum(ended) / len(ended), 4),
            "repeating": round(sum(repeating) / len(repeating), 4)}  # cut in a greedy loop (see `generate`)


def eval_style(model, tokenizer, model_dir: Path, reference: Path, params_path: Path, starters_path: Path,
               samples: list) -> dict:
    rl = style_starters_params(params_path)
    _, held_out = split_starters(read_starters(starters_path), rl.seed, rl.eval_prompts, rl.batch_size, starters_path)
    replies = sample_replies(model, tokenizer, [s["prompt"] for s in held_out], rl)
    if policy_stack(model_dir) == policy_stack(reference):
        kl = 0.0
    else:
        reference_model, _ = load_policy(reference)
        own = reply_logprobs(model, replies, rl.temperature)
        ref = reply_logprobs(reference_model.to(model.device), replies, rl.temperature)
        kl = sum(o - r for o, r in zip(own, ref)) / len(own)
    for starter, texts in zip(held_out, replies.texts):
        samples.append({"task": "style", "prompt_id": starter["id"], "prompt": starter["prompt"], "replies": texts})
    flat = [t for group in replies.texts for t in group]
    return {"kl_to_reference": round(kl, 4), "reference": str(reference), "replies": len(flat),
            "mean_words": round(sum(len(t.split()) for t in flat) / len(flat), 1)}


def eval_perplexity(model, tokenizer, params: EvaluateParams, heldout_path: Path) -> dict:
    records = first(read_chat_records(heldout_path), params.perplexity.max_examples)
    nll, tokens = assistant_nll(model, tokenizer, records)
    return {"perplexity": round(math.exp(nll / tokens), 4), "assistant_tokens": tokens, "examples": len(records)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--name", required=True, help="the model's name in reports (metrics/eval/<name>.json)")
    parser.add_argument("--tasks", required=True, type=parse_tasks, help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--pool", type=Path, default=Path("data/preferences/eval.jsonl"))
    parser.add_argument("--agent-test", type=Path, default=Path("data/agent/openai/test.jsonl"))
    parser.add_argument("--persona", type=Path, default=Path("data/persona/val.jsonl"))
    parser.add_argument("--persona-lengths", type=Path, default=None,
                        help="persona: the token lengths of the answers (data/token_lengths/persona.json)")
    parser.add_argument("--starters", type=Path, default=Path("data/raw/starters/starters.jsonl"))
    parser.add_argument("--reference", type=Path, default=Path("models/base"), help="style: the KL reference")
    parser.add_argument("--heldout", type=Path, default=Path("data/persuasion/sft/test.jsonl"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    params = parse_section(load_params(args.params), "evaluate", EvaluateParams)
    model_dir = require_policy_dir(args.model, "--model")
    inputs = {"persuasion": [("--pool", args.pool)],
              "agent": [("--agent-test", args.agent_test)], "persona": [("--persona", args.persona)],
              "style": [("--starters", args.starters)],
              "perplexity": [("--heldout", args.heldout)]}
    for task in args.tasks:
        for key, path in inputs[task]:
            require_path(path, key)
    if "style" in args.tasks:
        require_policy_dir(args.reference, "--reference")
    log_config(log, "evaluate", {"model": str(model_dir), "tasks": args.tasks})

    import torch

    model, tokenizer = load_policy(model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    metrics, samples = {"model": args.name, "path": str(model_dir)}, []
    for task in args.tasks:
        task_started = time.perf_counter()
        if task == "persuasion":
            metrics[task] = eval_persuasion(model, tokenizer, params, args.pool, samples)
        elif task == "agent":
            metrics[task] = eval_agent(model, tokenizer, params, args.agent_test, samples)
        elif task == "persona":
            metrics[task] = eval_persona(model, tokenizer, params, args.persona, samples, args.persona_lengths)
        elif task == "style":
            metrics[task] = eval_style(model, tokenizer, model_dir, args.reference, args.params, args.starters,
                                       samples)
        else:
            metrics[task] = eval_perplexity(model, tokenizer, params, args.heldout)
        log.info("%s %s: %s (%.0f s)", args.name, task, json.dumps(metrics[task]), time.perf_counter() - task_started)
    metrics["seconds"] = round(time.perf_counter() - started, 1)

    with atomic_dir(args.samples) as tmp:
        for task in args.tasks:
            rows = [row for row in samples if row["task"] == task]
            if rows:
                write_jsonl(tmp / f"{task}.jsonl", rows)
    write_metrics(args.out, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(main)
