import hashlib
import json
from pathlib import Path

import pytest

from stages import tau2_make, tau2_to_openai
from stages.lib import StageError
from tests.conftest import REPO_ROOT, params_file, project_params

SAMPLE = REPO_ROOT / "data" / "raw" / "tau2" / "telecom"
POLICY = "# Telecom policy\n\nVerify the customer before any change. Précisément.\n"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_customer_by_phone", "description": "Find a customer.",
        "parameters": {"type": "object", "properties": {"phone_number": {"type": "string"}},
                       "required": ["phone_number"]}}},
    {"type": "function", "function": {
        "name": "get_details_by_id", "description": "Details of an ID.",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}},
    {"type": "function", "function": {
        "name": "create_support_ticket", "description": "Open a ticket.",
        "parameters": {"type": "object", "properties": {
            "details": {"type": "object", "properties": {
                "steps_tried": {"type": "array", "items": {"type": "string"}},
                "device": {"type": "object", "properties": {"model": {"type": "string"}}}}},
            "priority": {"type": "string", "enum": ["low", "high"]}}, "required": ["details"]}}},
]


def assistant(content=None, *calls):
    tool_calls = [{"id": i, "name": n, "arguments": a, "requestor": "assistant"} for i, n, a in calls] or None
    return {"role": "assistant", "content": content, "tool_calls": tool_calls, "turn_idx": 0,
            "timestamp": "2025-06-03T14:02:11", "cost": 0.01, "usage": {"prompt_tokens": 9}, "raw_data": None}


def user(content="", *calls):
    tool_calls = [{"id": i, "name": n, "arguments": a, "requestor": "user"} for i, n, a in calls] or None
    return {"role": "user", "content": content, "tool_calls": tool_calls, "turn_idx": 1,
            "timestamp": "2025-06-03T14:02:12", "cost": 0.0, "usage": None, "raw_data": None}


def tool(call_id, content, requestor="assistant", error=False):
    return {"id": call_id, "role": "tool", "content": content, "requestor": requestor, "error": error,
            "turn_idx": 2, "timestamp": "2025-06-03T14:02:13"}


def conversation(tag: str) -> list[dict]:
    """Greeting, parallel agent calls (one failing), a user-side tool call, a nested-argument call,
    and a closing user turn after the last assistant message."""
    return [
        assistant("Hi! How can I help you today?"),
        user(f"No service on my phone ({tag}). Número 555-201-4410."),
        assistant(None, (f"{tag}_a1", "get_customer_by_phone", {"phone_number": "555-201-4410"})),
        tool(f"{tag}_a1", '{"customer_id": "C1", "line_ids": ["L1"]}'),
        assistant(None, (f"{tag}_a2", "get_details_by_id", {"id": "L1"}),
                  (f"{tag}_a3", "get_details_by_id", {"id": "L9"})),
        tool(f"{tag}_a2", '{"line_id": "L1", "status": "Active"}'),
        tool(f"{tag}_a3", "Error: Line L9 not found", error=True),
        assistant("Your line is active. What does your status bar show?"),
        user("", (f"{tag}_u1", "check_status_bar", {})),
        tool(f"{tag}_u1", "Status Bar: ✈️ Airplane Mode | 🔋 64%", requestor="user"),
        user("An airplane icon."),
        assistant(None, (f"{tag}_a4", "create_support_ticket",
                         {"details": {"steps_tried": ["status bar", "reboot"], "device": {"model": "Pixel 8"}},
                          "priority": "high"})),
        tool(f"{tag}_a4", '{"ticket_id": "TCK-1"}'),
        assistant("Ticket TCK-1 is open. Anything else?"),
        user("No, thanks! ###STOP###"),
    ]


def simulation(sim_id, task_id, reward=1.0, messages=None, trial=0):
    return {"id": sim_id, "task_id": task_id, "timestamp": "2025-06-03T14:05:00", "termination_reason": "user_stop",
            "agent_cost": 0.1, "user_cost": 0.05, "reward_info": {"reward": reward, "db_check": None},
            "messages": messages if messages is not None else conversation(sim_id), "trial": trial, "seed": 7,
            "mode": "half_duplex"}


def results(simulations, task_ids=("t1", "t2", "t3"), domain="telecom"):
    return {
        "timestamp": "2025-06-03T14:00:00",
        "info": {"git_commit": "abc", "num_trials": 1, "max_steps": 200, "max_errors": 10, "seed": 300,
                 "agent_info": {"implementation": "llm_agent", "llm": "gpt-4.1", "llm_args": {}},
                 "user_info": {"implementation": "user_simulator", "llm": "gpt-4.1", "llm_args": {}},
                 "environment_info": {"domain_name": domain, "policy": POLICY, "tool_defs": None},
                 "max_concurrency": 4},
        "tasks": [{"id": t, "description": {"purpose": "test"}, "user_scenario": {}, "initial_state": None,
                   "evaluation_criteria": None, "issues": None} for t in task_ids],
        "simulations": simulations,
    }


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    return path


