import json

import pytest

from stages.lib import StageError
from stages.lib.records import (LabelledPair, PoolRecord, read_labelled_pairs, read_pool, read_starters,
                                split_starters, write_labelled_pairs, write_pool)

PROMPT = [{"role": "user", "content": "CMV: tipping should go."}]


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_writers_keep_the_order_records_are_built_in(tmp_path):
    pool = [PoolRecord(prompt=PROMPT, response_1="Ja", response_2="Nein", metadata={"prompt_id": "cmv:1", "pool": "ai"})]
    write_pool(tmp_path / "pool.jsonl", pool)
    assert (tmp_path / "pool.jsonl").read_text() == json.dumps(pool[0], ensure_ascii=False) + "\n"
    assert list(read_pool(tmp_path / "pool.jsonl")[0]) == ["prompt", "response_1", "response_2", "metadata"]
    pair = LabelledPair(prompt=PROMPT, chosen="Ja", rejected="Nein", metadata={})
    write_labelled_pairs(tmp_path / "pairs.jsonl", [pair])
    assert read_labelled_pairs(tmp_path / "pairs.jsonl") == [pair]


def test_a_writer_refuses_a_record_of_another_kind_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="a LabelledPair needs chosen, rejected$"):
        write_labelled_pairs(tmp_path / "pairs.jsonl", [{"prompt": PROMPT, "metadata": {}}])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("line, message", [
    ({"prompt": [], "chosen": "a", "rejected": "b", "metadata": {}},
     r"pairs\.jsonl:2: 'prompt' must be a non-empty list of chat messages$"),
    ({"prompt": PROMPT, "chosen": None, "rejected": "b", "metadata": {}}, r"pairs\.jsonl:2: 'chosen' must be a string$"),
    ({"prompt": PROMPT, "chosen": "a", "rejected": "b", "metadata": []}, r"pairs\.jsonl:2: 'metadata' must be an object$"),
    ({"prompt": PROMPT, "chosen": "a", "metadata": {}}, r"pairs\.jsonl:2: record missing required field 'rejected'$"),
])
def test_bad_labelled_pairs_name_file_and_line(tmp_path, line, message):
    good = {"prompt": PROMPT, "chosen": "a", "rejected": "b", "metadata": {}}
    with pytest.raises(StageError, match=message):
        read_labelled_pairs(write_lines(tmp_path / "pairs.jsonl", [good, line]))


def test_a_split_that_leaves_too_few_training_starters_names_the_key(tmp_path):
    starters = read_starters(write_lines(tmp_path / "starters.jsonl", [{"id": i, "prompt": f"hi {i}"} for i in range(4)]))
    with pytest.raises(StageError, match=r"^rl\.eval_prompts: 4 holds out every one of the 4 starters in "):
        split_starters(starters, 0, 4, 1, tmp_path / "starters.jsonl")
    with pytest.raises(StageError, match=r"^rl\.batch_size: 3 is more than the 2 training starters in .*"
                                         r"\(after holding out rl\.eval_prompts: 2\)$"):
        split_starters(starters, 0, 2, 3, tmp_path / "starters.jsonl")
