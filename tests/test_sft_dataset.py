import json
import random
from pathlib import Path

import pytest

from stages import cmv_preprocess, p4g_preprocess, sft_dataset
from stages.lib import StageError
from tests.conftest import REPO_ROOT, params_file, project_params


def make_rows(source: str, conversations: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for c in range(conversations):
        for u in range(rng.randint(1, 6)):
            rows.append({"context": f"{source} conversation {c} context before reply {u}",
                         "response": f"persuasive reply {u} in {source} {c} — with “quotes”",
                         "metadata": {"source": source, "conversation_id": f"{source[0]}{c}", "utterance_id": f"{c}_{u}",
                                      "response_tokens": 10 + u, "context_tokens": 20 + u, "context_truncated": False}})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    return (write_rows(tmp_path / "cmv.jsonl", make_rows("cmv", 40, 1)),
            write_rows(tmp_path / "p4g.jsonl", make_rows("p4g", 25, 2)))


def run(tmp_path: Path, cmv: Path | None, p4g: Path | None, out_name: str = "sft", **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"sft_dataset": section})
    argv = ["--params", str(params), "--out", str(tmp_path / out_name), "--metrics", str(tmp_path / f"{out_name}.json")]
    argv += ["--cmv", str(cmv)] if cmv else []
    argv += ["--p4g", str(p4g)] if p4g else []
    return sft_dataset.main(argv)


