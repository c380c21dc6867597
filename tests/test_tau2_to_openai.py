import json
from pathlib import Path

import pytest

from stages import tau2_to_openai
from stages.lib import StageError
from stages.lib.chat import CHATML_TEMPLATE, chat_dataset
from tests.conftest import params_file, project_params
from tests.test_tau2_make import POLICY, SAMPLE, TOOLS, dump, run_make, write_inputs


def run_openai(root: Path, source: Path, out_name="openai", **section) -> dict:
    params = params_file(root / "openai_params.yaml", {"tau2_to_openai": section})
    return tau2_to_openai.main(["--params", str(params), "--input", str(source), "--out", str(root / out_name),
                                "--metrics", str(root / "openai_metrics.json")])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def intermediate(tmp_path) -> Path:
    run_make(tmp_path, write_inputs(tmp_path))
    return tmp_path / "tau2.json"


def test_records_are_openai_chat_format(tmp_path, intermediate):
    metrics = run_openai(tmp_path, intermediate)
    train = read_lines(tmp_path / "openai" / "train.jsonl")
    assert [r["metadata"]["simulation_id"] for r in train] == ["s1", "s4"]
    record = train[0]
    assert list(record) == ["messages", "tools", "parallel_tool_calls", "metadata"]
    assert record["tools"] == TOOLS and record["parallel_tool_calls"] is True
    assert record["metadata"] == {"simulation_id": "s1", "task_id": "t1", "trial": 0, "reward": 1.0,
                                  "domain": "telecom", "source": (tmp_path / "results" / "a_run.json").as_posix()}
    system = project_params()["tau2_make"]["system_prompt_template"].replace("{policy}", POLICY.strip())

    def call(call_id, name, arguments):
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}

    assert record["messages"] == [
        {"role": "system", "content": system},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "No service on my phone (s1). Número 555-201-4410."},
        {"role": "assistant", "content": None,
         "tool_calls": [call("s1_a1", "get_customer_by_phone", '{"phone_number": "555-201-4410"}')]},
        {"role": "tool", "tool_call_id": "s1_a1", "content": '{"customer_id": "C1", "line_ids": ["L1"]}'},
        {"role": "assistant", "content": None,
         "tool_calls": [call("s1_a2", "get_details_by_id", '{"id": "L1"}'),
                        call("s1_a3", "get_details_by_id", '{"id": "L9"}')]},
        {"role": "tool", "tool_call_id": "s1_a2", "content": '{"line_id": "L1", "status": "Active"}'},
        {"role": "tool", "tool_call_id": "s1_a3", "content": "Error: Line L9 not found"},
        {"role": "assistant", "content": "Your line is active. What does your status bar show?"},
        {"role": "user", "content": "An airplane icon."},
        {"role": "assistant", "content": None, "tool_calls": [call(
            "s1_a4", "create_support_ticket",
            '{"details": {"steps_tried": ["status bar", "reboot"], "device": {"model": "Pixel 8"}}, '
            '"priority": "high"}')]},
        {"role": "tool", "tool_call_id": "s1_a4", "content": '{"ticket_id": "TCK-1"}'},
        {"role": "assistant", "content": "Ticket TCK-1 is open. Anything else?"},
    ]
    peak = metrics.pop("peak_rss_mb")
    assert peak > 0
    assert metrics == {"train_examples": 2, "test_examples": 1, "messages": 39, "assistant_turns": 18,
                       "tool_call_turns": 9, "parallel_tool_call_turns": 3, "tool_calls": 12, "tool_results": 12,
                       "messages_cut_after_last_assistant": 3}
    assert json.loads((tmp_path / "openai_metrics.json").read_text()) == metrics | {"peak_rss_mb": peak}