def write_inputs(root: Path) -> dict:
    """Two results files: t1 ok + t2 failed in one, t3 ok (twice) in the other."""
    dump(root / "results" / "a_run.json", results([simulation("s1", "t1"), simulation("s2", "t2", reward=0.0)]))
    dump(root / "results" / "b_run.json", results([simulation("s3", "t3"), simulation("s4", "t1", trial=1)]))
    dump(root / "split_tasks.json", {"train": ["t1", "t2"], "test": ["t3"], "base": ["t1", "t2", "t3", "t4"]})
    dump(root / "tools.json", TOOLS)
    return {"results": [root / "results"], "split_tasks": root / "split_tasks.json", "tools": root / "tools.json"}


def run_make(root: Path, inputs: dict, out_name="tau2.json", **section) -> dict:
    params = params_file(root / "params.yaml", {"tau2_make": section})
    return tau2_make.main(["--params", str(params), "--results", *map(str, inputs["results"]),
                           "--split-tasks", str(inputs["split_tasks"]), "--tools", str(inputs["tools"]),
                           "--out", str(root / out_name), "--metrics", str(root / "metrics.json")])


def read_out(root: Path, name="tau2.json") -> dict:
    return json.loads((root / name).read_text())["splits"]


def test_agent_history_keeps_agent_turns_and_user_text_only(tmp_path):
    metrics = run_make(tmp_path, write_inputs(tmp_path))
    example = read_out(tmp_path)["train"][0]
    assert {k: v for k, v in example.items() if k not in ("messages", "tools")} == {
        "simulation_id": "s1", "task_id": "t1", "trial": 0, "reward": 1.0, "domain": "telecom",
        "source": (tmp_path / "results" / "a_run.json").as_posix()}
    assert example["tools"] == TOOLS
    system = project_params()["tau2_make"]["system_prompt_template"].replace("{policy}", POLICY.strip())
    assert example["messages"] == [
        {"role": "system", "content": system},
        {"role": "assistant", "content": "Hi! How can I help you today?", "tool_calls": None},
        {"role": "user", "content": "No service on my phone (s1). Número 555-201-4410."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "s1_a1", "name": "get_customer_by_phone", "arguments": {"phone_number": "555-201-4410"}}]},
        {"role": "tool", "id": "s1_a1", "content": '{"customer_id": "C1", "line_ids": ["L1"]}', "error": False},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "s1_a2", "name": "get_details_by_id", "arguments": {"id": "L1"}},
            {"id": "s1_a3", "name": "get_details_by_id", "arguments": {"id": "L9"}}]},
        {"role": "tool", "id": "s1_a2", "content": '{"line_id": "L1", "status": "Active"}', "error": False},
        {"role": "tool", "id": "s1_a3", "content": "Error: Line L9 not found", "error": True},
        {"role": "assistant", "content": "Your line is active. What does your status bar show?", "tool_calls": None},
        {"role": "user", "content": "An airplane icon."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "s1_a4", "name": "create_support_ticket",
             "arguments": {"details": {"steps_tried": ["status bar", "reboot"], "device": {"model": "Pixel 8"}},
                           "priority": "high"}}]},
        {"role": "tool", "id": "s1_a4", "content": '{"ticket_id": "TCK-1"}', "error": False},
        {"role": "assistant", "content": "Ticket TCK-1 is open. Anything else?", "tool_calls": None},
        {"role": "user", "content": "No, thanks! ###STOP###"},
    ]
    peak = metrics.pop("peak_rss_mb")
    assert peak > 0
    assert metrics == {
        "files": 2, "simulations_read": 4, "simulations_kept": 3, "dropped_failed": 1, "dropped_unsplit": 0,
        "train_examples": 2, "test_examples": 1, "assistant_turns": 18, "tool_calls": 12, "tool_call_ids_renamed": 0,
        "tool_errors": 3, "user_tool_calls_dropped": 3, "user_tool_results_dropped": 3, "user_turns_dropped": 3}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics | {"peak_rss_mb": peak}


