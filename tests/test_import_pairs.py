import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages import dpo, import_pairs
from stages.lib import StageError
from stages.lib.records import read_labelled_pairs
from tests.conftest import REPO_ROOT, metrics_result, params_file

SAMPLE = REPO_ROOT / "data/raw/preference_pairs/sample.jsonl"
SYSTEM = {"role": "system", "content": "Change their mind."}
USER = {"role": "user", "content": "CMV: cities should ban cars from their centres."}
GOOD = "Car-free centres in Ghent and Pontevedra kept their shops busy and cut traffic injuries."
BAD = "No."


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


EXPLICIT = {"prompt": [SYSTEM, USER], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}
TEXT = {"prompt": "Persuade my friend to get a flu shot.", "chosen": "Ask what worries him first.", "rejected": "Nag."}
IMPLICIT = {"chosen": [SYSTEM, USER, assistant("Oslo's car-free centre drew more visitors, not fewer.")],
            "rejected": [SYSTEM, USER, assistant("Cars are fine.")]}
LABELLED = {"prompt": [SYSTEM, USER], "chosen": "Start with one street on Sundays and let people see it work.",
            "rejected": "Whatever.",
            "metadata": {"source": "cmv", "prompt_id": "cmv:t1_1", "grader": "human", "preference": "2",
                         "is_equal": False}}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows, header=("prompt", "chosen", "rejected", "metadata")) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out.getvalue())
    return path


def run(tmp_path: Path, pairs: Path, out: str = "imported.jsonl", **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"import_pairs": section})
    return import_pairs.main(["--params", str(params), "--pairs", str(pairs), "--out", str(tmp_path / out),
                              "--metrics", str(tmp_path / "metrics.json")])


def read_out(tmp_path: Path, out: str = "imported.jsonl") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]


def test_each_jsonl_format_becomes_a_labelled_pair(tmp_path):
    pairs = write_jsonl(tmp_path / "in" / "pairs.jsonl", [EXPLICIT, TEXT, "", IMPLICIT, LABELLED])
    metrics = run(tmp_path, pairs)
    explicit, text, implicit, labelled = read_out(tmp_path)
    assert explicit == {"prompt": [SYSTEM, USER], "chosen": GOOD, "rejected": BAD,
                        "metadata": {"source": "pairs.jsonl", "line": 1}}
    assert text == {"prompt": [{"role": "user", "content": TEXT["prompt"]}], "chosen": TEXT["chosen"],
                    "rejected": TEXT["rejected"], "metadata": {"source": "pairs.jsonl", "line": 2}}
    # Line 3 is blank: the implicit-prompt pair is on line 4, its prompt the two conversations' shared prefix.
    assert implicit == {"prompt": [SYSTEM, USER], "chosen": IMPLICIT["chosen"][-1]["content"],
                        "rejected": "Cars are fine.", "metadata": {"source": "pairs.jsonl", "line": 4}}
    # The pipeline's own pairs come through as they are; their own `source` is kept beside the import's.
    assert [labelled[k] for k in ("prompt", "chosen", "rejected")] == [LABELLED[k] for k in ("prompt", "chosen",
                                                                                             "rejected")]
    assert labelled["metadata"] == {"original_source": "cmv", "prompt_id": "cmv:t1_1", "grader": "human",
                                    "preference": "2", "is_equal": False, "source": "pairs.jsonl", "line": 5}
    assert list(labelled) == ["prompt", "chosen", "rejected", "metadata"]
    assert metrics_result(tmp_path / "metrics.json") == {
        "files": {"pairs.jsonl": 4}, "records": 4, "pairs": 4,
        "formats": {"explicit_prompt": 2, "implicit_prompt": 1, "labelled_pair": 1}, "text_prompts": 1,
        "system_prompts_added": 0, "duplicates": 0, "duplicates_dropped": 0, "ties": 0}


def test_multi_turn_implicit_pairs_split_at_the_final_reply(tmp_path):
    history = [SYSTEM, USER, assistant("Which cities do you mean?"), {"role": "user", "content": "Big ones."}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [*history, assistant(GOOD)],
                                                    "rejected": [*history, assistant(BAD)], "id": 7}])
    run(tmp_path, pairs)
    assert read_out(tmp_path) == [{"prompt": history, "chosen": GOOD, "rejected": BAD,
                                   "metadata": {"source": "pairs.jsonl", "line": 1}}]


