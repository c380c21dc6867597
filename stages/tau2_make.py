"""Turn Tau2-bench simulation results into the agent's conversations, split by task.

In:  --results      results files of `tau2 run` (one JSON object each) and/or directories whose
                    *.json files are read in name order
     --split-tasks  the domain's split_tasks.json: {"train": [task ids], "test": [task ids], ...}
     --tools        the domain's agent tools: a JSON list of OpenAI function schemas
     params `tau2_make`: success_only, skip_unsplit, system_prompt_template
Out: --out          {"splits": {"train": [...], "test": [...]}}, one example per kept simulation:
                    simulation_id, task_id, trial, reward, domain, source (the results file),
                    messages (the system prompt built from the domain policy, then what the agent
                    saw: its own turns with tool calls, their results, the user's text turns) and tools
     --metrics      simulations read, kept, dropped per reason, user tool calls dropped, repeated
                    tool-call ids renamed, per split

The user's own tool calls (telecom: the simulated customer toggling airplane mode, running a
speed test) and their results are not part of the agent's history and are dropped.

A tool-call id may recur across the agent's turns (providers that number calls per turn); each
result answers the open call of its id, and each repeat is written as `<id>_<occurrence>` so every
call in a conversation has its own id. An id twice in one turn is an error.

    python -m stages.tau2_make --results data/raw/tau2/telecom/results \
        --split-tasks data/raw/tau2/telecom/split_tasks.json --tools data/raw/tau2/telecom/tools.json \
        --out data/agent/tau2.json --metrics metrics/tau2_make.json
"""

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import read_json, require_path, write_json, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.tools import read_tools

log = get_logger("tau2_make")

POLICY_PLACEHOLDER = "{policy}"
SPLITS = ("train", "test")
REQUIRED_SIMULATION_KEYS = ("id", "task_id", "reward_info", "messages")


@dataclass
class Tau2MakeParams:
    success_only: bool  # keep only simulations with reward == 1.0
    skip_unsplit: bool  # drop (and count) simulations whose task is in neither train nor test
    system_prompt_template: str  # `{policy}` is replaced by the domain policy

    def __post_init__(self):
        if self.system_prompt_template.count(POLICY_PLACEHOLDER) != 1:
            raise ValueError(f"system_prompt_template must contain {POLICY_PLACEHOLDER} exactly once")


def results_files(paths: Sequence[Path]) -> list[Path]:
    files = []
    for path in paths:
        require_path(path, "results file or directory")
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if p.is_file())
            if not found:
                raise StageError(f"{path}: results directory has no *.json files")
            files.extend(found)
        else:
            files.append(path)
    if len(set(files)) != len(files):
        twice = next(f for f in files if files.count(f) > 1)
        raise StageError(f"{twice}: results file given twice")
    return files


def read_splits(path: Path) -> dict[str, str]:
    """Map each train/test task id to its split."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected an object of splits {{\"train\": [...], \"test\": [...]}}")
    split_of = {}
    for split in SPLITS:
        ids = data.get(split)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise StageError(f"{path}: '{split}' must be a list of task id strings")
        for task_id in ids:
            if split_of.get(task_id, split) != split:
                raise StageError(f"{path}: task id {task_id!r} is in both train and test")
            split_of[task_id] = split
    return split_of


def read_results(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a tau2 results object, got {type(data).__name__}")
    for key in ("info", "tasks", "simulations"):
        if key not in data:
            raise StageError(f"{path}: results missing required key '{key}'")
    environment = data["info"].get("environment_info") if isinstance(data["info"], dict) else None
    if not isinstance(environment, dict):
        raise StageError(f"{path}: results missing info.environment_info")
    for key in ("domain_name", "policy"):
        if not isinstance(environment.get(key), str) or not environment[key].strip():
            raise StageError(f"{path}: info.environment_info.{key} must be a non-empty string")
    if not isinstance(data["tasks"], list) or not isinstance(data["simulations"], list):
        raise StageError(f"{path}: 'tasks' and 'simulations' must be lists")
    return data


def task_ids(path: Path, tasks: list) -> set[str]:
    ids = set()
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or "id" not in task:
            raise StageError(f"{path}: tasks[{index}]: missing required key 'id'")
        ids.add(task["id"])
    return ids


def reward_of(simulation: dict, where: str) -> float:
    info = simulation["reward_info"]
    reward = info.get("reward") if isinstance(info, dict) else None
    if not isinstance(reward, (int, float)) or isinstance(reward, bool):
        raise StageError(f"{where}: reward_info.reward must be a number (was the simulation evaluated?)")
    return float(reward)


def checked_agent_calls(calls: list, at: str, tool_names: set[str], tools_path: Path) -> list[dict]:
    """An assistant turn's tool calls as `{"id", "name", "arguments"}`, ids as in the results file."""
    agent_calls = []
    turn_ids: dict[str, int] = {}
    for number, call in enumerate(calls):
        call_at = f"{at} tool_calls[{number}]"
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not call["id"]:
            raise StageError(f"{call_at}: tool call needs a non-empty string 'id'")
        if call.get("requestor", "assistant") != "assistant":
            raise StageError(f"{call_at}: assistant turn carries a {call['requestor']!r} tool call")
        if call.get("name") not in tool_names:
            raise StageError(f"{call_at}: unknown tool {call.get('name')!r} (not in {tools_path})")
        if not isinstance(call.get("arguments"), dict):
            raise StageError(f"{call_at}: arguments must be a JSON object")
        # Results name only the id: two calls of one id in a turn leave no way to tell which result is whose.
        if call["id"] in turn_ids:
            raise StageError(f"{call_at}: tool call id {call['id']!r} repeats within one assistant turn "
                             f"(also tool_calls[{turn_ids[call['id']]}])")
        turn_ids[call["id"]] = number
        agent_calls.append({"id": call["id"], "name": call["name"], "arguments": call["arguments"]})
    return agent_calls