def check_invariants(records: list[dict], sources: dict) -> None:
    """Arguments decode once to the source objects, results follow their calls, an assistant turn ends."""
    for record in records:
        messages = record["messages"]
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        source = [m for m in sources[record["metadata"]["simulation_id"]]["messages"] if m["role"] == "assistant"]
        assistant = [m for m in messages if m["role"] == "assistant"]
        assert len(assistant) == len(source)
        for index, message in enumerate(messages):
            calls = message.get("tool_calls") or []
            if message["role"] == "tool":
                assert messages[index - 1]["role"] in ("assistant", "tool")
            if not calls:
                continue
            assert message["content"] is None or message["content"].strip()
            expected = next(s for s in source if s["tool_calls"] and s["tool_calls"][0]["id"] == calls[0]["id"])
            for call, original in zip(calls, expected["tool_calls"], strict=True):
                arguments = json.loads(call["function"]["arguments"])
                assert isinstance(arguments, dict) and arguments == original["arguments"]
                assert call["function"]["name"] == original["name"] and call["type"] == "function"
            results = messages[index + 1:index + 1 + len(calls)]
            if index + 1 < len(messages):
                assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
                assert all(set(r) == {"role", "tool_call_id", "content"} for r in results)


def test_arguments_encode_once_and_results_stay_paired(tmp_path, intermediate):
    run_openai(tmp_path, intermediate)
    sources = {s["id"]: s for path in sorted((tmp_path / "results").glob("*.json"))
               for s in json.loads(path.read_text())["simulations"]}
    for split in ("train", "test"):
        check_invariants(read_lines(tmp_path / "openai" / f"{split}.jsonl"), sources)


def test_ending_tool_call_turn_is_kept_and_later_messages_cut(tmp_path):
    example = {"simulation_id": "x", "task_id": "t1", "messages": [
        {"role": "system", "content": "policy"},
        {"role": "assistant", "content": "Hello", "tool_calls": None},
        {"role": "user", "content": "Transfer me."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "name": "transfer_to_human_agents", "arguments": {"summary": "wants a human"}}]},
        {"role": "tool", "id": "c1", "content": "Transfer successful", "error": False},
        {"role": "user", "content": "###TRANSFER###"},
    ], "tools": TOOLS}
    source = dump(tmp_path / "in.json", {"splits": {"train": [example], "test": []}})
    metrics = run_openai(tmp_path, source, parallel_tool_calls=False)
    [record] = read_lines(tmp_path / "openai" / "train.jsonl")
    assert record["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "transfer_to_human_agents", "arguments": '{"summary": "wants a human"}'}}]}
    assert record["parallel_tool_calls"] is False and record["metadata"] == {"simulation_id": "x", "task_id": "t1"}
    assert metrics["messages_cut_after_last_assistant"] == 2
    assert (tmp_path / "openai" / "test.jsonl").read_text() == ""


def test_rerun_is_byte_identical(tmp_path, intermediate):
    run_openai(tmp_path, intermediate, out_name="first")
    run_openai(tmp_path, intermediate, out_name="second")
    for split in ("train", "test"):
        assert (tmp_path / "first" / f"{split}.jsonl").read_bytes() == \
            (tmp_path / "second" / f"{split}.jsonl").read_bytes()


def test_shipped_sample_end_to_end(tmp_path):
    inputs = {"results": [SAMPLE / "results"], "split_tasks": SAMPLE / "split_tasks.json",
              "tools": SAMPLE / "tools.json"}
    made = run_make(tmp_path, inputs)
    metrics = run_openai(tmp_path, tmp_path / "tau2.json")
    sources = {s["id"]: s for path in sorted((SAMPLE / "results").glob("*.json"))
               for s in json.loads(path.read_text())["simulations"]}
    records = {split: read_lines(tmp_path / "openai" / f"{split}.jsonl") for split in ("train", "test")}
    assert len(records["train"]) == metrics["train_examples"] == made["train_examples"]
    assert len(records["test"]) == metrics["test_examples"] == made["test_examples"]
    assert metrics["assistant_turns"] == made["assistant_turns"] and metrics["tool_calls"] == made["tool_calls"]
    assert metrics["parallel_tool_call_turns"] > 0 and metrics["messages_cut_after_last_assistant"] > 0
    for split, split_records in records.items():
        check_invariants(split_records, sources)


def test_records_feed_the_chat_template_and_trl(tmp_path, intermediate, tiny_model_dir):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    run_openai(tmp_path, intermediate)
    records = read_lines(tmp_path / "openai" / "train.jsonl")
    dataset = chat_dataset(records)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    text = tokenizer.apply_chat_template(records[0]["messages"], tools=records[0]["tools"], tokenize=False)
    assert '{"name": "get_customer_by_phone", "arguments": {"phone_number": "555-201-4410"}}' in text
    assert '"arguments": "{' not in text

    args = SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, assistant_only_loss=True,
                     max_length=None, report_to="none")
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=dataset, processing_class=tokenizer)
    prepared = trainer.train_dataset
    assert len(prepared) == len(dataset)
    for row in prepared:
        trained = sum(label != -100 for label in row["labels"])
        assert 0 < trained < len(row["input_ids"])


