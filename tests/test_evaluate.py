import json
import math

import pytest
import torch

from stages import evaluate
from stages.lib import StageError
from stages.lib.policy import load_policy
from stages.lib.schema import schema_errors
from tests.chats import TOOLS, chat, tool_chat, write_jsonl
from tests.conftest import REPO_ROOT, params_file
from tests.tiny import build_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FAST = {"batch_size": 4,
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
        "agent": write_jsonl(root / "agent.jsonl", [tool_chat(i) for i in range(3)]),
        "persona": write_jsonl(root / "persona.jsonl", [persona_record(2), persona_record(3)]),
        "heldout": write_jsonl(root / "heldout.jsonl", [chat(i) for i in range(4)]),
    }


def run(workdir, model, tasks, inputs, name="m", reference=None, extra=(), **section):
    params = params_file(workdir / "params.yaml", {"evaluate": {**FAST, **section}, "rl": RL})
    argv = ["--params", str(params), "--model", str(model), "--name", name, "--tasks", tasks,
            "--pool", str(inputs["pool"]),
            "--agent-test", str(inputs["agent"]), "--persona", str(inputs["persona"]),
            "--starters", str(REPO_ROOT / "data" / "raw" / "starters" / "starters.jsonl"),
            "--reference", str(reference or model), "--heldout", str(inputs["heldout"]),
            "--out", str(workdir / "eval.json"), "--samples", str(workdir / "samples"), *extra]
    return evaluate.main(argv)


def samples_of(workdir, task):
    rows = [json.loads(line) for line in (workdir / "samples" / f"{task}.jsonl").read_text().splitlines()]
    assert all(r["task"] == task for r in rows)
    return rows


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