def test_splits_follow_split_file_and_success_only(tmp_path):
    inputs = write_inputs(tmp_path)
    run_make(tmp_path, inputs)
    splits = read_out(tmp_path)
    train = [(e["simulation_id"], e["task_id"], e["trial"]) for e in splits["train"]]
    assert train == [("s1", "t1", 0), ("s4", "t1", 1)]
    assert [e["simulation_id"] for e in splits["test"]] == ["s3"]

    metrics = run_make(tmp_path, inputs, success_only=False)
    splits = read_out(tmp_path)
    assert [(e["simulation_id"], e["reward"]) for e in splits["train"]] == [("s1", 1.0), ("s2", 0.0), ("s4", 1.0)]
    assert metrics["dropped_failed"] == 0 and metrics["simulations_kept"] == 4


def test_user_side_tool_calls_and_results_never_survive(tmp_path):
    inputs = write_inputs(tmp_path)
    # A user turn that carries text and a tool call keeps its text only; a null-content tool turn goes.
    messages = conversation("s5")
    messages[8:11] = [user(None, ("s5_u1", "check_status_bar", {})),
                      tool("s5_u1", "Status Bar: ✈️", requestor="user"),
                      user("An airplane icon, I'll switch it off.", ("s5_u2", "toggle_airplane_mode", {})),
                      tool("s5_u2", "Airplane Mode is now OFF.", requestor="user")]
    dump(tmp_path / "results" / "c_run.json", results([simulation("s5", "t3", messages=messages)]))
    metrics = run_make(tmp_path, inputs)
    for split in read_out(tmp_path).values():
        for example in split:
            for message in example["messages"]:
                assert "_u" not in message.get("id", "")
                assert all("_u" not in call["id"] for call in message.get("tool_calls") or [])
                assert message["role"] != "user" or message["content"].strip()
    texts = [m["content"] for m in read_out(tmp_path)["test"][1]["messages"] if m["role"] == "user"]
    assert "An airplane icon, I'll switch it off." in texts
    assert metrics["user_tool_calls_dropped"] == 5 and metrics["user_tool_results_dropped"] == 5


def test_assistant_turns_match_the_source_simulation(tmp_path):
    run_make(tmp_path, write_inputs(tmp_path))
    source = {s["id"]: s for f in sorted((tmp_path / "results").glob("*.json"))
              for s in json.loads(f.read_text())["simulations"]}
    for split in read_out(tmp_path).values():
        for example in split:
            expected = [(m["content"], [(c["id"], c["name"], c["arguments"]) for c in m["tool_calls"] or []])
                        for m in source[example["simulation_id"]]["messages"] if m["role"] == "assistant"]
            got = [(m["content"], [(c["id"], c["name"], c["arguments"]) for c in m["tool_calls"] or []])
                   for m in example["messages"] if m["role"] == "assistant"]
            assert got == expected


def test_system_prompt_template_wraps_the_policy(tmp_path):
    run_make(tmp_path, write_inputs(tmp_path), system_prompt_template="Follow this policy:\n\n{policy}\n\nBe brief.")
    system = read_out(tmp_path)["test"][0]["messages"][0]
    assert system == {"role": "system", "content": f"Follow this policy:\n\n{POLICY.strip()}\n\nBe brief."}


def test_results_as_directory_or_files_give_identical_bytes(tmp_path):
    inputs = write_inputs(tmp_path)
    run_make(tmp_path, inputs, out_name="from_dir.json")
    files = sorted((tmp_path / "results").glob("*.json"))
    run_make(tmp_path, {**inputs, "results": files}, out_name="from_files.json")
    assert (tmp_path / "from_dir.json").read_bytes() == (tmp_path / "from_files.json").read_bytes()
    run_make(tmp_path, {**inputs, "results": files[1:]}, out_name="one_file.json")
    assert [e["simulation_id"] for e in read_out(tmp_path, "one_file.json")["train"]] == ["s4"]


def test_rerun_is_byte_identical(tmp_path):
    inputs = write_inputs(tmp_path)
    run_make(tmp_path, inputs, out_name="first.json")
    run_make(tmp_path, inputs, out_name="second.json")
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "second.json").read_bytes()


def test_skip_unsplit_drops_and_counts(tmp_path):
    inputs = write_inputs(tmp_path)
    dump(tmp_path / "results" / "c_run.json", results([simulation("s5", "t4")], task_ids=("t4",)))
    metrics = run_make(tmp_path, inputs, skip_unsplit=True)
    assert metrics["dropped_unsplit"] == 1 and metrics["simulations_kept"] == 3
    assert "s5" not in {e["simulation_id"] for split in read_out(tmp_path).values() for e in split}


