import json
from pathlib import Path

import pytest

from stages import p4g_preprocess
from stages.lib import StageError
from stages.lib.models import load_tokenizer
from tests.conftest import REPO_ROOT, metrics_result, params_file

# (Turn, role, text) rows of one dialogue as the raw release has them: turn 1 of the persuader is
# split over two rows, and the texts use Latin-1 characters.
DIALOGUE = [
    (0, 0, "Hello! How are you doing today?"),
    (0, 1, "Fine, thanks. Just had a café au lait."),
    (1, 0, "Have you heard of Save the Children?"),
    (1, 0, "They help kids in more than 100 countries."),
    (1, 1, "No, tell me more. Do they work in São Paulo?"),
    (2, 0, "Yes, and in the US too. Would you donate £1 of your bonus?"),
    (2, 1, "Okay, I'll give 50¢."),
    (3, 0, "Thank you so much, that's very generous!"),
    (3, 1, "Bye!"),
]
OTHER = [(0, 0, "Hi there, how is your day going so far?"), (0, 1, "Good."),
         (1, 0, "Would you consider a small donation to Save the Children?"), (1, 1, "No thanks.")]
INFO_HEADER = ",B2,B3,B4,B6,B7,age.x,extrovert.x,agreeable.x"


def csv_bytes(lines: list[str], encoding: str = "latin-1") -> bytes:
    return "".join(line + "\r\n" for line in lines).encode(encoding)


def quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def write_raw(root: Path, dialogues=None, encoding: str = "latin-1", info: list[str] | None = None) -> Path:
    dialogues = dialogues or {"d1": DIALOGUE, "d2": OTHER}
    root.mkdir(parents=True, exist_ok=True)
    lines, index = [",Unit,Turn,B4,B2"], 0
    for dialogue_id, rows in dialogues.items():
        for turn, role, text in rows:
            lines.append(f"{index},{quote(text)},{turn},{role},{dialogue_id}")
            index += 1
    (root / "full_dialog.csv").write_bytes(csv_bytes(lines, encoding))
    if info is None:
        info = [INFO_HEADER, "1,d1,A1X,0,1.0,,33,3.5,4.0", "2,d1,A2Y,1,0.5,1,41,2.0,3.5",
                "3,d2,A3Z,0,0,,25,4.1,2.2", "4,d2,A4W,1,0,0,52,1.5,4.5"]
    (root / "full_info.csv").write_bytes(csv_bytes(info, encoding))
    return root


def write_convokit(root: Path, layout: str = "current") -> Path:
    """The same two dialogues in ConvoKit's layout: one utterance per turn, a reply-to chain."""
    root.mkdir(parents=True, exist_ok=True)
    speaker_key, conversation_key = ("speaker", "conversation_id") if layout == "current" else ("user", "root")
    lines, conversations, uid = [], {}, 0
    for number, (dialogue_id, rows, donation) in enumerate([("d1", DIALOGUE, 0.5), ("d2", OTHER, 0.0)]):
        turns = []
        for turn, role, text in rows:
            if turns and turns[-1][:2] == (turn, role):
                turns[-1] = (turn, role, turns[-1][2] + " " + text)
            else:
                turns.append((turn, role, text))
        first = str(uid)
        conversations[first] = {"meta": {"dialogue_id": dialogue_id, "user_er": f"ER{number}", "user_ee": f"EE{number}",
                                         "donation_er": 1.0, "donation_ee": donation, "is_annotated": False},
                                "vectors": []}
        for turn, role, text in turns:
            record = {"id": str(uid), conversation_key: first, "text": text,
                      speaker_key: f"ER{number}" if role == 0 else f"EE{number}",
                      "meta": {"role": role, "user_turn_id": turn, "label_1": None},
                      "reply-to": None if str(uid) == first else str(uid - 1), "timestamp": None, "vectors": []}
            lines.append(json.dumps(record, ensure_ascii=False))
            uid += 1
    # ConvoKit does not promise file order; the reply-to chain is what orders a dialogue.
    lines = lines[:1] + lines[1:4][::-1] + lines[4:]
    (root / "utterances.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if layout == "old":
        conversations = {k: v["meta"] for k, v in conversations.items()}
    (root / "conversations.json").write_text(json.dumps(conversations), encoding="utf-8")
    (root / "speakers.json").write_text("{}")
    (root / "corpus.json").write_text("{}")
    (root / "index.json").write_text("{}")
    return root


def run(tmp_path: Path, tokenizer: Path, corpus: Path, out_name: str = "p4g.jsonl", **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"p4g_preprocess": section})
    return p4g_preprocess.main(["--params", str(params), "--corpus", str(corpus), "--tokenizer", str(tokenizer),
                                "--out", str(tmp_path / out_name), "--metrics", str(tmp_path / f"{out_name}.metrics.json")])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