# --- bad input ------------------------------------------------------------------------------

def replace_input(obj):
    def apply(source: Path):
        source.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return apply


def edit_example(change):
    def apply(source: Path):
        data = json.loads(source.read_text())
        change(data["splits"]["train"][0])
        source.write_text(json.dumps(data))
    return apply


BAD_INPUTS = [
    ("malformed JSON", replace_input('{"splits": {\n  "train": [}\n'), {},
     r"^.*tau2\.json:2: malformed JSON: "),
    ("no splits", replace_input({"train": []}), {},
     r"^.*tau2\.json: expected \{\"splits\": \{\"train\": \[\.\.\.\], \"test\": \[\.\.\.\]\}\}$"),
    ("test not a list", replace_input({"splits": {"train": [], "test": {}}}), {},
     r"^.*tau2\.json: splits\.test must be a list of examples$"),
    ("no examples", replace_input({"splits": {"train": [], "test": []}}), {},
     r"^.*tau2\.json: no examples in train or test$"),
    ("example without messages", edit_example(lambda e: e.pop("messages")), {},
     r"^.*tau2\.json: splits\.train\[0\]: example missing list 'messages'$"),
    ("no assistant message", edit_example(lambda e: e.update(messages=e["messages"][:1])), {},
     r"^.*tau2\.json: splits\.train\[0\]: example has no assistant message$"),
    ("unknown role", edit_example(lambda e: e["messages"].insert(1, {"role": "critic", "content": "x"})), {},
     r"^.*tau2\.json: splits\.train\[0\]\.messages\[1\]: unexpected role 'critic'$"),
    ("tool result without id", edit_example(lambda e: e["messages"][4].pop("id")), {},
     r"^.*tau2\.json: splits\.train\[0\]\.messages\[4\]: message missing required key 'id'$"),
    ("parallel calls refused", lambda source: None, {"parallel_tool_calls": False},
     r"^.*tau2\.json: splits\.train\[0\]\.messages\[5\]: assistant turn makes 2 tool calls but "
     r"tau2_to_openai\.parallel_tool_calls is false$"),
    ("param missing", lambda source: None, {"parallel_tool_calls!": None},
     r"^tau2_to_openai\.parallel_tool_calls: missing required key$"),
    ("bad param type", lambda source: None, {"parallel_tool_calls": "always"},
     r"^tau2_to_openai\.parallel_tool_calls: expected true or false, got a string 'always'$"),
]


@pytest.mark.parametrize("case, change, section, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, intermediate, case, change, section, message):
    change(intermediate)
    with pytest.raises(StageError, match=message) as raised:
        run_openai(tmp_path, intermediate, **section)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "openai").exists() and not (tmp_path / "openai_metrics.json").exists()
    assert not list(tmp_path.glob(".openai*"))