def test_shipped_sample(tmp_path):
    inputs = {"results": [SAMPLE / "results"], "split_tasks": SAMPLE / "split_tasks.json",
              "tools": SAMPLE / "tools.json"}
    metrics = run_make(tmp_path, inputs)
    splits = read_out(tmp_path)
    split_file = json.loads((SAMPLE / "split_tasks.json").read_text())
    tools = json.loads((SAMPLE / "tools.json").read_text())
    source = {}
    for path in sorted((SAMPLE / "results").glob("*.json")):
        for sim in json.loads(path.read_text())["simulations"]:
            source[sim["id"]] = sim
    assert metrics["simulations_read"] == len(source) >= 30
    assert len({s["task_id"] for s in source.values()}) >= 10
    assert metrics["dropped_failed"] == sum(s["reward_info"]["reward"] != 1.0 for s in source.values()) > 0
    assert metrics["simulations_kept"] == len(splits["train"]) + len(splits["test"])
    assert metrics["train_examples"] > 0 and metrics["test_examples"] > 0
    assert metrics["user_tool_calls_dropped"] > 0 and metrics["tool_errors"] > 0
    for split, examples in splits.items():
        for example in examples:
            sim = source[example["simulation_id"]]
            assert example["task_id"] in split_file[split] and example["reward"] == 1.0
            assert example["tools"] == tools and "# Telecom Agent Policy" in example["messages"][0]["content"]
            assert [m for m in example["messages"] if m["role"] == "assistant"] == [
                {"role": "assistant", "content": m["content"],
                 "tool_calls": [{k: c[k] for k in ("id", "name", "arguments")} for c in m["tool_calls"]]
                 if m["tool_calls"] else None}
                for m in sim["messages"] if m["role"] == "assistant"]
            user_call_ids = {c["id"] for m in sim["messages"] if m["role"] == "user" for c in m["tool_calls"] or []}
            assert not user_call_ids & {m.get("id") for m in example["messages"]}
    assert sum(len(e["messages"]) for split in splits.values() for e in split) > 300


# --- results of providers that number tool calls per turn, in the current results format -------

P = "functions"  # the provider's id prefix: `<prefix>_<tool>_<number within the turn>`


def numbered_conversation() -> list[dict]:
    """The same `<prefix>_<tool>_0` ids in several agent turns, parallel calls answered out of order,
    and the user's own calls numbered the same way."""
    return [
        assistant("Hi! How can I help you today?"),
        user("My data is slow. Phone 555-201-4410."),
        assistant(None, (f"{P}_get_customer_by_phone_0", "get_customer_by_phone", {"phone_number": "555-201-4410"})),
        tool(f"{P}_get_customer_by_phone_0", '{"customer_id": "C1", "line_ids": ["L1", "L2"]}'),
        assistant(None, (f"{P}_get_details_by_id_0", "get_details_by_id", {"id": "L1"}),
                  (f"{P}_get_details_by_id_1", "get_details_by_id", {"id": "L2"})),
        tool(f"{P}_get_details_by_id_0", '{"line_id": "L1"}'),
        tool(f"{P}_get_details_by_id_1", '{"line_id": "L2"}'),
        assistant("Which line is slow? Please run a speed test."),
        user("", (f"{P}_run_speed_test_0", "run_speed_test", {})),
        tool(f"{P}_run_speed_test_0", "Speed: 0.4 Mbps", requestor="user"),
        user("0.4 Mbps on L2.", (f"{P}_run_speed_test_0", "run_speed_test", {})),
        tool(f"{P}_run_speed_test_0", "Speed: 0.4 Mbps", requestor="user"),
        assistant(None, (f"{P}_get_details_by_id_0", "get_details_by_id", {"id": "P7"})),
        tool(f"{P}_get_details_by_id_0", '{"plan_id": "P7"}'),
        assistant(None, (f"{P}_get_details_by_id_0", "get_details_by_id", {"id": "D1"}),
                  (f"{P}_get_details_by_id_1", "get_details_by_id", {"id": "D2"})),
        tool(f"{P}_get_details_by_id_1", '{"device_id": "D2"}'),
        tool(f"{P}_get_details_by_id_0", '{"device_id": "D1"}'),
        assistant(None, (f"{P}_create_support_ticket_0", "create_support_ticket", {"details": {}})),
        tool(f"{P}_create_support_ticket_0", '{"ticket_id": "TCK-2"}'),
        assistant("Ticket TCK-2 is open."),
        user("Thanks! ###STOP###"),
    ]


def colliding_conversation() -> list[dict]:
    """`call_0` twice, and the file's own `call_0_2` later on: the repeat must not take that id."""
    return [
        assistant("Hi!"),
        user("Check 555-000-0001 please."),
        assistant(None, ("call_0", "get_customer_by_phone", {"phone_number": "555-000-0001"})),
        tool("call_0", '{"customer_id": "C2"}'),
        assistant(None, ("call_0", "get_details_by_id", {"id": "C2"})),
        tool("call_0", '{"customer_id": "C2", "status": "ok"}', error=True),
        assistant(None, ("call_0_2", "create_support_ticket", {"details": {}})),
        tool("call_0_2", '{"ticket_id": "TCK-3"}'),
        assistant("Done."),
    ]