LOOSE = dict(min_tokens=1, max_tokens=5000, max_context_tokens=None)


def test_persuader_turns_are_responses_to_the_dialogue_so_far(tmp_path, tiny_model_dir):
    raw = write_raw(tmp_path / "raw")
    assert b"caf\xe9 au lait" in (raw / "full_dialog.csv").read_bytes() and b"\r\n" in (raw / "full_dialog.csv").read_bytes()
    metrics = run(tmp_path, tiny_model_dir, raw, **LOOSE)
    rows = read_rows(tmp_path / "p4g.jsonl")
    assert [row["metadata"]["utterance_id"] for row in rows] == ["d1_1", "d1_2", "d1_3", "d2_1"]
    assert rows[0]["response"] == "Have you heard of Save the Children? They help kids in more than 100 countries."
    assert rows[0]["context"] == ("Persuader: Hello! How are you doing today?\n"
                                  "Persuadee: Fine, thanks. Just had a café au lait.")
    assert rows[2]["context"] == "\n".join([
        "Persuader: Hello! How are you doing today?",
        "Persuadee: Fine, thanks. Just had a café au lait.",
        "Persuader: Have you heard of Save the Children? They help kids in more than 100 countries.",
        "Persuadee: No, tell me more. Do they work in São Paulo?",
        "Persuader: Yes, and in the US too. Would you donate £1 of your bonus?",
        "Persuadee: Okay, I'll give 50¢.",
    ])
    tokenizer = load_tokenizer(tiny_model_dir)
    assert rows[1]["metadata"] == {
        "source": "p4g", "conversation_id": "d1", "utterance_id": "d1_2", "turn": 2, "persuadee_donation": 0.5,
        "response_tokens": len(tokenizer(rows[1]["response"], add_special_tokens=False)["input_ids"]),
        "context_tokens": len(tokenizer(rows[1]["context"], add_special_tokens=False)["input_ids"]),
        "context_truncated": False,
    }
    assert rows[3]["metadata"]["persuadee_donation"] == 0.0
    assert metrics["dialogues"] == 2 and metrics["turns"] == 12
    assert metrics["candidates"] == 6 and metrics["kept"] == 4 and metrics["dropped_no_context"] == 2


def test_convokit_layouts_give_the_same_rows_as_the_raw_release(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, write_raw(tmp_path / "raw"), "raw.jsonl", **LOOSE)
    run(tmp_path, tiny_model_dir, write_convokit(tmp_path / "current", "current"), "current.jsonl", **LOOSE)
    run(tmp_path, tiny_model_dir, write_convokit(tmp_path / "old", "old"), "old.jsonl", **LOOSE)
    raw = (tmp_path / "raw.jsonl").read_bytes()
    assert raw == (tmp_path / "current.jsonl").read_bytes() == (tmp_path / "old.jsonl").read_bytes()
    assert len(read_rows(tmp_path / "raw.jsonl")) == 4


def test_utf8_and_windows_1252_files_decode_too(tmp_path, tiny_model_dir):
    dialogue = [(0, 0, "Hi!"), (0, 1, "I’m fine, café time."), (1, 0, "Would you donate to Save the Children today?")]
    for encoding in ("utf-8", "cp1252"):
        corpus = write_raw(tmp_path / encoding, {"d1": dialogue}, encoding=encoding)
        run(tmp_path, tiny_model_dir, corpus, f"{encoding}.jsonl", **LOOSE)
    for name in ("utf-8.jsonl", "cp1252.jsonl"):
        (row,) = read_rows(tmp_path / name)
        assert row["context"] == "Persuader: Hi!\nPersuadee: I’m fine, café time."