def test_persuasion_replies_are_sampled_for_the_judges(workdir, tiny_model_dir, inputs):
    metrics = run(workdir, tiny_model_dir, "persuasion,perplexity", inputs)
    block = metrics["persuasion"]
    replies = samples_of(workdir, "persuasion")
    assert [r["prompt_id"] for r in replies] == [f"p{i}" for i in range(6)] and block["prompts"] == 6
    assert block["mean_words"] == pytest.approx(sum(len(r["reply"].split()) for r in replies) / 6, abs=0.05)
    again = run(workdir, tiny_model_dir, "persuasion", inputs)  # seeded: the same replies again
    assert samples_of(workdir, "persuasion") == replies and again["persuasion"] == block

    expected = math.exp(assistant_loss_by_hand(tiny_model_dir, [chat(i) for i in range(3)]))
    assert metrics["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert json.loads((workdir / "eval.json").read_text()) == again


def test_agent_loss_and_tool_call_validity(workdir, tiny_model_dir, inputs, monkeypatch):
    calls = iter(['<tool_call>\n{"name": "lookup", "arguments": {"id": "0"}}\n</tool_call>',  # the reference call
                  '<tool_call>\n{"name": "lookup", "arguments": {"id": 7}}\n</tool_call>',
                  '<tool_call>\n{"name": "lookup", "arguments": {"id": "9"}}\n</tool_call>'])  # valid, other order
    rendered = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        rendered.extend(prompts)
        return [next(calls) for _ in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    metrics = run(workdir, tiny_model_dir, "agent", inputs, agent={"max_tool_prompts": 3, "max_examples": 2})
    block = metrics["agent"]
    # The tool list reaches the prompt, which stops right where the reference called the tool.
    assert len(rendered) == 3 and all('"name": "lookup"' in p and p.endswith("<|im_start|>assistant\n")
                                      for p in rendered)
    assert block["tool_prompts"] == 3 and block["tool_call_rate"] == 1.0 and block["tool_call_known_tool"] == 1.0
    # The second call's id is an integer, the schema says string; the third is valid but asks for order 9, not 2.
    assert block["tool_call_validity"] == block["tool_call_expected_tools"] == round(2 / 3, 4)
    assert block["tool_call_exact"] == round(1 / 3, 4)
    samples = samples_of(workdir, "agent")
    assert samples[1]["errors"] == ["lookup: $.id: 7 is not of type 'string'"]
    assert [s["exact"] for s in samples] == [True, False, False] and samples[2]["calls"] == [
        {"name": "lookup", "arguments": {"id": "9"}}]
    expected = assistant_loss_by_hand(tiny_model_dir, [tool_chat(0), tool_chat(1)])
    assert block["assistant_token_loss"] == pytest.approx(expected, rel=1e-3)


def test_persona_validity_counts_types_and_headers(workdir, tiny_model_dir, inputs, monkeypatch):
    good = json.dumps({"types": [{"id": f"type_{i}", "text": "<CONTRIBUTION> gives\n<PUNISHMENT> never"}
                                 for i in range(2)]})

    penalties = []

    def fake_generate(model, tokenizer, prompts, *args, ended, repeating, repetition_penalty, **kwargs):
        ended[:], repeating[:] = [True, False], [False, True]
        penalties.append(repetition_penalty)
        return [good, "```json\n" + good]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    block = run(workdir, tiny_model_dir, "persona", inputs,
                persona={"max_new_tokens": 8, "repetition_penalty": 1.25})["persona"]
    # Both parse (fences stripped); the second game has N = 3 but got 2 types.
    assert block == {"valid": 0.5, "valid_json": 1.0, "right_count": 0.5, "all_headers": 1.0, "examples": 2,
                     "max_new_tokens": 8, "repetition_penalty": 1.25, "finished": 0.5, "repeating": 0.5}
    assert penalties == [1.25]
    assert [(row["finished"], row["repeating"]) for row in samples_of(workdir, "persona")] == [(True, False),
                                                                                             (False, True)]


def test_repeat_stop_cuts_a_loop_but_not_a_varied_or_ended_row():
    from stages.lib.generation import RepeatStop

    stop = RepeatStop(eos_token_ids=[2], window=12, max_period=4)
    prompt = [7, 8, 9, 10, 11]
    rows = [prompt + [5, 6, 7] * 6,  # a 3-token loop
            prompt + list(range(20, 38)),  # no repetition
            prompt + [3, 4] * 3 + [2] * 12]  # ended: EOS padding repeats, but the row is done
    for step in range(1, 19):
        flags = stop(torch.tensor([row[:len(prompt) + step] for row in rows]), None)
        # The loop is cut once 12 generated tokens show it (4 copies of the 3-token block), not before.
        assert flags.tolist() == [step >= 12, False, False]
    assert stop.stopped.tolist() == [True, False, False]
    stop.reset()
    assert stop.stopped is None


def test_greedy_loops_are_cut_where_they_start_repeating(workdir, tiny_model_dir):
    from stages.lib.generation import RepeatStop

    model, tokenizer = load_policy(tiny_model_dir)
    params = evaluate.parse_section(evaluate.load_params(params_file(workdir / "params.yaml", {"evaluate": FAST})),
                                    "evaluate", evaluate.EvaluateParams)
    prompts = [evaluate.render(tokenizer, [{"role": "user", "content": f"Say something, {i}"}]) for i in range(3)]
    ended, repeating = [], []
    cut = evaluate.generate(model, tokenizer, prompts, 600, params, ended=ended, repeating=repeating)
    stop = RepeatStop([tokenizer.eos_token_id])
    with torch.no_grad():
        for prompt, reply, looped, done in zip(prompts, cut, repeating, ended):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            full = model.generate(**ids, do_sample=False, max_new_tokens=600, pad_token_id=tokenizer.pad_token_id)
            new = full[0, ids["input_ids"].shape[1]:]
            whole = tokenizer.decode(new, skip_special_tokens=True).strip()
            # The cut reply is the start of the uncut one; a cut one went on to the budget without ending.
            assert whole.startswith(reply) and not (looped and done)
            if looped:
                assert len(new) == 600 and len(whole) > len(reply)
                assert tokenizer.eos_token_id not in new.tolist()
    assert any(repeating), "the tiny model loops under greedy decoding: this test needs a loop to cut"


def test_repetition_penalty_is_generates_own(workdir, tiny_model_dir):
    """The persona penalty reaches generate as it is: the replies are plain generate's with the same penalty."""
    model, tokenizer = load_policy(tiny_model_dir)
    params = evaluate.parse_section(evaluate.load_params(params_file(workdir / "params.yaml", {"evaluate": FAST})),
                                    "evaluate", evaluate.EvaluateParams)
    prompts = [evaluate.render(tokenizer, [{"role": "user", "content": f"Say something, {i}"}]) for i in range(3)]
    plain = evaluate.generate(model, tokenizer, prompts, 40, params)
    penalised = evaluate.generate(model, tokenizer, prompts, 40, params, repetition_penalty=1.5)
    assert penalised != plain
    with torch.no_grad():
        for prompt, reply in zip(prompts, penalised):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            full = model.generate(**ids, do_sample=False, max_new_tokens=40, repetition_penalty=1.5,
                                  pad_token_id=tokenizer.pad_token_id)
            assert reply == tokenizer.decode(full[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_persona_budget_comes_from_the_token_analysis(workdir, tiny_model_dir, inputs):
    auto = {"persona": {"max_new_tokens": None}}
    with pytest.raises(StageError, match=r"^evaluate\.persona\.max_new_tokens: null needs --persona-lengths"):
        run(workdir, tiny_model_dir, "persona", inputs, **auto)
    lengths = workdir / "persona_lengths.json"
    lengths.write_text(json.dumps({"assistant_p50": 3, "assistant_p100": 4}))
    block = run(workdir, tiny_model_dir, "persona", inputs, extra=["--persona-lengths", str(lengths)], **auto)["persona"]
    # The longest answer (4 tokens) and room for the end of the turn.
    assert block["max_new_tokens"] == 20 and block["examples"] == 2
    rows = samples_of(workdir, "persona")
    assert block["finished"] == sum(row["finished"] for row in rows) / 2


def test_style_replies_and_kl_to_the_reference(workdir, tiny_model_dir, inputs, tmp_path_factory):
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
    assert len(replies) == 2 and all(len(r["replies"]) == 2 and r["prompt"] for r in replies)


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


@pytest.mark.parametrize("change, message", [
    ({"tasks": "persuasion,fluency"}, r"^--tasks: unknown task 'fluency' \(have: persuasion, agent, persona, style, "
                                      r"perplexity\)$"),
    ({"model": "nowhere"}, r"^--model: model directory 'nowhere' does not exist$"),
    ({"pool": "missing.jsonl"}, r"^missing\.jsonl: --pool not found$"),
    ({"section": {"agent": {"max_tool_prompts": 0}}}, r"^evaluate\.agent\.max_tool_prompts: must be at least 1"),
    ({"section": {"persona": {"max_new_tokens": 8, "repetition_penalty": 0}}},
     r"^evaluate\.persona\.repetition_penalty: must be > 0 \(1 leaves the logits alone\), got 0\.0$"),
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