def agent_call_ids(messages: list) -> set[str]:
    """Every id the agent's calls carry in one conversation, as the results file spells them."""
    return {call["id"] for message in messages
            if isinstance(message, dict) and message.get("role") == "assistant"
            and isinstance(message.get("tool_calls"), list)
            for call in message["tool_calls"] if isinstance(call, dict) and isinstance(call.get("id"), str)}


class OpenCalls:
    """The agent's calls awaiting their results, and the ids the written conversation gives them.

    Some providers number calls per turn, so one id recurs in later turns of a conversation. Chat
    templates and `tool_call_id`s need each call's id unique, so every repeat after the first gets its
    occurrence number as a suffix; a conversation without repeats keeps its ids exactly."""

    def __init__(self, messages: list):
        # A suffixed id must not take an id the file itself uses elsewhere in the conversation.
        self.taken = agent_call_ids(messages)
        self.occurrences: Counter = Counter()
        self.waiting: dict[str, tuple[str, str]] = {}  # file's id -> (written id, tool name)
        self.renamed = 0

    def written_id(self, call_id: str) -> str:
        self.occurrences[call_id] += 1
        number = self.occurrences[call_id]
        if number == 1:
            return call_id
        while f"{call_id}_{number}" in self.taken:
            number += 1
        self.taken.add(f"{call_id}_{number}")
        self.renamed += 1
        return f"{call_id}_{number}"

    def open(self, calls: list[dict]) -> list[dict]:
        """The turn's calls under their written ids, each now awaiting its result."""
        written = []
        for call in calls:
            call_id = self.written_id(call["id"])
            self.waiting[call["id"]] = (call_id, call["name"])
            written.append({**call, "id": call_id})
        return written

    def answer(self, call_id) -> str | None:
        """The written id of the open call this result answers; None when no call of the id is open."""
        written = self.waiting.pop(call_id, None)
        return written[0] if written else None


def agent_history(messages: list, tool_names: set[str], tools_path: Path, where: str, counts: Counter) -> list[dict]:
    """The agent's side of a simulation: its turns and tool results, and the user's text turns."""
    history = []
    open_calls = OpenCalls(messages)
    user_calls: set[str] = set()
    for index, message in enumerate(messages):
        at = f"{where} messages[{index}]"
        if not isinstance(message, dict) or "role" not in message:
            raise StageError(f"{at}: expected a message object with a 'role'")
        role = message["role"]
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise StageError(f"{at}: content must be a string or null")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise StageError(f"{at}: tool_calls must be a list or null")
        if role in ("assistant", "user") and open_calls.waiting:
            call_id, (_, name) = next(iter(open_calls.waiting.items()))
            raise StageError(f"{at}: tool call {call_id!r} ({name}) has no result before this {role} turn")

        if role == "assistant":
            agent_calls = open_calls.open(checked_agent_calls(calls, at, tool_names, tools_path))
            history.append({"role": "assistant", "content": content, "tool_calls": agent_calls or None})
            counts["assistant_turns"] += 1
            counts["tool_calls"] += len(agent_calls)
        elif role == "user":
            for call in calls:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    user_calls.add(call["id"])
            counts["user_tool_calls_dropped"] += len(calls)
            if content and content.strip():
                history.append({"role": "user", "content": content})
            else:
                counts["user_turns_dropped"] += 1
        elif role == "tool":
            call_id = message.get("id")
            if call_id in user_calls and message.get("requestor", "user") == "user":
                counts["user_tool_results_dropped"] += 1
                continue
            written_id = open_calls.answer(call_id)
            if written_id is None:
                raise StageError(f"{at}: tool result {call_id!r} answers no open tool call of the agent")
            error = bool(message.get("error", False))
            history.append({"role": "tool", "id": written_id, "content": content or "", "error": error})
            counts["tool_errors"] += error
        else:
            raise StageError(f"{at}: unexpected role {role!r} (expected assistant, user or tool)")
    if not counts["assistant_turns"]:
        raise StageError(f"{where}: no assistant message")
    counts["tool_call_ids_renamed"] += open_calls.renamed
    return history