def test_csv_cells_hold_text_or_json_messages_and_errors_name_the_row_start(tmp_path):
    messages = json.dumps([SYSTEM, USER])
    rows = [
        ["Persuade my friend to get a flu shot.", "Ask what worries him,\nthen explain.", "Nag.", ""],
        [messages, GOOD, BAD, json.dumps({"grader": "human", "is_equal": True})],
        ["", json.dumps(EXPLICIT["prompt"] + [assistant("Look at Ghent.")]),
         json.dumps(EXPLICIT["prompt"] + [assistant("No!")]), ""],
        ["[Serious] Is a text prompt that starts with a bracket kept as text?", "Yes, it is.", "No.", ""],
    ]
    pairs = write_csv(tmp_path / "pairs.csv", rows)
    metrics = run(tmp_path, pairs)
    first, second, third, fourth = read_out(tmp_path)
    assert first == {"prompt": [{"role": "user", "content": "Persuade my friend to get a flu shot."}],
                     "chosen": "Ask what worries him,\nthen explain.", "rejected": "Nag.",
                     "metadata": {"source": "pairs.csv", "line": 2}}
    # The first row's chosen cell runs over two lines: the next row starts on line 4.
    assert second == {"prompt": [SYSTEM, USER], "chosen": GOOD, "rejected": BAD,
                      "metadata": {"grader": "human", "is_equal": True, "source": "pairs.csv", "line": 4}}
    assert third == {"prompt": [SYSTEM, USER], "chosen": "Look at Ghent.", "rejected": "No!",
                     "metadata": {"source": "pairs.csv", "line": 5}}
    assert fourth["prompt"] == [{"role": "user", "content": rows[3][0]}]
    assert metrics["formats"] == {"explicit_prompt": 2, "implicit_prompt": 1, "labelled_pair": 1}
    assert (metrics["text_prompts"], metrics["ties"]) == (2, 1)

    bad = write_csv(tmp_path / "bad.csv", [rows[0], [messages[:-1], GOOD, BAD, ""]])
    with pytest.raises(StageError, match=rf"^{re.escape(str(bad))}:4: column 'prompt': malformed JSON: "):
        run(tmp_path, bad, out="bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.parametrize("rows, header, message", [
    ([["p", "c", "r"]], ("prompt", "chosen", "answer"), "1: the header has no 'rejected' column"),
    ([["p", "c"]], ("prompt", "chosen", "rejected"), "2: 2 fields, the header has 3"),
    ([["p", "c", "r", "{not json"]], ("prompt", "chosen", "rejected", "metadata"),
     "2: column 'metadata': malformed JSON: "),
    ([["p", "c", "r", "[1, 2]"]], ("prompt", "chosen", "rejected", "metadata"), "2: 'metadata' must be an object"),
    ([["p", "c", ""]], ("prompt", "chosen", "rejected"), "2: 'rejected' is empty"),
    ([["", "c", "r"]], ("prompt", "chosen", "rejected"), "2: record missing required field 'prompt'"),
])
def test_bad_csv_rows_are_one_line(tmp_path, rows, header, message):
    pairs = write_csv(tmp_path / "pairs.csv", rows, header)
    with pytest.raises(StageError, match=f"^{re.escape(str(pairs))}:{re.escape(message)}"):
        run(tmp_path, pairs)
    assert not (tmp_path / "imported.jsonl").exists()


TOOL_TURN = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}