def current_simulation(sim_id, task_id, messages, reward=1.0):
    """A simulation with the keys newer tau2 versions add, on messages as well."""
    sim = simulation(sim_id, task_id, reward=reward, messages=messages)
    sim.update(start_time="2025-09-01T10:00:00", end_time="2025-09-01T10:03:00", duration=180.0,
               review=None, speech_environment=None, agent_state={"steps": 12}, policy_version="1.2")
    sim["reward_info"].update(reward_breakdown={"DB": reward}, nl_assertions=None)
    for message in messages:
        message.setdefault("is_audio", False)
        message.setdefault("generation_time_seconds", 0.8)
        if message["role"] != "tool":
            message.setdefault("context_truncation", None)
    return sim


def write_current_inputs(root: Path) -> dict:
    """One results file of the current format: r1 and r2 repeat ids, r3 has none, r4 failed."""
    data = results([current_simulation("r1", "t1", numbered_conversation()),
                    current_simulation("r2", "t3", colliding_conversation()),
                    simulation("r3", "t2"),
                    current_simulation("r4", "t2", numbered_conversation(), reward=0.0)])
    data.update(schema_version="0.3", run_id="run-2025-09-01", provider={"name": "other", "region": "eu"})
    data["info"].update(evaluation_type="all", text_streaming_config=None, agent_config={"temperature": 0.0})
    for task in data["tasks"]:
        task.update(ticket=None, required_documents=None, user_tools=["run_speed_test"])
    dump(root / "results" / "current.json", data)
    dump(root / "split_tasks.json", {"train": ["t1", "t2"], "test": ["t3"]})
    dump(root / "tools.json", TOOLS)
    return {"results": [root / "results"], "split_tasks": root / "split_tasks.json", "tools": root / "tools.json"}


def calls_and_results(messages: list[dict]) -> list[tuple]:
    return [(m["role"], [(c["id"], c["name"], c["arguments"]) for c in m["tool_calls"] or []])
            if m["role"] == "assistant" else (m["role"], m.get("id"), m["content"])
            for m in messages if m["role"] in ("assistant", "tool")]


def test_repeated_call_ids_across_turns_get_unique_ids(tmp_path):
    metrics = run_make(tmp_path, write_current_inputs(tmp_path))
    assert {k: metrics[k] for k in ("simulations_read", "simulations_kept", "dropped_failed", "train_examples",
                                    "test_examples", "tool_calls", "tool_call_ids_renamed", "tool_errors",
                                    "user_tool_calls_dropped", "user_tool_results_dropped")} == {
        "simulations_read": 4, "simulations_kept": 3, "dropped_failed": 1, "train_examples": 2,
        "test_examples": 1, "tool_calls": 14, "tool_call_ids_renamed": 4, "tool_errors": 2,
        "user_tool_calls_dropped": 3, "user_tool_results_dropped": 3}
    splits = read_out(tmp_path)
    examples = {e["simulation_id"]: e for split in splits.values() for e in split}
    assert [e["simulation_id"] for e in splits["train"]] == ["r1", "r3"]
    assert [e["simulation_id"] for e in splits["test"]] == ["r2"]
    details = f"{P}_get_details_by_id"
    assert calls_and_results(examples["r1"]["messages"]) == [
        ("assistant", []),
        ("assistant", [(f"{P}_get_customer_by_phone_0", "get_customer_by_phone", {"phone_number": "555-201-4410"})]),
        ("tool", f"{P}_get_customer_by_phone_0", '{"customer_id": "C1", "line_ids": ["L1", "L2"]}'),
        ("assistant", [(f"{details}_0", "get_details_by_id", {"id": "L1"}),
                       (f"{details}_1", "get_details_by_id", {"id": "L2"})]),
        ("tool", f"{details}_0", '{"line_id": "L1"}'),
        ("tool", f"{details}_1", '{"line_id": "L2"}'),
        ("assistant", []),
        ("assistant", [(f"{details}_0_2", "get_details_by_id", {"id": "P7"})]),
        ("tool", f"{details}_0_2", '{"plan_id": "P7"}'),
        ("assistant", [(f"{details}_0_3", "get_details_by_id", {"id": "D1"}),
                       (f"{details}_1_2", "get_details_by_id", {"id": "D2"})]),
        ("tool", f"{details}_1_2", '{"device_id": "D2"}'),
        ("tool", f"{details}_0_3", '{"device_id": "D1"}'),
        ("assistant", [(f"{P}_create_support_ticket_0", "create_support_ticket", {"details": {}})]),
        ("tool", f"{P}_create_support_ticket_0", '{"ticket_id": "TCK-2"}'),
        ("assistant", []),
    ]
    assert calls_and_results(examples["r2"]["messages"]) == [
        ("assistant", []),
        ("assistant", [("call_0", "get_customer_by_phone", {"phone_number": "555-000-0001"})]),
        ("tool", "call_0", '{"customer_id": "C2"}'),
        ("assistant", [("call_0_3", "get_details_by_id", {"id": "C2"})]),
        ("tool", "call_0_3", '{"customer_id": "C2", "status": "ok"}'),
        ("assistant", [("call_0_2", "create_support_ticket", {"details": {}})]),
        ("tool", "call_0_2", '{"ticket_id": "TCK-3"}'),
        ("assistant", []),
    ]
    assert [m["content"] for m in examples["r1"]["messages"] if m["role"] == "user"] == [
        "My data is slow. Phone 555-201-4410.", "0.4 Mbps on L2.", "Thanks! ###STOP###"]
    assert [m["error"] for m in examples["r2"]["messages"] if m["role"] == "tool"] == [False, True, False]


