import json

import pytest

from stages import label_ai
from stages.lib import StageError
from stages.lib.judges import conversation_text
from stages.lib.reward import load_reward_fn
from tests.chats import write_jsonl
from tests.conftest import params_file
from tests.tiny import build_tokenizer, save_tiny_reward_model

SYSTEM = {"role": "system", "content": "Change their mind."}


def pool_row(i: int, first: str, second: str) -> dict:
    return {"prompt": [SYSTEM, {"role": "user", "content": f"OP: claim number {i}. " + "reasons " * (i % 4 + 1)}],
            "response_1": first, "response_2": second,
            "metadata": {"prompt_id": f"cmv:t{i}", "pool": "ai", "conversation_id": f"c{i}"}}


ROWS = [pool_row(i, f"I changed my view because {i}", "Thanks. " * (i % 3 + 1)) for i in range(6)]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("reward") / "reward", build_tokenizer())


def judges(reward_dir, judge_model) -> dict:
    return {"rm": {"kind": "reward_model", "model": str(reward_dir), "criterion": "the tiny reward model"},
            "llm": {"kind": "pairwise_llm", "model": str(judge_model), "criterion": "Which reply is better?",
                    "max_context_tokens": 64, "swap": True}}


def run(tmp_path, reward_dir, judge_model, rows=ROWS, pools=None, judge_overrides=None, **section):
    tmp_path.mkdir(parents=True, exist_ok=True)
    table = judges(reward_dir, judge_model)
    for name, values in (judge_overrides or {}).items():
        table[name] = {**table[name], **values}
    params = params_file(tmp_path / "params.yaml", {"judges": table, "label_ai": {"judge": "rm", **section}})
    pools = pools or [write_jsonl(tmp_path / "pools" / "ai.jsonl", rows)]
    return label_ai.main(["--params", str(params), "--pools", *map(str, pools), "--out", str(tmp_path / "out"),
                          "--metrics", str(tmp_path / "metrics.json")])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reward_model_judge_prefers_the_higher_score(tmp_path, reward_dir, tiny_model_dir):
    metrics = run(tmp_path, reward_dir, tiny_model_dir, tie_margin=0.0)
    pairs = read(tmp_path / "out" / "ai.jsonl")
    scores = load_reward_fn(reward_dir)([t for row in ROWS for t in (row["response_1"], row["response_2"])])
    assert [p["metadata"]["prompt_id"] for p in pairs] == [r["metadata"]["prompt_id"] for r in ROWS]
    for i, (row, pair) in enumerate(zip(ROWS, pairs)):
        first, second = scores[2 * i], scores[2 * i + 1]
        meta = pair["metadata"]
        assert meta["scores"] == pytest.approx([first, second], abs=1e-5)
        assert meta["grader"] == "reward_model:rm" and meta["is_equal"] is False
        winner, loser = (row["response_1"], row["response_2"]) if first > second else (row["response_2"], row["response_1"])
        assert (pair["chosen"], pair["rejected"]) == (winner, loser)
        assert meta["preference"] == ("1" if first > second else "2")
        assert pair["prompt"] == row["prompt"] and meta["conversation_id"] == row["metadata"]["conversation_id"]
    assert metrics["ai"]["pairs"] == 6 and metrics["ai"]["preferred_1"] + metrics["ai"]["preferred_2"] == 6
    assert metrics["judge"]["name"] == "rm" and metrics["judge"]["kind"] == "reward_model"
    assert metrics["judge"]["model"] == str(reward_dir) and len(metrics["judge"]["hash"]) == 32


def test_scores_within_the_tie_margin_are_ties(tmp_path, reward_dir, tiny_model_dir):
    metrics = run(tmp_path, reward_dir, tiny_model_dir, tie_margin=1e6)
    pairs = read(tmp_path / "out" / "ai.jsonl")
    assert all(p["metadata"]["is_equal"] and p["metadata"]["preference"] == "1" for p in pairs)
    assert [p["chosen"] for p in pairs] == [r["response_1"] for r in ROWS]
    assert metrics["ai"]["ties"] == 6


def test_each_pool_file_gets_its_own_output(tmp_path, reward_dir, tiny_model_dir):
    pools = [write_jsonl(tmp_path / "pools" / "ai.jsonl", ROWS[:4]), write_jsonl(tmp_path / "pools" / "eval.jsonl", ROWS[4:])]
    metrics = run(tmp_path, reward_dir, tiny_model_dir, pools=pools)
    assert [len(read(tmp_path / "out" / f"{name}.jsonl")) for name in ("ai", "eval")] == [4, 2]
    assert (metrics["ai"]["pairs"], metrics["eval"]["pairs"]) == (4, 2)