@pytest.mark.parametrize("record, message", [
    ('{"prompt": "p", "chosen": "c"', "malformed JSON: "),
    ({"prompt": "p", "rejected": "r"}, "record missing required field 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "record missing required field 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "record missing required field 'prompt' (without one, chosen and rejected "
                                       "must be whole conversations: lists of messages)"),
    ({**TEXT, "chosen": "  \n"}, "'chosen' is empty"),
    ({**TEXT, "rejected": ""}, "'rejected' is empty"),
    ({**TEXT, "prompt": " "}, "'prompt' is empty"),
    ({**TEXT, "rejected": TEXT["chosen"]}, "chosen and rejected are the same reply"),
    ({**EXPLICIT, "prompt": []}, "'prompt' must be a non-empty list of chat messages"),
    ({**EXPLICIT, "prompt": [SYSTEM, {"role": "person", "content": "hi"}]},
     "prompt: messages[1] must be an object with a role in system, user, assistant, tool"),
    ({**EXPLICIT, "prompt": [SYSTEM, {"role": "user", "content": 3}]},
     "prompt: messages[1].content must be a string or null"),
    ({**EXPLICIT, "prompt": [USER, TOOL_TURN]},
     "prompt: messages[1] (assistant with tool calls) is not a text turn; DPO trains on system, user and assistant "
     "text"),
    ({**EXPLICIT, "prompt": [USER, assistant("Hm.")]},
     "prompt: ends with an assistant turn (messages[1]); the reply must follow a user or system turn"),
    ({**EXPLICIT, "chosen": [assistant(GOOD), assistant("And more.")]},
     "'chosen' must hold one assistant message (the reply), got assistant, assistant"),
    ({**EXPLICIT, "rejected": [USER]}, "'rejected' must hold one assistant message (the reply), got user"),
    ({**EXPLICIT, "rejected": 3}, "'rejected' must be text or a list holding one assistant message"),
    ({**LABELLED, "metadata": "cmv"}, "'metadata' must be an object"),
    ({"chosen": [USER, assistant(GOOD)], "rejected": [SYSTEM, USER, assistant(BAD)]},
     "chosen and rejected share no prefix (an implicit-prompt pair is two conversations that differ only in the "
     "final reply)"),
    ({"chosen": [SYSTEM, USER, assistant(GOOD)], "rejected": [SYSTEM, {"role": "user", "content": "Other."},
                                                             assistant(BAD)]},
     "the conversations part at messages[1], a user turn of 'chosen'; the shared prefix must end where an "
     "assistant reply begins"),
    ({"chosen": [SYSTEM, USER, assistant(GOOD), USER], "rejected": [SYSTEM, USER, assistant(BAD)]},
     "'chosen' goes on after its reply (2 messages after the shared prefix); an implicit-prompt pair differs only "
     "in the final assistant reply"),
    ({"chosen": [USER, assistant("Hm."), assistant(GOOD)], "rejected": [USER, assistant("Hm."), assistant(BAD)]},
     "the shared prefix: ends with an assistant turn (messages[1]); the reply must follow a user or system turn"),
    ({"chosen": IMPLICIT["chosen"], "rejected": IMPLICIT["chosen"]}, "the two conversations are the same"),
    ({"chosen": [SYSTEM, USER], "rejected": IMPLICIT["rejected"]},
     "'chosen' ends inside the shared prefix, with no reply of its own"),
    ({"chosen": [SYSTEM, USER, assistant(" ")], "rejected": IMPLICIT["rejected"]}, "the reply of 'chosen' is empty"),
    ({"chosen": [SYSTEM, "hi"], "rejected": IMPLICIT["rejected"]},
     "chosen: messages[1] must be an object with a role in system, user, assistant, tool"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_records_are_one_line_naming_file_and_line(tmp_path, record, message):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [EXPLICIT, record, TEXT])
    with pytest.raises(StageError) as raised:
        run(tmp_path, pairs)
    assert str(raised.value).startswith(f"{pairs}:2: {message}"), str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "imported.jsonl").exists() and not (tmp_path / "metrics.json").exists()


def test_bad_inputs_and_params_are_one_line(tmp_path):
    with pytest.raises(StageError, match=r"pairs\.txt: expected a \.jsonl or \.csv file of preference pairs"):
        run(tmp_path, write_jsonl(tmp_path / "pairs.txt", [TEXT]))
    with pytest.raises(StageError, match=r"missing\.jsonl: preference pairs not found$"):
        run(tmp_path, tmp_path / "missing.jsonl")
    with pytest.raises(StageError, match=r"empty\.jsonl: no preference pairs$"):
        run(tmp_path, write_jsonl(tmp_path / "empty.jsonl", [""]))
    (tmp_path / "none").mkdir()
    with pytest.raises(StageError, match=r"none: no \.jsonl or \.csv files$"):
        run(tmp_path, tmp_path / "none")
    with pytest.raises(StageError, match=r"^import_pairs\.system_prompt: must be null or non-empty text$"):
        run(tmp_path, write_jsonl(tmp_path / "ok.jsonl", [TEXT]), system_prompt=" ")
    with pytest.raises(StageError, match=r"^import_pairs\.drop_duplicate: unknown key \(did you mean 'drop_dupl"):
        run(tmp_path, tmp_path / "ok.jsonl", drop_duplicate=True)


def test_a_directory_reads_its_files_in_name_order(tmp_path):
    folder = tmp_path / "in"
    write_jsonl(folder / "b.jsonl", [IMPLICIT])
    write_csv(folder / "a.csv", [[TEXT["prompt"], TEXT["chosen"], TEXT["rejected"], ""]])
    write_jsonl(folder / "notes.txt", ["not pairs"])
    metrics = run(tmp_path, folder)
    rows = read_out(tmp_path)
    assert [(p["metadata"]["source"], p["chosen"]) for p in rows] == [("a.csv", TEXT["chosen"]),
                                                                     ("b.jsonl", IMPLICIT["chosen"][-1]["content"])]
    assert metrics["files"] == {"a.csv": 1, "b.jsonl": 1}


def test_duplicates_are_dropped_and_system_prompts_added_when_asked(tmp_path):
    # The same pair as EXPLICIT, in the other two shapes: only the first of the three is kept.
    same_implicit = {"chosen": [SYSTEM, USER, assistant(GOOD)], "rejected": [SYSTEM, USER, assistant(BAD)]}
    same_labelled = {**LABELLED, "chosen": GOOD, "rejected": BAD}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [EXPLICIT, TEXT, same_implicit, same_labelled])
    metrics = run(tmp_path, pairs, system_prompt="Be persuasive.")
    rows = read_out(tmp_path)
    assert [row["metadata"]["line"] for row in rows] == [1, 2]
    assert rows[1]["prompt"] == [{"role": "system", "content": "Be persuasive."},
                                 {"role": "user", "content": TEXT["prompt"]}]
    assert rows[0]["prompt"] == [SYSTEM, USER]  # it has a system message of its own
    assert (metrics["duplicates"], metrics["duplicates_dropped"], metrics["system_prompts_added"]) == (2, 2, 1)
    metrics = run(tmp_path, pairs, drop_duplicates=False)
    assert len(read_out(tmp_path)) == 4 and (metrics["duplicates"], metrics["duplicates_dropped"]) == (2, 0)