def test_repeated_call_ids_convert_like_ids_given_unique(tmp_path):
    """Renaming is all that differs from a file whose provider gave the written ids in the first place."""
    run_make(tmp_path / "numbered", write_current_inputs(tmp_path / "numbered"))
    inputs = write_current_inputs(tmp_path / "unique")
    path = tmp_path / "unique" / "results" / "current.json"
    messages = json.loads(path.read_text())["simulations"][0]["messages"]
    written = [m for m in read_out(tmp_path / "numbered")["train"][0]["messages"] if m["role"] != "system"]
    agent = [m for m in messages if m["role"] == "assistant" or m.get("requestor") == "assistant"]
    for source, converted in zip(agent, [m for m in written if m["role"] != "user"], strict=True):
        for call, renamed in zip(source.get("tool_calls") or [], converted.get("tool_calls") or [], strict=True):
            call["id"] = renamed["id"]
        if source["role"] == "tool":
            source["id"] = converted["id"]
    data = json.loads(path.read_text())
    data["simulations"][0]["messages"] = messages
    dump(path, data)
    metrics = run_make(tmp_path / "unique", inputs)
    assert metrics["tool_call_ids_renamed"] == 1  # r2's own call_0 repeat; r1 now has none
    unique = read_out(tmp_path / "unique")["train"][0]
    numbered = read_out(tmp_path / "numbered")["train"][0]
    assert {**unique, "source": None} == {**numbered, "source": None}


def test_repeated_call_ids_keep_tool_call_ids_unambiguous(tmp_path):
    run_make(tmp_path, write_current_inputs(tmp_path))
    params = params_file(tmp_path / "openai_params.yaml")
    tau2_to_openai.main(["--params", str(params), "--input", str(tmp_path / "tau2.json"),
                         "--out", str(tmp_path / "openai"), "--metrics", str(tmp_path / "openai_metrics.json")])
    records = [json.loads(line) for split in ("train", "test")
               for line in (tmp_path / "openai" / f"{split}.jsonl").read_text().splitlines()]
    assert len(records) == 3
    calls_written = 0
    for record in records:
        call_ids = [c["id"] for m in record["messages"] for c in m.get("tool_calls") or []]
        assert len(call_ids) == len(set(call_ids))
        calls_written += len(call_ids)
        open_calls = {}
        for message in record["messages"]:
            if message["role"] == "assistant":
                assert not open_calls
                open_calls = {c["id"]: c["function"]["arguments"] for c in message.get("tool_calls") or []}
            elif message["role"] == "tool":
                arguments = json.loads(open_calls.pop(message["tool_call_id"]))
                # Every details result here names the id its call asked for: the pairing is the call's own.
                assert "id" not in arguments or arguments["id"] in message["content"]
        assert not open_calls
    assert calls_written == 14


def test_results_without_repeats_convert_as_before(tmp_path, monkeypatch):
    """The shipped sample's conversion, byte for byte, as it was before repeated ids were accepted."""
    monkeypatch.chdir(REPO_ROOT)  # relative inputs keep the written `source` paths independent of the checkout
    sample = SAMPLE.relative_to(REPO_ROOT)
    inputs = {"results": [sample / "results"], "split_tasks": sample / "split_tasks.json",
              "tools": sample / "tools.json"}
    metrics = run_make(tmp_path, inputs, success_only=True, skip_unsplit=False,
                       system_prompt_template="Policy:\n\n{policy}")
    assert (metrics["simulations_kept"], metrics["tool_calls"], metrics["tool_call_ids_renamed"]) == (32, 96, 0)
    digest = hashlib.sha256((tmp_path / "tau2.json").read_bytes()).hexdigest()
    assert digest == "ebc2fbad3240de41b43b3f18182df149f1e52dbc2204eda5a31d3b897d6392d2"


