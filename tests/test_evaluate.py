import json
import math

import pytest
import torch

from stages import evaluate, report
from stages.lib import StageError
from stages.lib.policy import load_policy
from stages.lib.reward import load_reward_fn
from stages.lib.schema import schema_errors
from tests.chats import TOOLS, chat, tool_chat, write_jsonl
from tests.conftest import REPO_ROOT, params_file
from tests.tiny import build_tokenizer, save_tiny_reward_model

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FAST = {"batch_size": 4, "bootstrap_resamples": 500,
        "persuasion": {"max_new_tokens": 6}, "agent": {"max_new_tokens": 8, "max_tool_prompts": 2},
        "persona": {"max_new_tokens": 8}, "perplexity": {"max_examples": 3}}
RL = {"eval_prompts": 2, "eval_generations": 2, "response_length": 6}
HEADERS = "<CONTRIBUTION>, <PUNISHMENT>"


def pool_row(i: int) -> dict:
    return {"prompt": [SYSTEM, {"role": "user", "content": f"Question number {i}: how are you today?"}],
            "response_1": "I changed my view because" if i % 2 else "Thanks. Thanks.",
            "response_2": "Please donate to Save the Children", "metadata": {"prompt_id": f"p{i}"}}


def persona_record(n: int) -> dict:
    user = f"Write N = {n} player types for this game.\n\nREQUIRED_HEADERS: {HEADERS}\nEvery type text must ..."
    return {"game_id": f"g{n}", "n_players": n, "messages": [
        {"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": user},
        {"role": "assistant", "content": "{}"}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-inputs")
    return {
        "pool": write_jsonl(root / "pool.jsonl", [pool_row(i) for i in range(6)]),
        "reward": save_tiny_reward_model(root / "reward", build_tokenizer()),
        "agent": write_jsonl(root / "agent.jsonl", [tool_chat(i) for i in range(3)]),
        "persona": write_jsonl(root / "persona.jsonl", [persona_record(2), persona_record(3)]),
        "heldout": write_jsonl(root / "heldout.jsonl", [chat(i) for i in range(4)]),
    }


def run(workdir, model, tasks, inputs, name="m", reference=None, **section):
    params = params_file(workdir / "params.yaml", {"evaluate": {**FAST, **section}, "rl": RL})
    argv = ["--params", str(params), "--model", str(model), "--name", name, "--tasks", tasks,
            "--pool", str(inputs["pool"]), "--reward-model", str(inputs["reward"]),
            "--agent-test", str(inputs["agent"]), "--persona", str(inputs["persona"]),
            "--starters", str(REPO_ROOT / "data" / "raw" / "starters" / "starters.jsonl"),
            "--reference", str(reference or model), "--heldout", str(inputs["heldout"]),
            "--out", str(workdir / "eval.json"), "--samples", str(workdir / "samples")]
    return evaluate.main(argv)


def samples_of(workdir, task):
    rows = [json.loads(line) for line in (workdir / "samples" / "samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == task]


def assistant_loss_by_hand(model_dir, records, template_choice="auto"):
    """Mean cross-entropy over assistant tokens, with labels as an SFT trainer would set them."""
    from stages.lib.chat import resolve_chat_template

    model, tokenizer = load_policy(model_dir)
    total, count = 0.0, 0
    for record in records:
        template = resolve_chat_template(tokenizer, template_choice, needs_assistant_mask=True,
                                         needs_tools=bool(record.get("tools")))
        encoded = tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"), chat_template=template,
                                                return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([encoded["input_ids"]])
        labels = torch.where(torch.tensor([encoded["assistant_masks"]]).bool(), ids, -100)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    return total / count


def test_persuasion_win_rate_is_judged_against_both_sft_samples(workdir, tiny_model_dir, inputs):
    metrics = run(workdir, tiny_model_dir, "persuasion,perplexity", inputs)
    block = metrics["persuasion"]
    replies = samples_of(workdir, "persuasion")
    assert [r["prompt_id"] for r in replies] == [f"p{i}" for i in range(6)] and block["prompts"] == 6
    reward_fn = load_reward_fn(inputs["reward"])
    own = reward_fn([r["reply"] for r in replies])
    rows = [pool_row(i) for i in range(6)]
    sft = [(a, b) for a, b in zip(reward_fn([r["response_1"] for r in rows]), reward_fn([r["response_2"] for r in rows]))]
    wins = [((o > a) + 0.5 * (o == a) + (o > b) + 0.5 * (o == b)) / 2 for o, (a, b) in zip(own, sft)]
    assert block["win_rate_vs_sft"] == pytest.approx(sum(wins) / 6, abs=1e-4)
    assert block["win_rate_low"] <= block["win_rate_vs_sft"] <= block["win_rate_high"]
    assert block["mean_reward"] == pytest.approx(sum(own) / 6, abs=1e-3)
    tsv = (workdir / "samples" / "persuasion_rewards.tsv").read_text().splitlines()
    assert tsv[0] == "prompt_id\treward\tsft_reward_1\tsft_reward_2" and len(tsv) == 7

    expected = math.exp(assistant_loss_by_hand(tiny_model_dir, [chat(i) for i in range(3)]))
    assert metrics["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert json.loads((workdir / "eval.json").read_text()) == metrics


def test_agent_loss_and_tool_call_validity(workdir, tiny_model_dir, inputs, monkeypatch):
    calls = iter(['<tool_call>\n{"name": "lookup", "arguments": {"id": "7"}}\n</tool_call>',
                  '<tool_call>\n{"name": "lookup", "arguments": {"id": 7}}\n</tool_call>'])
    rendered = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        rendered.extend(prompts)
        return [next(calls) for _ in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    metrics = run(workdir, tiny_model_dir, "agent", inputs, agent={"max_tool_prompts": 2, "max_examples": 2})
    block = metrics["agent"]
    # The tool list reaches the prompt, which stops right where the reference called the tool.
    assert len(rendered) == 2 and all('"name": "lookup"' in p and p.endswith("<|im_start|>assistant\n")
                                      for p in rendered)
    assert block["tool_prompts"] == 2 and block["tool_call_rate"] == 1.0 and block["tool_call_known_tool"] == 1.0
    assert block["tool_call_validity"] == 0.5  # the second call's id is an integer, the schema says string
    assert samples_of(workdir, "agent")[1]["errors"] == ["lookup: $.id: 7 is not of type 'string'"]
    expected = assistant_loss_by_hand(tiny_model_dir, [tool_chat(0), tool_chat(1)])
    assert block["assistant_token_loss"] == pytest.approx(expected, rel=1e-3)


def test_persona_validity_counts_types_and_headers(workdir, tiny_model_dir, inputs, monkeypatch):
    good = json.dumps({"types": [{"id": f"type_{i}", "text": "<CONTRIBUTION> gives\n<PUNISHMENT> never"}
                                 for i in range(2)]})
    monkeypatch.setattr(evaluate, "generate", lambda model, tokenizer, prompts, *a, **k: [good, "```json\n" + good])
    block = run(workdir, tiny_model_dir, "persona", inputs)["persona"]
    # Both parse (fences stripped); the second game has N = 3 but got 2 types.
    assert block == {"valid": 0.5, "valid_json": 1.0, "right_count": 0.5, "all_headers": 1.0, "examples": 2}


def test_style_reward_and_kl_to_the_reference(workdir, tiny_model_dir, inputs, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    same = run(workdir, tiny_model_dir, "style", inputs)["style"]
    assert same["kl_to_reference"] == 0.0 and same["replies"] == 4
    # A policy far from the reference: the same weights with 30x sharper next-token distributions.
    sharp = tmp_path_factory.mktemp("sharp") / "model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(str(sharp))
    build_tokenizer().save_pretrained(str(sharp))
    tuned = run(workdir, sharp, "style", inputs, reference=tiny_model_dir)["style"]
    assert tuned["kl_to_reference"] > 5.0
    replies = samples_of(workdir, "style")
    flat = [x for r in replies for x in r["rewards"]]
    assert tuned["mean_reward"] == pytest.approx(sum(flat) / len(flat), abs=1e-3)
    assert load_reward_fn(inputs["reward"])(replies[0]["replies"]) == pytest.approx(replies[0]["rewards"], abs=1e-3)


@pytest.mark.parametrize("value, schema, errors", [
    ({"a": "x"}, {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, []),
    ({}, {"type": "object", "required": ["a"]}, ["$: 'a' is a required property"]),
    ({"a": 3}, {"type": "object", "properties": {"a": {"enum": [1, 2]}}}, ["$.a: 3 is not one of [1, 2]"]),
    ({"n": 0.5}, {"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.5}}},
     []),
    # Decimal arguments: 19.99 is a multiple of 0.01 although 19.99 / 0.01 is not exactly an integer in binary.
    ({"p": 19.99}, {"properties": {"p": {"type": "number", "multipleOf": 0.01}}}, []),
    ({"p": 19.995}, {"properties": {"p": {"type": "number", "multipleOf": 0.01}}},
     ["$.p: 19.995 is not a multiple of 0.01"]),
    ({"n": 0}, {"properties": {"n": {"type": "number", "exclusiveMinimum": 0}}},
     ["$.n: 0 is less than or equal to the minimum of 0"]),
    ({"s": ["a"]}, {"properties": {"s": {"type": "array", "minItems": 2, "items": {"type": "integer"}}}},
     ["$.s: ['a'] is too short", "$.s[0]: 'a' is not of type 'integer'"]),
    ({"d": "2024-1-01"}, {"properties": {"d": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"}}},
     ["$.d: '2024-1-01' does not match '^\\\\d{4}-\\\\d{2}-\\\\d{2}$'"]),
    ({"x": True}, {"properties": {"x": {"type": "integer"}}}, ["$.x: True is not of type 'integer'"]),
    ({"x": 1}, {"type": "object", "additionalProperties": False},
     ["$: Additional properties are not allowed ('x' was unexpected)"]),
])
def test_schema_errors(value, schema, errors):
    assert schema_errors(value, schema) == errors


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>\n{"name": "lookup", "arguments": "{\\"id\\": \\"1\\"}"}\n</tool_call>', (True, True, True, True)),
    ('<tool_call>\n{"name": "refund", "arguments": {}}\n</tool_call>', (True, True, False, False)),
    ('<tool_call>\n{"name": "lookup", "arguments": {"id": "1"}', (True, False, False, False)),
    ("Your order has shipped.", (False, False, False, False)),
])
def test_check_tool_calls(text, expected):
    check = evaluate.check_tool_calls(text, TOOLS)
    assert (check["called"], check["parsed"], check["known_tool"], check["valid"]) == expected


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0] * 7 + [0.0] * 3
    low, high = evaluate.bootstrap_interval(values, 2000, 0)
    assert 0.3 < low < 0.7 < high <= 1.0 and (low, high) == evaluate.bootstrap_interval(values, 2000, 0)
    assert evaluate.bootstrap_interval([1.0] * 5, 100, 0) == (1.0, 1.0)


@pytest.mark.parametrize("change, message", [
    ({"tasks": "persuasion,fluency"}, r"^--tasks: unknown task 'fluency' \(have: persuasion, agent, persona, style, "
                                      r"perplexity\)$"),
    ({"model": "nowhere"}, r"^--model: model directory 'nowhere' does not exist$"),
    ({"pool": "missing.jsonl"}, r"^missing\.jsonl: --pool not found$"),
    ({"section": {"agent": {"max_tool_prompts": 0}}}, r"^evaluate\.agent\.max_tool_prompts: must be at least 1"),
])
def test_bad_input_is_one_line(workdir, tiny_model_dir, inputs, change, message):
    args = {**inputs, "pool": change.get("pool", inputs["pool"])}
    with pytest.raises(StageError, match=message):
        run(workdir, change.get("model", tiny_model_dir), change.get("tasks", "persuasion"), args,
            **change.get("section", {}))
    assert not (workdir / "eval.json").exists() and not (workdir / "samples").exists()


def test_persona_record_without_headers_names_the_line(workdir, tiny_model_dir, inputs):
    bad = dict(inputs, persona=write_jsonl(workdir / "persona.jsonl", [
        persona_record(2), {**persona_record(3), "messages": [{"role": "user", "content": "Write 3 types."}]}]))
    with pytest.raises(StageError, match=r"persona\.jsonl:2: the user turn has no REQUIRED_HEADERS line$"):
        run(workdir, tiny_model_dir, "persona", bad)


def test_report_tables_every_model_and_plots_win_rates(tmp_path):
    evals = []
    for name, rate in (("sft_persuasion", 0.5), ("dpo_rlaif", 0.75)):
        evals.append(tmp_path / f"{name}.json")
        evals[-1].write_text(json.dumps({"model": name, "path": f"models/{name}", "persuasion": {
            "win_rate_vs_sft": rate, "win_rate_low": rate - 0.2, "win_rate_high": rate + 0.1, "mean_reward": rate * 2,
            "sft_mean_reward": 1.0, "prompts": 12}, "perplexity": {"perplexity": 10.0 + rate}}))
        (tmp_path / "samples" / name).mkdir(parents=True)
        (tmp_path / "samples" / name / "persuasion_rewards.tsv").write_text(
            "prompt_id\treward\tsft_reward_1\tsft_reward_2\np1\t1.5\t0.1\t0.2\np2\t-0.5\t0.3\t0.4\n")
    result = report.main(["--evals", *map(str, evals), "--samples", str(tmp_path / "samples"),
                          "--out", str(tmp_path / "reports")])
    assert result == {"models": 2, "plots": ["win_rate.png", "rewards.png"]}
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "| dpo_rlaif | 0.75 | 0.55 | 0.85 | 1.5 | 1 | 12 |" in summary
    assert "| sft_persuasion | 10.5 |" in summary and "![win_rate.png](win_rate.png)" in summary
    assert (tmp_path / "reports" / "win_rate.tsv").read_text().splitlines()[2] == "dpo_rlaif\t0.75\t0.55\t0.85"
    assert (tmp_path / "reports" / "win_rate.png").read_bytes()[:4] == b"\x89PNG"