def test_output_bytes_are_the_same_run_after_run(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [EXPLICIT, TEXT, IMPLICIT, LABELLED,
                                                  {**TEXT, "chosen": "Ünïcode, kept as written ✓"}])
    run(tmp_path, pairs, out="first.jsonl")
    first_metrics = metrics_result(tmp_path / "metrics.json")
    run(tmp_path, pairs, out="second.jsonl")
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "second.jsonl").read_bytes()
    assert "Ünïcode, kept as written ✓" in (tmp_path / "first.jsonl").read_text(encoding="utf-8")
    assert metrics_result(tmp_path / "metrics.json") == first_metrics


def test_the_shipped_sample_converts_cleanly_and_reaches_dpo_unchanged(tmp_path):
    from tests.tiny import build_tokenizer

    metrics = run(tmp_path, SAMPLE)
    assert (metrics["records"], metrics["pairs"], metrics["duplicates"], metrics["ties"]) == (24, 24, 0, 0)
    assert metrics["formats"] == {"explicit_prompt": 11, "implicit_prompt": 7, "labelled_pair": 6}
    pairs = read_labelled_pairs(tmp_path / "imported.jsonl")  # what dpo.py reads with --train
    assert [p["metadata"]["line"] for p in pairs] == list(range(1, 25))
    assert all(p["metadata"]["source"] == "sample.jsonl" for p in pairs)
    # Chosen replies reason with the other side; rejected ones are curt, rude or off topic.
    assert all(len(p["chosen"].split()) > 2 * len(p["rejected"].split()) for p in pairs)
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)

    run_section = SimpleNamespace(params=SimpleNamespace(max_prompt_tokens=4096), where=lambda key: key)
    dataset, cut = dpo.preference_dataset(pairs, build_tokenizer(), run_section)
    assert cut == 0 and len(dataset) == 24
    for row, pair in zip(dataset, pairs):
        assert row["prompt"] == [{"role": m["role"], "content": m["content"]} for m in pair["prompt"]]
        assert row["chosen"] == [{"role": "assistant", "content": pair["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": pair["rejected"]}]
