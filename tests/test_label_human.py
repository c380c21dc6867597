import json
import re
from pathlib import Path

import pytest

from stages import label_human
from stages.lib import StageError
from stages.lib.records import read_labels
from tests.conftest import REPO_ROOT, metrics_result, params_file


def pool_record(i: int) -> dict:
    return {"prompt": [{"role": "system", "content": "Change their mind."},
                       {"role": "user", "content": f"OP: CMV: claim number {i}"}],
            "response_1": f"first reply to {i}", "response_2": f"second reply to {i}",
            "metadata": {"source": "cmv", "conversation_id": f"t3_{i}", "utterance_id": f"t1_{i}",
                         "prompt_id": f"cmv:t1_{i}", "pool": "human"}}


def label(i: int, preference: str, labeller: str = "ana", **texts) -> dict:
    return {"prompt_id": f"cmv:t1_{i}", "preference": preference,
            "response_1": texts.get("response_1", f"first reply to {i}"),
            "response_2": texts.get("response_2", f"second reply to {i}"), "labeller": labeller}


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def pool(tmp_path) -> Path:
    return write_lines(tmp_path / "pool.jsonl", [pool_record(i) for i in range(5)])


def run(tmp_path: Path, pool: Path, labels: Path, extra=(), **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"label_human": section})
    return label_human.main(["--params", str(params), "--pool", str(pool), "--labels", str(labels),
                             "--out", str(tmp_path / "out" / "human.jsonl"),
                             "--metrics", str(tmp_path / "metrics.json"), *extra])


def read_out(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "human.jsonl").read_text().splitlines()]


def test_labels_become_pairs_in_pool_order_with_ties_and_provenance(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(3, "tie", "bo"), label(0, "2"), label(1, "1")])
    metrics = run(tmp_path, pool, labels)
    rows = read_out(tmp_path)
    assert [row["metadata"]["prompt_id"] for row in rows] == ["cmv:t1_0", "cmv:t1_1", "cmv:t1_3"]
    first, second, tie = rows
    assert (first["chosen"], first["rejected"]) == ("second reply to 0", "first reply to 0")
    assert first["metadata"] == {**pool_record(0)["metadata"], "grader": "human", "preference": "2",
                                 "is_equal": False, "labeller": "ana"}
    assert first["prompt"] == pool_record(0)["prompt"]
    assert (second["chosen"], second["rejected"]) == ("first reply to 1", "second reply to 1")
    assert second["metadata"]["preference"] == "1" and not second["metadata"]["is_equal"]
    assert (tie["chosen"], tie["rejected"]) == ("first reply to 3", "second reply to 3")
    assert tie["metadata"]["preference"] == "1" and tie["metadata"]["is_equal"] is True
    assert tie["metadata"]["labeller"] == "bo"
    peak = metrics.pop("peak_rss_mb")
    assert peak > 0
    assert metrics == {"pool_prompts": 5, "labelled": 3, "ties": 1, "preferred_1": 1, "preferred_2": 1,
                       "unlabelled": 2, "labels_on_earlier_samples": 0}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {**metrics, "peak_rss_mb": peak}


def test_texts_come_from_the_label_when_the_pool_was_resampled(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [
        label(2, "2", response_1="an older first sample", response_2="an older second sample"), label(4, "1")])
    metrics = run(tmp_path, pool, labels)
    older, current = read_out(tmp_path)
    assert (older["chosen"], older["rejected"]) == ("an older second sample", "an older first sample")
    assert older["prompt"] == pool_record(2)["prompt"]
    assert (current["chosen"], current["rejected"]) == ("first reply to 4", "second reply to 4")
    assert metrics["labels_on_earlier_samples"] == 1 and metrics["labelled"] == 2


def test_same_labels_in_any_line_order_give_the_same_bytes(tmp_path, pool):
    rows = [label(4, "1"), label(1, "tie"), label(2, "2")]
    run(tmp_path, pool, write_lines(tmp_path / "labels.jsonl", rows))
    first = (tmp_path / "out" / "human.jsonl").read_bytes(), metrics_result(tmp_path / "metrics.json")
    run(tmp_path, pool, write_lines(tmp_path / "labels.jsonl", rows))
    assert ((tmp_path / "out" / "human.jsonl").read_bytes(), metrics_result(tmp_path / "metrics.json")) == first
    run(tmp_path, pool, write_lines(tmp_path / "labels.jsonl", rows[::-1]))
    assert (tmp_path / "out" / "human.jsonl").read_bytes() == first[0]