def read_split(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def conversations_of(records: list[dict]) -> set:
    return {(r["metadata"]["source"], r["metadata"]["conversation_id"]) for r in records}


def test_splits_are_disjoint_by_conversation_and_keep_provenance(tmp_path, inputs):
    cmv, p4g = inputs
    metrics = run(tmp_path, cmv, p4g, system_prompt="Persuade politely.")
    splits = {name: read_split(tmp_path / "sft", name) for name in sft_dataset.SPLITS}
    source_rows = [json.loads(line) for path in (cmv, p4g) for line in path.read_text(encoding="utf-8").splitlines()]

    seen = [conversations_of(records) for records in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(len(records) for records in splits.values()) == len(source_rows) == metrics["examples"]

    by_key = {(r["metadata"]["source"], r["metadata"]["utterance_id"]): r for r in source_rows}
    for records in splits.values():
        for record in records:
            row = by_key[(record["metadata"]["source"], record["metadata"]["utterance_id"])]
            assert record == {"messages": [{"role": "system", "content": "Persuade politely."},
                                           {"role": "user", "content": row["context"]},
                                           {"role": "assistant", "content": row["response"]}],
                              "metadata": row["metadata"]}
        # Rows keep their input order within a split: CMV first, then P4G, each in file order.
        positions = [source_rows.index(by_key[(r["metadata"]["source"], r["metadata"]["utterance_id"])]) for r in records]
        assert positions == sorted(positions)
        assert {r["metadata"]["source"] for r in records} == {"cmv", "p4g"}

    assert 0.7 <= metrics["train_examples"] / metrics["examples"] <= 0.9
    for name in sft_dataset.SPLITS:
        assert metrics[f"{name}_examples"] == len(splits[name]) == metrics[f"{name}_cmv"] + metrics[f"{name}_p4g"]
        assert metrics[f"{name}_conversations"] == len(conversations_of(splits[name]))
    assert json.loads((tmp_path / "sft.json").read_text()) == metrics


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, inputs):
    run(tmp_path, *inputs, "a")
    run(tmp_path, *inputs, "b")
    run(tmp_path, *inputs, "c", seed=7)
    for name in sft_dataset.SPLITS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert conversations_of(read_split(tmp_path / "a", "test")) != conversations_of(read_split(tmp_path / "c", "test"))


def test_default_system_prompt(tmp_path, inputs):
    run(tmp_path, *inputs)
    record = read_split(tmp_path / "sft", "train")[0]
    assert record["messages"][0] == {"role": "system", "content": project_params()["sft_dataset"]["system_prompt"]}


def test_max_examples_is_a_seeded_sample_not_the_head(tmp_path, inputs):
    metrics = run(tmp_path, *inputs, max_examples=50)
    records = [r for name in sft_dataset.SPLITS for r in read_split(tmp_path / "sft", name)]
    assert len(records) == metrics["examples"] == 50 and metrics["examples_in"] > 50
    assert metrics["examples_p4g"] > 0, "a head-of-file cap would keep only CMV rows"
    run(tmp_path, *inputs, "again", max_examples=50)
    assert (tmp_path / "sft" / "train.jsonl").read_bytes() == (tmp_path / "again" / "train.jsonl").read_bytes()


def test_a_disabled_source_needs_no_file(tmp_path, inputs):
    cmv, _ = inputs
    metrics = run(tmp_path, cmv, None, use_p4g=False)
    assert metrics["examples_p4g"] == 0 and metrics["examples"] == metrics["examples_cmv"] > 0
    assert all(r["metadata"]["source"] == "cmv" for r in read_split(tmp_path / "sft", "train"))


def test_shipped_sample_end_to_end(tmp_path, tiny_model_dir):
    params = params_file(tmp_path / "params.yaml", {
        "cmv_preprocess": {"min_tokens": 16, "max_tokens": 4096, "max_context_tokens": 1024},
        "p4g_preprocess": {"min_tokens": 6, "max_tokens": 512, "max_context_tokens": 1024},
        "sft_dataset": {},
    })
    common = ["--params", str(params), "--tokenizer", str(tiny_model_dir)]
    raw = REPO_ROOT / "data" / "raw"
    cmv_metrics = cmv_preprocess.main(common + ["--corpus", str(raw / "cmv"), "--out", str(tmp_path / "cmv.jsonl"),
                                                "--metrics", str(tmp_path / "cmv_metrics.json")])
    p4g_metrics = p4g_preprocess.main(common + ["--corpus", str(raw / "p4g"), "--out", str(tmp_path / "p4g.jsonl"),
                                                "--metrics", str(tmp_path / "p4g_metrics.json")])
    metrics = sft_dataset.main(["--params", str(params), "--cmv", str(tmp_path / "cmv.jsonl"),
                                "--p4g", str(tmp_path / "p4g.jsonl"),
                                "--out", str(tmp_path / "sft"), "--metrics", str(tmp_path / "sft.json")])
    assert metrics["examples_cmv"] == cmv_metrics["kept"] and metrics["examples_p4g"] == p4g_metrics["kept"]
    splits = {name: read_split(tmp_path / "sft", name) for name in sft_dataset.SPLITS}
    assert sum(map(len, splits.values())) == metrics["examples"]
    seen = [conversations_of(records) for records in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for name, records in splits.items():
        assert metrics[f"{name}_cmv"] > 0 and metrics[f"{name}_p4g"] > 0
        assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in records)


def test_empty_split_names_the_split_and_counts(tmp_path):
    cmv = write_rows(tmp_path / "cmv.jsonl", make_rows("cmv", 2, 3))
    with pytest.raises(StageError, match=r"^sft_dataset: split 'val' is empty \(train 7 examples / 2 conversations, "
                                         r"val 0 examples / 0 conversations, test 0 examples / 0 conversations\); "
                                         r"too few conversations for sft_dataset\.val_ratio=0\.1$"):
        run(tmp_path, cmv, None, use_p4g=False)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.json").exists()


BAD_ROWS = {
    "malformed": ('{"context": "a", "response": "b", "metadata": {', r"cmv\.jsonl:3: malformed JSON: "),
    "no_metadata": ('{"context": "a", "response": "b"}', r"cmv\.jsonl:3: record missing required field 'metadata'$"),
    "no_conversation": ('{"context": "a", "response": "b", "metadata": {"source": "cmv"}}',
                        r"cmv\.jsonl:3: 'metadata' must be an object with a 'conversation_id'$"),
    "empty_response": ('{"context": "a", "response": " ", "metadata": {"conversation_id": "x"}}',
                       r"cmv\.jsonl:3: 'response' must be a non-empty string$"),
    "wrong_source": ('{"context": "a", "response": "b", "metadata": {"source": "p4g", "conversation_id": "x"}}',
                     r"cmv\.jsonl:3: metadata\.source is 'p4g', expected 'cmv'$"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_input_row_names_file_and_line(tmp_path, inputs, case):
    line, message = BAD_ROWS[case]
    cmv, p4g = inputs
    lines = cmv.read_text(encoding="utf-8").splitlines()
    lines.insert(2, line)
    cmv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(StageError, match=message):
        run(tmp_path, cmv, p4g)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.json").exists()


@pytest.mark.parametrize("section, missing, message", [
    (dict(train_ratio=0.8, val_ratio=0.1, test_ratio=0.2), False,
     r"^sft_dataset: the split ratios must sum to 1, got train_ratio \+ val_ratio \+ test_ratio = 1\.1$"),
    (dict(val_ratio=0.0), False, r"^sft_dataset\.val_ratio: must be between 0 and 1 \(exclusive\), got 0\.0$"),
    (dict(use_cmv=False, use_p4g=False), False, r"^sft_dataset: no source enabled: use_cmv and use_p4g are both false$"),
    (dict(max_examples=0), False, r"^sft_dataset\.max_examples: must be at least 1 or null, got 0$"),
    (dict(seeds=3), False, r"^sft_dataset\.seeds: unknown key \(did you mean 'seed'\?\)$"),
    (dict(), True, r"^sft_dataset\.use_p4g is true but no --p4g file was given$"),
])
def test_bad_params_name_the_key(tmp_path, inputs, section, missing, message):
    cmv, p4g = inputs
    with pytest.raises(StageError, match=message):
        run(tmp_path, cmv, None if missing else p4g, **section)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.json").exists()