def set_current_message(sim_index, index, message):
    def change(data):
        data["simulations"][sim_index]["messages"][index] = message
    return change


REPEATED_ID_ERRORS = [
    ("id twice in one assistant turn",
     set_current_message(0, 12, assistant(None, (f"{P}_get_details_by_id_0", "get_details_by_id", {"id": "P7"}),
                                          (f"{P}_get_details_by_id_0", "get_details_by_id", {"id": "P8"}))),
     "simulation 'r1' messages[12] tool_calls[1]: tool call id 'functions_get_details_by_id_0' "
     "repeats within one assistant turn (also tool_calls[0])"),
    ("result of an id already answered",
     set_current_message(1, 7, tool("call_0", '{"ticket_id": "TCK-3"}')),
     "simulation 'r2' messages[7]: tool result 'call_0' answers no open tool call of the agent"),
]


@pytest.mark.parametrize("case, change, message", REPEATED_ID_ERRORS, ids=[c[0] for c in REPEATED_ID_ERRORS])
def test_ambiguous_repeated_ids_stop_with_one_line(tmp_path, case, change, message):
    inputs = write_current_inputs(tmp_path)
    path = tmp_path / "results" / "current.json"
    data = json.loads(path.read_text())
    change(data)
    dump(path, data)
    with pytest.raises(StageError) as raised:
        run_make(tmp_path, inputs)
    assert str(raised.value) == f"{path}: {message}"
    assert not (tmp_path / "tau2.json").exists() and not (tmp_path / "metrics.json").exists()


# --- bad input: one line naming the file and record or the params key, and no output ---------

def mutate_results(name, change):
    def apply(root, inputs):
        path = root / "results" / name
        data = json.loads(path.read_text())
        change(data)
        dump(path, data)
    return apply


def write_text(relative, text):
    def apply(root, inputs):
        (root / relative).write_text(text)
    return apply


def drop_key(key):
    def change(data):
        del data["simulations"][1][key]
    return change


def set_message(index, message):
    def change(data):
        data["simulations"][0]["messages"][index] = message
    return change


def fail_everything(root, inputs):
    for name in ("a_run.json", "b_run.json"):
        mutate_results(name, lambda d: [s["reward_info"].update(reward=0.0) for s in d["simulations"]])(root, inputs)