def test_labels_written_by_the_labelling_tool_feed_the_stage(tmp_path, pool):
    from tools.label_server import LabelStore

    labels = tmp_path / "labels.jsonl"
    store = LabelStore(pool, labels, "maintainer")
    for prompt_id, preference in [("cmv:t1_1", "2"), ("cmv:t1_0", "tie"), ("cmv:t1_1", "1")]:
        store.set_label(prompt_id, preference)
    metrics = run(tmp_path, pool, labels)
    assert [(row["metadata"]["prompt_id"], row["metadata"]["is_equal"], row["chosen"]) for row in read_out(tmp_path)] == [
        ("cmv:t1_0", True, "first reply to 0"), ("cmv:t1_1", False, "first reply to 1")]
    assert metrics["labelled"] == 2 and metrics["ties"] == 1


LABEL_COMMAND = r"label the pool with `python -m tools\.label_server --pool .*pool\.jsonl --labels .*labels\.jsonl`$"


@pytest.mark.parametrize("rows, message", [
    ([], r"labels\.jsonl: no labels; " + LABEL_COMMAND),
    (["", "  "], r"labels\.jsonl: no labels; " + LABEL_COMMAND),
    ([label(0, "1"), label(9, "2")],
     r"labels\.jsonl:2: prompt_id 'cmv:t1_9' is not in the pool .*pool\.jsonl \(a label for an earlier pool\? "
     r"remove the line\)$"),
    ([label(0, "3")], r"labels\.jsonl:1: preference must be \"1\", \"2\" or \"tie\", got '3'$"),
    ([label(0, "1"), "", label(1, 2)], r"labels\.jsonl:3: preference must be \"1\", \"2\" or \"tie\", got 2$"),
    ([label(0, "1"), label(1, "2"), label(0, "tie")],
     r"labels\.jsonl:3: duplicate label for prompt_id 'cmv:t1_0' \(first at line 1\)$"),
    ([{k: v for k, v in label(0, "1").items() if k != "response_2"}],
     r"labels\.jsonl:1: record missing required field 'response_2'$"),
    ([label(0, "1"), '{"prompt_id": '], r"labels\.jsonl:2: malformed JSON: "),
    ([{**label(0, "1"), "prompt_id": 7}], r"labels\.jsonl:1: 'prompt_id' must be a string, got 7$"),
])
def test_bad_labels_are_one_line_naming_file_and_line(tmp_path, pool, rows, message):
    labels = write_lines(tmp_path / "labels.jsonl", rows)
    with pytest.raises(StageError, match="^" + re.escape(f"{tmp_path}/") + message):
        run(tmp_path, pool, labels)
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


def test_missing_labels_file_says_how_to_make_one(tmp_path, pool):
    with pytest.raises(StageError, match=r"labels\.jsonl: labels file not found; " + LABEL_COMMAND):
        run(tmp_path, pool, tmp_path / "labels.jsonl")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, message", [
    ([pool_record(0), {**pool_record(1), "metadata": {"source": "cmv"}}], r"pool\.jsonl:2: record has no metadata\.prompt_id$"),
    ([pool_record(0), pool_record(1), pool_record(0)], r"pool\.jsonl:3: duplicate prompt_id 'cmv:t1_0' \(first at line 1\)$"),
    ([{k: v for k, v in pool_record(0).items() if k != "response_1"}], r"pool\.jsonl:1: record missing required field 'response_1'$"),
    ([{**pool_record(0), "response_2": None}], r"pool\.jsonl:1: 'response_2' must be a string$"),
])
def test_bad_pool_records_name_file_and_line(tmp_path, rows, message):
    pool = write_lines(tmp_path / "pool.jsonl", rows)
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1")])
    with pytest.raises(StageError, match=message):
        run(tmp_path, pool, labels)
    assert not (tmp_path / "out").exists()


def test_missing_pool_is_named(tmp_path):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1")])
    with pytest.raises(StageError, match=r"pool\.jsonl: input not found$"):
        run(tmp_path, tmp_path / "pool.jsonl", labels)