def test_llm_judge_is_position_symmetric_with_swap(tmp_path, reward_dir, tiny_model_dir):
    swapped = [{**row, "response_1": row["response_2"], "response_2": row["response_1"]} for row in ROWS]
    run(tmp_path / "a", reward_dir, tiny_model_dir, judge="llm", batch_size=4)
    metrics = run(tmp_path / "b", reward_dir, tiny_model_dir, rows=swapped, judge="llm", batch_size=4)
    original, mirrored = read(tmp_path / "a" / "out" / "ai.jsonl"), read(tmp_path / "b" / "out" / "ai.jsonl")
    for a, b in zip(original, mirrored):
        first, second = a["metadata"]["scores"]
        assert 0 < first < 1 and first + second == pytest.approx(1)
        # Judged in both orders and averaged, the verdict follows the text, not its position.
        assert b["metadata"]["scores"] == pytest.approx([second, first], abs=1e-5)
        assert a["metadata"]["grader"] == "pairwise_llm:llm" and isinstance(a["metadata"]["orders_agree"], bool)
    assert 0 <= metrics["ai"]["orders_agree"] <= 1 and metrics["judge"]["criterion"] == "Which reply is better?"


def test_llm_judge_batches_do_not_change_verdicts(tmp_path, reward_dir, tiny_model_dir):
    one_order = {"llm": {"swap": False}}
    run(tmp_path / "one", reward_dir, tiny_model_dir, judge="llm", batch_size=1, judge_overrides=one_order)
    run(tmp_path / "many", reward_dir, tiny_model_dir, judge="llm", batch_size=6, judge_overrides=one_order)
    single, batched = read(tmp_path / "one" / "out" / "ai.jsonl"), read(tmp_path / "many" / "out" / "ai.jsonl")
    for a, b in zip(single, batched):
        assert a["metadata"]["scores"] == pytest.approx(b["metadata"]["scores"], abs=2e-3)  # bf16 where the CPU has it


def test_long_conversations_are_cut_from_the_start():
    tokenizer = build_tokenizer()
    messages = [SYSTEM, {"role": "user", "content": "first words " + "filler " * 200 + "last words"}]
    text = conversation_text(messages, tokenizer, 40)
    assert text.startswith("[...] ") and text.endswith("last words") and "first words" not in text
    assert len(tokenizer(text[6:], add_special_tokens=False)["input_ids"]) <= 41
    assert conversation_text(messages[:1], tokenizer, 40) == ""


@pytest.mark.parametrize("line, message", [
    ('{"prompt": [], "response_1": "a", "response_2": "b", "metadata": {"prompt_id": "x"}}',
     r"ai\.jsonl:2: 'prompt' must be a non-empty list of chat messages$"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "response_1": "a", "metadata": {"prompt_id": "x"}}',
     r"ai\.jsonl:2: .*response_2"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "response_1": "a", "response_2": 3, "metadata": {"prompt_id": "x"}}',
     r"ai\.jsonl:2: 'response_2' must be a string$"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "response_1": "a", "response_2": "b", "metadata": {}}',
     r"ai\.jsonl:2: record has no metadata\.prompt_id$"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "response_1": "a", "response_2": "b", "metadata": {"prompt_id": '
     '"cmv:t0"}}', r"ai\.jsonl:2: duplicate prompt_id 'cmv:t0' \(first at line 1\)$"),
])
def test_bad_pool_lines_are_one_line(tmp_path, reward_dir, tiny_model_dir, line, message):
    pool = tmp_path / "pools" / "ai.jsonl"
    pool.parent.mkdir()
    pool.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(StageError, match=message):
        run(tmp_path, reward_dir, tiny_model_dir, pools=[pool])
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


def test_bad_inputs_are_one_line(tmp_path, reward_dir, tiny_model_dir):
    empty = tmp_path / "pools" / "ai.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(StageError, match=r"ai\.jsonl: no pairs to label$"):
        run(tmp_path, reward_dir, tiny_model_dir, pools=[empty])
    with pytest.raises(StageError, match=r"^judges\.rm\.model: '.*' is not a reward model directory \(no reward\.json\)"):
        run(tmp_path, tiny_model_dir, tiny_model_dir)
    with pytest.raises(StageError, match=r"^judges\.llm\.model: model directory '.*nowhere' does not exist$"):
        run(tmp_path, reward_dir, tmp_path / "nowhere", judge="llm")
    with pytest.raises(StageError, match=r"^label_ai\.judge: unknown judge 'gpt' \(have: .*rm, llm"):
        run(tmp_path, reward_dir, tiny_model_dir, judge="gpt")
    with pytest.raises(StageError, match=r"^label_ai\.tie_margin: must not be negative"):
        run(tmp_path, reward_dir, tiny_model_dir, tie_margin=-1)
    assert not (tmp_path / "out").exists()