def test_min_donation_keeps_only_dialogues_that_raised_enough(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, write_raw(tmp_path / "raw"), min_donation=0.25, **LOOSE)
    assert {row["metadata"]["conversation_id"] for row in read_rows(tmp_path / "p4g.jsonl")} == {"d1"}
    assert metrics["dropped_below_min_donation"] == 1


def test_token_bounds_and_front_truncation(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for _, role, text in DIALOGUE if role == 0)
    metrics = run(tmp_path, tiny_model_dir, write_raw(tmp_path / "raw"),
                  min_tokens=30, max_tokens=longest - 1, max_context_tokens=24)
    rows = read_rows(tmp_path / "p4g.jsonl")
    assert all(30 <= row["metadata"]["response_tokens"] < longest for row in rows)
    assert metrics["dropped_too_short"] + metrics["dropped_too_long"] + len(rows) == 4
    truncated = [row for row in rows if row["metadata"]["context_truncated"]]
    assert truncated and metrics["contexts_truncated"] == len(truncated)
    for row in truncated:
        assert row["context"].startswith("[...] ") and row["metadata"]["context_tokens"] <= 24


def test_rerun_is_byte_identical(tmp_path, tiny_model_dir):
    raw = write_raw(tmp_path / "raw")
    run(tmp_path, tiny_model_dir, raw, "a.jsonl", **{**LOOSE, "max_context_tokens": 24})
    run(tmp_path, tiny_model_dir, raw, "b.jsonl", **{**LOOSE, "max_context_tokens": 24})
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert metrics_result(tmp_path / "a.jsonl.metrics.json") == metrics_result(tmp_path / "b.jsonl.metrics.json")


def test_shipped_sample(tmp_path, tiny_model_dir):
    corpus = REPO_ROOT / "data" / "raw" / "p4g"
    metrics = run(tmp_path, tiny_model_dir, corpus, min_tokens=6, max_tokens=512, max_context_tokens=1024)
    rows = read_rows(tmp_path / "p4g.jsonl")
    assert metrics["dialogues"] >= 20 and metrics["kept"] == len(rows)
    dropped = sum(v for k, v in metrics.items() if k.startswith("dropped_"))
    assert metrics["candidates"] == metrics["kept"] + dropped
    assert metrics["dropped_no_context"] == metrics["dialogues"]
    assert metrics["conversations_kept"] == metrics["dialogues"]
    assert len({row["metadata"]["utterance_id"] for row in rows}) == len(rows)
    for row in rows:
        lines = row["context"].split("\n")
        assert lines[-1].startswith("Persuadee: ") and all(line.startswith(("Persuader: ", "Persuadee: ", "[...] "))
                                                          for line in lines)
        assert row["metadata"]["utterance_id"] == f"{row['metadata']['conversation_id']}_{row['metadata']['turn']}"
    text = "".join(row["context"] + row["response"] for row in rows)
    assert "é" in text and "£" in text and "Ã" not in text and "\r" not in text
    assert any(row["metadata"]["persuadee_donation"] is None for row in rows)


def bad_dialog(tmp_path: Path, lines: list[str]) -> Path:
    raw = write_raw(tmp_path / "raw")
    (raw / "full_dialog.csv").write_bytes(csv_bytes(lines))
    return raw


@pytest.mark.parametrize("lines, message", [
    ([",Unit,Turn,B2", "0,Hello,0,d1"], r"full_dialog\.csv:1: missing column\(s\) 'B4' \(header: ,Unit,Turn,B2\)$"),
    ([",Text,Turn,Role,Dialogue", "0,Hello,0,0,d1"], r"full_dialog\.csv:1: missing column\(s\) 'Unit', 'B4', 'B2'"),
    ([",Unit,Turn,B4,B2", "0,Hello,0,0,d1", "1,Hi,one,1,d1"],
     r"full_dialog\.csv:3: Turn must be a whole number >= 0, got 'one'$"),
    ([",Unit,Turn,B4,B2", "0,Hello,0,2,d1"],
     r"full_dialog\.csv:2: role must be 0 \(persuader\) or 1 \(persuadee\), got '2'$"),
    ([",Unit,Turn,B4,B2", '0,"Hello,\r\nthere",0,0,d1', "1,Hi,0,1"], r"full_dialog\.csv:4: expected 5 fields, got 4$"),
    ([",Unit,Turn,B4,B2", "0,Hello,0,0,"], r"full_dialog\.csv:2: empty dialogue id \(B2\)$"),
    ([], r"full_dialog\.csv:1: empty file, expected a header with columns Unit, Turn, B4, B2$"),
])
def test_bad_dialog_csv_names_file_and_line(tmp_path, tiny_model_dir, lines, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, tiny_model_dir, bad_dialog(tmp_path, lines), **LOOSE)
    assert not (tmp_path / "p4g.jsonl").exists() and not (tmp_path / "p4g.jsonl.metrics.json").exists()