def test_min_labels_stops_a_half_labelled_pool(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1"), label(1, "2")])
    with pytest.raises(StageError, match=r"^label_human\.min_labels: .*labels\.jsonl has 2 labels, fewer than the 3 "
                                         r"asked for; label more with `python -m tools\.label_server"):
        run(tmp_path, pool, labels, min_labels=3)
    assert not (tmp_path / "out").exists()
    assert run(tmp_path, pool, labels, min_labels=2)["labelled"] == 2


@pytest.mark.parametrize("section, message", [
    ({"min_labels": 0}, r"^label_human\.min_labels: must be at least 1, got 0$"),
    ({"min_label": 3}, r"^label_human\.min_label: unknown key \(did you mean 'min_labels'\?\)$"),
])
def test_bad_params_name_the_key(tmp_path, pool, section, message):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1")])
    with pytest.raises(StageError, match=message):
        run(tmp_path, pool, labels, **section)


@pytest.mark.parametrize("pool_name", ["human", "eval"])
def test_shipped_labels_are_well_formed_and_cover_the_generated_pool(tmp_path, pool_name):
    shipped_labels = REPO_ROOT / "data" / "raw" / "labels" / f"{pool_name}.jsonl"
    shipped_pool = REPO_ROOT / "data" / "preferences" / f"{pool_name}.jsonl"
    labels = read_labels(shipped_labels)
    assert labels and all(label["labeller"] for _, label in labels)
    if not shipped_pool.exists():
        pytest.skip(f"{shipped_pool.relative_to(REPO_ROOT)} not generated yet (dvc repro generate_preferences)")
    metrics = run(tmp_path, shipped_pool, shipped_labels)
    rows = read_out(tmp_path)
    assert metrics["labelled"] == len(rows) == len(labels)
    assert metrics["pool_prompts"] == metrics["labelled"] + metrics["unlabelled"]
    assert metrics["ties"] + metrics["preferred_1"] + metrics["preferred_2"] == metrics["labelled"]
    assert sum(row["metadata"]["is_equal"] for row in rows) == metrics["ties"]
    for row in rows:
        assert row["metadata"]["grader"] == "human" and row["metadata"]["pool"] == pool_name
        assert row["prompt"][-1]["role"] == "user"


def test_labels_of_the_held_out_pool_become_held_out_pairs(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1"), label(2, "2")])
    eval_pool = write_lines(tmp_path / "eval_pool.jsonl", [{**pool_record(i), "metadata": {
        **pool_record(i)["metadata"], "pool": "eval"}} for i in range(10, 14)])
    eval_labels = write_lines(tmp_path / "eval_labels.jsonl", [label(13, "2", "bo"), label(11, "tie", "bo"),
                                                              label(10, "1", "bo")])
    params = params_file(tmp_path / "params.yaml", {"label_human": {"min_labels": 2}})
    metrics = label_human.main(["--params", str(params), "--pool", str(pool), "--labels", str(labels),
                                "--out", str(tmp_path / "out" / "human.jsonl"), "--metrics", str(tmp_path / "m.json"),
                                "--eval-pool", str(eval_pool), "--eval-labels", str(eval_labels),
                                "--eval-out", str(tmp_path / "out" / "eval_human.jsonl")])
    assert metrics["labelled"] == 2 and metrics["eval"] == {
        "pool_prompts": 4, "labelled": 3, "ties": 1, "preferred_1": 1, "preferred_2": 1, "unlabelled": 1,
        "labels_on_earlier_samples": 0}
    held_out = [json.loads(line) for line in (tmp_path / "out" / "eval_human.jsonl").read_text().splitlines()]
    assert [r["metadata"]["prompt_id"] for r in held_out] == ["cmv:t1_10", "cmv:t1_11", "cmv:t1_13"]  # pool order
    assert held_out[2]["chosen"] == "second reply to 13" and held_out[2]["rejected"] == "first reply to 13"
    assert held_out[1]["metadata"]["is_equal"] and held_out[0]["metadata"]["labeller"] == "bo"
    assert all(r["metadata"]["pool"] == "eval" and r["metadata"]["grader"] == "human" for r in held_out)


def test_held_out_labels_are_checked_like_training_labels(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1")])
    eval_labels = write_lines(tmp_path / "eval_labels.jsonl", [label(3, "1")])
    common = ["--pool", str(pool), "--labels", str(labels), "--out", str(tmp_path / "h.jsonl"),
              "--metrics", str(tmp_path / "m.json")]
    with pytest.raises(StageError, match=r"^label_human: --eval-pool needs --eval-labels and --eval-out$"):
        label_human.main([*common, "--eval-pool", str(pool)])
    other_pool = write_lines(tmp_path / "eval_pool.jsonl", [pool_record(i) for i in range(10, 12)])
    with pytest.raises(StageError, match=r"eval_labels\.jsonl:1: prompt_id 'cmv:t1_3' is not in the pool "
                                         r".*eval_pool\.jsonl"):
        label_human.main([*common, "--eval-pool", str(other_pool), "--eval-labels", str(eval_labels),
                          "--eval-out", str(tmp_path / "e.jsonl")])
    assert not (tmp_path / "h.jsonl").exists() and not (tmp_path / "e.jsonl").exists()


def vote(i: int, preference: str, models=("base", "sft/persona")) -> dict:
    return {"prompt_id": f"tryout-{i:012x}", "preference": preference, "response_1": f"left reply {i}",
            "response_2": f"right reply {i}", "labeller": "cy",
            "prompt": [{"role": "user", "content": f"typed message {i}"}], "models": list(models),
            "settings": {"temperature": 0.7, "top_p": 0.95, "seed": 0, "max_new_tokens": 256, "system": None}}


@pytest.mark.parametrize("include", [False, True])
def test_tryout_votes_join_the_pairs_only_when_asked(tmp_path, pool, include):
    labels = write_lines(tmp_path / "labels.jsonl", [label(1, "1")])
    votes = write_lines(tmp_path / "tryout.jsonl", [vote(1, "2"), vote(2, "tie", ("rl", "base"))])
    metrics = run(tmp_path, pool, labels, extra=["--tryout-votes", str(votes)], include_tryout=include)
    assert metrics["tryout"] == {"votes": 2, "included": include, "ties": 1}
    assert metrics["labelled"] == 1  # the pool's own count
    rows = read_out(tmp_path)
    assert rows[0]["metadata"]["prompt_id"] == "cmv:t1_1"
    if not include:
        assert len(rows) == 1
        return
    first, tie = rows[1:]
    assert first["prompt"] == [{"role": "user", "content": "typed message 1"}]
    assert (first["chosen"], first["rejected"]) == ("right reply 1", "left reply 1")
    assert first["metadata"] == {"prompt_id": "tryout-000000000001", "pool": "tryout", "grader": "human",
                                 "preference": "2", "is_equal": False, "labeller": "cy",
                                 "models": ["base", "sft/persona"], "chosen_model": "sft/persona"}
    assert (tie["chosen"], tie["metadata"]["is_equal"], tie["metadata"]["chosen_model"]) == ("left reply 2", True, "rl")


def test_a_votes_file_written_by_the_page_feeds_the_stage(tmp_path, pool):
    from stages.lib.votes import append_vote

    votes = tmp_path / "labels" / "tryout.jsonl"
    for i, preference in enumerate(("1", "2", "tie")):
        append_vote(votes, vote(i, preference))
    assert len(votes.read_text().splitlines()) == 3
    assert sorted(p.name for p in votes.parent.iterdir()) == [".tryout.jsonl.lock", "tryout.jsonl"]  # no temporaries
    labels = write_lines(tmp_path / "labels.jsonl", [label(1, "1")])
    metrics = run(tmp_path, pool, labels, extra=["--tryout-votes", str(votes)], include_tryout=True)
    assert metrics["tryout"]["votes"] == 3 and len(read_out(tmp_path)) == 4


@pytest.mark.parametrize("bad, message", [
    ({"preference": "left"}, r"tryout\.jsonl:2: preference must be \"1\", \"2\" or \"tie\", got 'left'$"),
    ({"models": ["base"]}, r"tryout\.jsonl:2: 'models' must name the two models, got \['base'\]$"),
    ({"prompt": []}, r"tryout\.jsonl:2: prompt: 'messages' must be a non-empty list$"),
    ({"prompt_id": "tryout-000000000000"}, r"tryout\.jsonl:2: duplicate vote id 'tryout-000000000000' \(first at line 1\)$"),
])
def test_a_bad_vote_stops_the_stage_at_its_line_and_writes_nothing(tmp_path, pool, bad, message):
    labels = write_lines(tmp_path / "labels.jsonl", [label(1, "1")])
    votes = write_lines(tmp_path / "tryout.jsonl", [vote(0, "1"), {**vote(1, "1"), **bad}])
    with pytest.raises(StageError, match=message):
        run(tmp_path, pool, labels, extra=["--tryout-votes", str(votes)])
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


def test_including_votes_without_a_votes_file_is_a_line(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(1, "1")])
    with pytest.raises(StageError, match=r"^label_human\.include_tryout: true needs --tryout-votes"):
        run(tmp_path, pool, labels, include_tryout=True)