BAD_INPUTS = [
    ("malformed results JSON",
     write_text("results/b_run.json", '{"timestamp": "x",\n  "info": {,\n}'),
     {}, r"^.*results/b_run\.json:2: malformed JSON: "),
    ("simulation missing messages",
     mutate_results("a_run.json", drop_key("messages")),
     {}, r"^.*a_run\.json: simulations\[1\]: simulation missing required key 'messages'$"),
    ("task id in no split",
     mutate_results("b_run.json", lambda d: (d["tasks"].append({"id": "t9"}),
                                             d["simulations"].append(simulation("s9", "t9")))),
     {}, r"^.*b_run\.json: simulation 's9': task id 't9' is in neither train nor test .*skip_unsplit"),
    ("task id not among the file's tasks",
     mutate_results("b_run.json", lambda d: d["simulations"].append(simulation("s9", "t7"))),
     {}, r"^.*b_run\.json: simulation 's9': task_id 't7' is not among the file's tasks$"),
    ("unknown tool name",
     mutate_results("a_run.json", set_message(2, assistant(None, ("s1_a1", "delete_everything", {})))),
     {}, r"^.*a_run\.json: simulation 's1' messages\[2\] tool_calls\[0\]: "
         r"unknown tool 'delete_everything' \(not in .*tools\.json\)$"),
    ("arguments as a string",
     mutate_results("a_run.json",
                    set_message(2, assistant(None, ("s1_a1", "get_customer_by_phone", '{"phone_number": "1"}')))),
     {}, r"^.*a_run\.json: simulation 's1' messages\[2\] tool_calls\[0\]: arguments must be a JSON object$"),
    ("tool result without a call",
     mutate_results("a_run.json", set_message(3, tool("zzz", "{}"))),
     {}, r"^.*a_run\.json: simulation 's1' messages\[3\]: tool result 'zzz' answers no open tool call of the agent$"),
    ("tool call left unanswered",
     mutate_results("a_run.json", lambda d: d["simulations"][0]["messages"].pop(3)),
     {}, r"^.*a_run\.json: simulation 's1' messages\[3\]: "
         r"tool call 's1_a1' \(get_customer_by_phone\) has no result before this assistant turn$"),
    ("unexpected role",
     mutate_results("a_run.json", set_message(0, {"role": "system", "content": "x"})),
     {}, r"^.*a_run\.json: simulation 's1' messages\[0\]: unexpected role 'system'"),
    ("reward missing",
     mutate_results("a_run.json", lambda d: d["simulations"][0].update(reward_info=None)),
     {}, r"^.*a_run\.json: simulation 's1': reward_info\.reward must be a number"),
    ("policy missing",
     mutate_results("a_run.json", lambda d: d["info"]["environment_info"].update(policy=None)),
     {}, r"^.*a_run\.json: info\.environment_info\.policy must be a non-empty string$"),
    ("two domains",
     mutate_results("b_run.json", lambda d: d["info"]["environment_info"].update(domain_name="airline")),
     {}, r"^.*b_run\.json: domain 'airline' differs from 'telecom' in .*a_run\.json"),
    ("split file malformed JSON",
     write_text("split_tasks.json", '{"train": ["t1"],\n "test": ["t3"\n'),
     {}, r"^.*split_tasks\.json:3: malformed JSON: "),
    ("split file test not a list",
     write_text("split_tasks.json", '{"train": ["t1", "t2"], "test": "t3"}'),
     {}, r"^.*split_tasks\.json: 'test' must be a list of task id strings$"),
    ("task in train and test",
     write_text("split_tasks.json", '{"train": ["t1", "t3"], "test": ["t3"]}'),
     {}, r"^.*split_tasks\.json: task id 't3' is in both train and test$"),
    ("tools entry missing function.name",
     write_text("tools.json", json.dumps([TOOLS[0], {"type": "function", "function": {"description": "x"}}])),
     {}, r"^.*tools\.json: tools\[1\]: missing function\.name$"),
    ("tools parameters not a JSON schema",
     write_text("tools.json", json.dumps([{"type": "function", "function": {
         "name": "lookup", "parameters": {"type": "object", "properties": {"id": {"type": "text"}}}}}])),
     {}, r"^.*tools\.json: tools\[0\] \(lookup\): function\.parameters is not a valid JSON schema: "),
    ("tools not a list",
     write_text("tools.json", json.dumps({"tools": TOOLS})),
     {}, r"^.*tools\.json: expected a non-empty JSON list of OpenAI function schemas$"),
    ("duplicate simulation id",
     mutate_results("b_run.json", lambda d: d["simulations"][0].update(id="s1")),
     {}, r"^.*b_run\.json: simulation 's1': duplicate simulation id \(also in .*a_run\.json\)$"),
    ("empty after filtering",
     fail_everything,
     {}, r"^no simulations left after filtering: read 4, dropped failed 4, unsplit 0$"),
    ("bad param type",
     lambda root, inputs: None,
     {"success_only": "yes"}, r"^tau2_make\.success_only: expected true or false, got a string 'yes'$"),
    ("param missing",
     lambda root, inputs: None,
     {"success_only!": None}, r"^tau2_make\.success_only: missing required key$"),
    ("unknown param",
     lambda root, inputs: None,
     {"skip_unsplitted": True}, r"^tau2_make\.skip_unsplitted: unknown key \(did you mean 'skip_unsplit'\?\)$"),
    ("template without placeholder",
     lambda root, inputs: None,
     {"system_prompt_template": "Be nice."},
     r"^tau2_make\.system_prompt_template: must contain \{policy\} exactly once$"),
]


@pytest.mark.parametrize("case, change, section, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, change, section, message):
    inputs = write_inputs(tmp_path)
    change(tmp_path, inputs)
    with pytest.raises(StageError, match=message) as raised:
        run_make(tmp_path, inputs, **section)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "tau2.json").exists() and not (tmp_path / "metrics.json").exists()


def test_results_inputs_that_name_nothing(tmp_path):
    inputs = write_inputs(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match=r"^.*empty: results directory has no \*\.json files$"):
        run_make(tmp_path, {**inputs, "results": [tmp_path / "empty"]})
    with pytest.raises(StageError, match=r"^.*nowhere\.json: results file or directory not found$"):
        run_make(tmp_path, {**inputs, "results": [tmp_path / "nowhere.json"]})
    with pytest.raises(StageError, match=r"^.*a_run\.json: results file given twice$"):
        run_make(tmp_path, {**inputs, "results": [tmp_path / "results", tmp_path / "results" / "a_run.json"]})
    assert not (tmp_path / "tau2.json").exists()
