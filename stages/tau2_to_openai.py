"""Write the agent conversations of `tau2_make` as OpenAI-format chat JSONL, one file per split.

In:  --input    the intermediate dataset of stages.tau2_make ({"splits": {"train": [...], "test": [...]}})
     params `tau2_to_openai`: parallel_tool_calls
Out: --out      a directory with train.jsonl and test.jsonl, one line per example:
                {"messages": [...], "tools": [...], "parallel_tool_calls": true, "metadata": {...}}
                system message first; assistant tool calls as
                {"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}
                (arguments JSON-encoded exactly once), assistant content null when the turn only
                calls tools; tool results as {"role": "tool", "tool_call_id", "content"}; everything
                after the last assistant message cut; metadata keeps the provenance
     --metrics  examples per split, turns, tool calls, messages cut

    python -m stages.tau2_to_openai --input data/agent/tau2.json --out data/agent/openai \
        --metrics metrics/tau2_to_openai.json
"""

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, read_json, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import write_chat_records

log = get_logger("tau2_to_openai")

SPLITS = ("train", "test")
PAYLOAD_KEYS = ("messages", "tools")


@dataclass
class Tau2ToOpenAIParams:
    # Written into every record; false refuses data whose assistant turns call several tools at once.
    parallel_tool_calls: bool


def openai_message(message: dict, where: str) -> dict:
    role = message.get("role")
    if role in ("system", "user"):
        return {"role": role, "content": message["content"]}
    if role == "tool":
        return {"role": "tool", "tool_call_id": message["id"], "content": message["content"]}
    if role != "assistant":
        raise StageError(f"{where}: unexpected role {role!r}")
    calls = message.get("tool_calls") or []
    if not calls:
        return {"role": "assistant", "content": message.get("content") or ""}
    return {
        "role": "assistant",
        "content": message.get("content") or None,
        "tool_calls": [{"id": call["id"], "type": "function",
                        "function": {"name": call["name"],
                                     "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                       for call in calls],
    }


def openai_record(example: dict, where: str, params: Tau2ToOpenAIParams, counts: Counter) -> dict:
    for key in PAYLOAD_KEYS:
        if not isinstance(example.get(key), list):
            raise StageError(f"{where}: example missing list '{key}'")
    messages = example["messages"]
    last_assistant = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                         default=None)
    if last_assistant is None:
        raise StageError(f"{where}: example has no assistant message")
    counts["messages_cut_after_last_assistant"] += len(messages) - last_assistant - 1
    converted = []
    for index, message in enumerate(messages[:last_assistant + 1]):
        at = f"{where}.messages[{index}]"
        if not isinstance(message, dict):
            raise StageError(f"{at}: expected a message object")
        try:
            converted.append(openai_message(message, at))
        except KeyError as err:
            raise StageError(f"{at}: message missing required key {err}") from None
        calls = converted[-1].get("tool_calls") or []
        if len(calls) > 1 and not params.parallel_tool_calls:
            raise StageError(f"{at}: assistant turn makes {len(calls)} tool calls but "
                             f"tau2_to_openai.parallel_tool_calls is false")
        counts["messages"] += 1
        counts["assistant_turns"] += message.get("role") == "assistant"
        counts["tool_call_turns"] += bool(calls)
        counts["parallel_tool_call_turns"] += len(calls) > 1
        counts["tool_calls"] += len(calls)
        counts["tool_results"] += message.get("role") == "tool"
    metadata = {key: value for key, value in example.items() if key not in PAYLOAD_KEYS}
    return {"messages": converted, "tools": example["tools"],
            "parallel_tool_calls": params.parallel_tool_calls, "metadata": metadata}


def read_splits(path: Path) -> dict[str, list]:
    data = read_json(path)
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, dict):
        raise StageError(f"{path}: expected {{\"splits\": {{\"train\": [...], \"test\": [...]}}}}")
    for split in SPLITS:
        if not isinstance(splits.get(split), list):
            raise StageError(f"{path}: splits.{split} must be a list of examples")
    return {split: splits[split] for split in SPLITS}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "tau2_to_openai", Tau2ToOpenAIParams)
    log_config(log, "tau2_to_openai", params)

    splits = read_splits(args.input)
    counts = Counter()
    records = {}
    for split, examples in splits.items():
        records[split] = []
        for index, example in enumerate(examples):
            where = f"{args.input}: splits.{split}[{index}]"
            if not isinstance(example, dict):
                raise StageError(f"{where}: expected an example object")
            records[split].append(openai_record(example, where, params, counts))
    if not any(records.values()):
        raise StageError(f"{args.input}: no examples in train or test")

    with atomic_dir(args.out) as tmp:
        for split, split_records in records.items():
            write_chat_records(tmp / f"{split}.jsonl", split_records)

    metrics = {
        **{f"{split}_examples": len(split_records) for split, split_records in records.items()},
        "messages": counts["messages"],
        "assistant_turns": counts["assistant_turns"],
        "tool_call_turns": counts["tool_call_turns"],
        "parallel_tool_call_turns": counts["parallel_tool_call_turns"],
        "tool_calls": counts["tool_calls"],
        "tool_results": counts["tool_results"],
        "messages_cut_after_last_assistant": counts["messages_cut_after_last_assistant"],
    }
    write_metrics(args.metrics, metrics)
    log.info("wrote %s", ", ".join(f"{split}: {len(r)}" for split, r in records.items()))
    return metrics


if __name__ == "__main__":
    run_stage(main)