def test_bad_info_csv_names_file_and_line(tmp_path, tiny_model_dir):
    raw = write_raw(tmp_path / "raw", info=[INFO_HEADER, "1,d1,A1X,0,1.0,,33,3.5,4.0", "2,d1,A2Y,1,lots,1,41,2.0,3.5"])
    with pytest.raises(StageError, match=r"full_info\.csv:3: donation must be a number, got 'lots'$"):
        run(tmp_path, tiny_model_dir, raw, **LOOSE)
    raw = write_raw(tmp_path / "raw", info=[",B2,B3,B4,B7", "1,d1,A1X,0,"])
    with pytest.raises(StageError, match=r"full_info\.csv:1: missing column\(s\) 'B6'"):
        run(tmp_path, tiny_model_dir, raw, **LOOSE)
    (raw / "full_info.csv").unlink()
    with pytest.raises(StageError, match=r"full_info\.csv: P4G CSV not found$"):
        run(tmp_path, tiny_model_dir, raw, **LOOSE)
    assert not (tmp_path / "p4g.jsonl").exists()


def test_convokit_utterance_without_role_names_file_and_line(tmp_path, tiny_model_dir):
    corpus = write_convokit(tmp_path / "convokit")
    lines = (corpus / "utterances.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    del record["meta"]["role"]
    lines[1] = json.dumps(record)
    (corpus / "utterances.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=r"utterances\.jsonl:2: utterance meta missing 'role'$"):
        run(tmp_path, tiny_model_dir, corpus, **LOOSE)
    assert not (tmp_path / "p4g.jsonl").exists()


def test_directory_of_neither_layout_is_named(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match=r"empty: not a P4G corpus: expected full_dialog\.csv \+ full_info\.csv "
                                         r"\(raw release\) or utterances\.jsonl \+ conversations\.json \(ConvoKit\)$"):
        run(tmp_path, tiny_model_dir, tmp_path / "empty", **LOOSE)
    with pytest.raises(StageError, match=r"missing: P4G corpus directory not found$"):
        run(tmp_path, tiny_model_dir, tmp_path / "missing", **LOOSE)


def test_nothing_left_after_filtering_reports_reasons(tmp_path, tiny_model_dir):
    with pytest.raises(StageError, match=(r"raw: no examples left after filtering \(6 candidates; dropped no_context=2, "
                                          r"too_short=4\); check p4g_preprocess\.min_tokens")):
        run(tmp_path, tiny_model_dir, write_raw(tmp_path / "raw"), min_tokens=900, max_tokens=1000)
    assert not (tmp_path / "p4g.jsonl").exists() and not (tmp_path / "p4g.jsonl.metrics.json").exists()


@pytest.mark.parametrize("section, message", [
    (dict(min_tokens=20, max_tokens=10), r"^p4g_preprocess\.min_tokens: must not exceed max_tokens \(20 > 10\)$"),
    (dict(min_donation=-1), r"^p4g_preprocess\.min_donation: must be >= 0 or null, got -1\.0$"),
    (dict(max_context_tokens="lots"), r"^p4g_preprocess\.max_context_tokens: expected int or null, got a string 'lots'$"),
])
def test_bad_params_name_the_key(tmp_path, tiny_model_dir, section, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, tiny_model_dir, write_raw(tmp_path / "raw"), **section)
    assert not (tmp_path / "p4g.jsonl").exists()