def checked_simulation(simulation, where: str, path: Path, known_tasks: set[str],
                       simulation_source: dict[str, Path]) -> str:
    """Check one simulation's shape, record where its id was seen; returns how errors name it."""
    if not isinstance(simulation, dict):
        raise StageError(f"{where}: expected a simulation object")
    for key in REQUIRED_SIMULATION_KEYS:
        if key not in simulation:
            raise StageError(f"{where}: simulation missing required key '{key}'")
    simulation_id, task_id = simulation["id"], simulation["task_id"]
    where = f"{path}: simulation {simulation_id!r}"
    if simulation_id in simulation_source:
        raise StageError(f"{where}: duplicate simulation id (also in {simulation_source[simulation_id]})")
    simulation_source[simulation_id] = path
    if task_id not in known_tasks:
        raise StageError(f"{where}: task_id {task_id!r} is not among the file's tasks")
    if not isinstance(simulation["messages"], list):
        raise StageError(f"{where}: messages must be a list")
    return where


def build_examples(files: list[Path], split_of: dict[str, str], tools: list[dict], tool_names: set[str],
                   tools_path: Path, params: Tau2MakeParams, metrics: Counter) -> dict[str, list[dict]]:
    splits = {split: [] for split in SPLITS}
    domain_source: tuple[str, Path] | None = None
    simulation_source: dict[str, Path] = {}
    for path in files:
        results = read_results(path)
        domain = results["info"]["environment_info"]["domain_name"]
        if domain_source is None:
            domain_source = (domain, path)
        elif domain != domain_source[0]:
            raise StageError(f"{path}: domain {domain!r} differs from {domain_source[0]!r} "
                             f"in {domain_source[1]} (one domain per run: its tools and splits)")
        policy = results["info"]["environment_info"]["policy"]
        system_prompt = params.system_prompt_template.replace(POLICY_PLACEHOLDER, policy.strip())
        known_tasks = task_ids(path, results["tasks"])
        metrics["files"] += 1
        for index, simulation in enumerate(results["simulations"]):
            where = checked_simulation(simulation, f"{path}: simulations[{index}]", path, known_tasks,
                                       simulation_source)
            simulation_id, task_id = simulation["id"], simulation["task_id"]
            metrics["simulations_read"] += 1

            reward = reward_of(simulation, where)
            if params.success_only and reward != 1.0:
                metrics["dropped_failed"] += 1
                continue
            split = split_of.get(task_id)
            if split is None:
                if not params.skip_unsplit:
                    raise StageError(f"{where}: task id {task_id!r} is in neither train nor test of the split "
                                     f"file (set tau2_make.skip_unsplit to drop such simulations)")
                metrics["dropped_unsplit"] += 1
                continue

            counts = Counter()
            history = agent_history(simulation["messages"], tool_names, tools_path, where, counts)
            metrics.update(counts)
            splits[split].append({
                "simulation_id": simulation_id,
                "task_id": task_id,
                "trial": simulation.get("trial"),
                "reward": reward,
                "domain": domain,
                "source": path.as_posix(),
                "messages": [{"role": "system", "content": system_prompt}, *history],
                "tools": tools,
            })
    return splits


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--results", required=True, nargs="+", type=Path,
                        help="results files and/or directories of *.json results files")
    parser.add_argument("--split-tasks", required=True, type=Path)
    parser.add_argument("--tools", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "tau2_make", Tau2MakeParams)
    log_config(log, "tau2_make", params)

    files = results_files(args.results)
    tools, tool_names = read_tools(args.tools)
    split_of = read_splits(args.split_tasks)
    counts = Counter()
    splits = build_examples(files, split_of, tools, tool_names, args.tools, params, counts)

    kept = sum(len(examples) for examples in splits.values())
    if not kept:
        raise StageError(f"no simulations left after filtering: read {counts['simulations_read']}, "
                         f"dropped failed {counts['dropped_failed']}, unsplit {counts['dropped_unsplit']}")
    for split, examples in splits.items():
        if not examples:
            log.warning("split %s is empty", split)

    write_json(args.out, {"splits": splits})
    metrics = {
        "files": counts["files"],
        "simulations_read": counts["simulations_read"],
        "simulations_kept": kept,
        "dropped_failed": counts["dropped_failed"],
        "dropped_unsplit": counts["dropped_unsplit"],
        **{f"{split}_examples": len(examples) for split, examples in splits.items()},
        "assistant_turns": counts["assistant_turns"],
        "tool_calls": counts["tool_calls"],
        "tool_call_ids_renamed": counts["tool_call_ids_renamed"],
        "tool_errors": counts["tool_errors"],
        "user_tool_calls_dropped": counts["user_tool_calls_dropped"],
        "user_tool_results_dropped": counts["user_tool_results_dropped"],
        "user_turns_dropped": counts["user_turns_dropped"],
    }
    write_metrics(args.metrics, metrics)
    log.info("kept %d of %d simulations (train %d, test %d)", kept, counts["simulations_read"],
             len(splits["train"]), len(splits["test"]))
    return metrics


if __name__ == "__main__":
    run_stage(main)
