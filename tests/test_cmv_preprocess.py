import json
from pathlib import Path

import pytest

from stages import cmv_preprocess
from stages.lib import StageError
from stages.lib.models import load_tokenizer
from tests.conftest import REPO_ROOT, metrics_result, params_file

TITLE = "CMV: Cats are better pets than dogs"
BODY = "Cats are independent &amp; clean.\n\n&gt; a cat is a gentleman\n\nDogs need walks twice a day."
# (id, speaker, reply-to, success, text): one thread with a winning chain four comments deep.
THREAD = [
    ("t3_post", "op_user", None, None, BODY),
    ("t1_c1", "alice", "t3_post", 1, "Dogs are loyal &amp; they keep you active, which matters for your health."),
    ("t1_c2", "op_user", "t1_c1", 1, "I can walk without a dog though."),
    ("t1_c3", "carol", "t1_c2", None, "Not OP, but walking alone is boring."),
    ("t1_c4", "alice", "t1_c3", 1,
     "&gt; walking alone is boring\n\nExactly, and a dog makes the walk social. You meet people."),
    ("t1_c5", "op_user", "t1_c4", 1, "Fair point. ∆ Dogs do make walks social."),
    ("t1_c6", "DeltaBot", "t1_c5", 1, "Confirmed: 1 delta awarded to /u/alice."),
    ("t1_c7", "[deleted]", "t3_post", 1, "[deleted]"),
    ("t1_c8", "bob", "t1_c7", 1, "Whoever deleted that was right: cats also live longer than most dog breeds do."),
    ("t1_c9", "erin", "t3_post", 1, "[removed]"),
    ("t1_c10", "dave", "t3_post", 0, "Dogs are simply better and that is all there is to say about it."),
    ("t1_c11", "frank", "t3_post", 1, "Yes."),
]
CONVERSATION = {"op-userID": "op_user", "op-title": TITLE, "op-text-body": BODY, "pair_ids": ["p_1"], "train": 1}


def write_corpus(root: Path, layout: str = "old", thread=THREAD, conversation=CONVERSATION) -> Path:
    """A ConvoKit corpus directory in the `old` (hosted zip) or `current` layout."""
    root.mkdir(parents=True, exist_ok=True)
    speaker_key, conversation_key = ("user", "root") if layout == "old" else ("speaker", "conversation_id")
    lines = []
    for timestamp, (uid, speaker, reply_to, success, text) in enumerate(thread):
        replies = [u[0] for u in thread if u[2] == uid]
        meta = {"pair_ids": ["p_1"] if success is not None else [], "success": success, "replies": replies,
                "score": 3, "author_flair_text": None}
        record = {"id": uid, speaker_key: speaker, conversation_key: "t3_post", "reply-to": reply_to,
                  "timestamp": 1400000000 + timestamp, "text": text, "meta": meta}
        if layout == "current":
            record["vectors"] = []
        lines.append(json.dumps(record, ensure_ascii=False))
    (root / "utterances.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    conversations = {"t3_post": conversation if layout == "old" else {"meta": conversation, "vectors": []}}
    (root / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False, indent=1), encoding="utf-8")
    speakers = {u[1]: {} if layout == "old" else {"meta": {}, "vectors": []} for u in thread}
    (root / ("users.json" if layout == "old" else "speakers.json")).write_text(json.dumps(speakers))
    (root / "corpus.json").write_text("{}")
    (root / "index.json").write_text(json.dumps({"utterances-index": {}, "version": 1}))
    return root


def run(tmp_path: Path, tokenizer: Path, corpus: Path, out_name: str = "cmv.jsonl", **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"cmv_preprocess": section})
    return cmv_preprocess.main(["--params", str(params), "--corpus", str(corpus), "--tokenizer", str(tokenizer),
                                "--out", str(tmp_path / out_name), "--metrics", str(tmp_path / f"{out_name}.metrics.json")])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


LOOSE = dict(min_tokens=5, max_tokens=5000, max_context_tokens=None)


def test_context_follows_the_reply_chain_root_first(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "corpus"), **LOOSE)
    rows = read_rows(tmp_path / "cmv.jsonl")
    assert [row["metadata"]["utterance_id"] for row in rows] == ["t1_c1", "t1_c4", "t1_c8"]

    post = ("OP: CMV: Cats are better pets than dogs\nCats are independent & clean.\n\n"
            "> a cat is a gentleman\n\nDogs need walks twice a day.")
    first, deep, under_deleted = rows
    assert first["context"] == post
    assert first["response"] == "Dogs are loyal & they keep you active, which matters for your health."
    assert deep["context"] == "\n\n".join([
        post,
        "Persuader: Dogs are loyal & they keep you active, which matters for your health.",
        "OP: I can walk without a dog though.",
        "Commenter: Not OP, but walking alone is boring.",
    ])
    assert deep["response"] == "> walking alone is boring\n\nExactly, and a dog makes the walk social. You meet people."
    assert under_deleted["context"] == post + "\n\nCommenter: [deleted]"

    tokenizer = load_tokenizer(tiny_model_dir)
    assert deep["metadata"] == {
        "source": "cmv", "conversation_id": "t3_post", "utterance_id": "t1_c4", "depth": 3, "pair_ids": ["p_1"],
        "response_tokens": len(tokenizer(deep["response"], add_special_tokens=False)["input_ids"]),
        "context_tokens": len(tokenizer(deep["context"], add_special_tokens=False)["input_ids"]),
        "context_truncated": False,
    }
    assert [row["metadata"]["depth"] for row in rows] == [0, 3, 1]
    assert metrics["candidates"] == 9 and metrics["kept"] == 3
    assert {k: v for k, v in metrics.items() if k.startswith("dropped_") and v} == {
        "dropped_deleted": 1, "dropped_removed": 1, "dropped_op_reply": 2, "dropped_excluded_speaker": 1,
        "dropped_too_short": 1}
    assert metrics["utterances"] == 12 and metrics["conversations"] == 1 and metrics["conversations_kept"] == 1
    assert json.loads((tmp_path / "cmv.jsonl.metrics.json").read_text()) == metrics


def test_old_and_current_layouts_give_identical_output(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "old", "old"), "old.jsonl", **LOOSE)
    run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "current", "current"), "current.jsonl", **LOOSE)
    assert (tmp_path / "old.jsonl").read_bytes() == (tmp_path / "current.jsonl").read_bytes()
    assert metrics_result(tmp_path / "old.jsonl.metrics.json") == metrics_result(tmp_path / "current.jsonl.metrics.json")
    assert len(read_rows(tmp_path / "old.jsonl")) == 3


def test_post_body_falls_back_to_the_root_utterance(tmp_path, tiny_model_dir):
    conversation = {k: v for k, v in CONVERSATION.items() if k != "op-text-body"}
    thread = [("t3_post", "op_user", None, None, "Body from the post itself &lt;3")] + THREAD[1:2]
    run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "corpus", thread=thread, conversation=conversation), **LOOSE)
    assert read_rows(tmp_path / "cmv.jsonl")[0]["context"] == f"OP: {TITLE}\nBody from the post itself <3"


def test_exclude_speakers_is_a_param(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "corpus"), exclude_speakers=["alice"], **LOOSE)
    ids = [row["metadata"]["utterance_id"] for row in read_rows(tmp_path / "cmv.jsonl")]
    assert ids == ["t1_c6", "t1_c8"]
    assert metrics["dropped_excluded_speaker"] == 2


def test_token_bounds_are_inclusive(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    responses = {uid: cmv_preprocess.clean_text(text) for uid, _, _, _, text in THREAD}
    tokens = {uid: len(tokenizer(text, add_special_tokens=False)["input_ids"]) for uid, text in responses.items()}
    target = tokens["t1_c4"]
    assert tokens["t1_c1"] != target and tokens["t1_c8"] != target
    metrics = run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "corpus"),
                  min_tokens=target, max_tokens=target, max_context_tokens=None)
    rows = read_rows(tmp_path / "cmv.jsonl")
    assert [row["metadata"]["utterance_id"] for row in rows] == ["t1_c4"]
    assert rows[0]["metadata"]["response_tokens"] == target
    shorter = sum(tokens[u] < target for u in ("t1_c1", "t1_c8", "t1_c11"))
    assert metrics["dropped_too_short"] == shorter and metrics["dropped_too_long"] == 3 - shorter


def test_context_is_cut_from_the_front_and_marked(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus")
    run(tmp_path, tiny_model_dir, corpus, "full.jsonl", **LOOSE)
    metrics = run(tmp_path, tiny_model_dir, corpus, "cut.jsonl", **{**LOOSE, "max_context_tokens": 40})
    full, cut = read_rows(tmp_path / "full.jsonl"), read_rows(tmp_path / "cut.jsonl")
    tokenizer = load_tokenizer(tiny_model_dir)
    assert [r["response"] for r in full] == [r["response"] for r in cut]
    for before, after in zip(full, cut):
        assert before["metadata"]["context_tokens"] > 40
        assert after["metadata"]["context_truncated"] is True
        assert after["context"].startswith("[...] ")
        assert before["context"].endswith(after["context"][len("[...] "):])
        assert after["metadata"]["context_tokens"] == len(tokenizer(after["context"], add_special_tokens=False)["input_ids"])
        assert 30 <= after["metadata"]["context_tokens"] <= 40
    # The deepest context keeps the end of its most recent turn, not the original post.
    assert cut[1]["context"].endswith("Not OP, but walking alone is boring.")
    assert "Cats are independent" not in cut[1]["context"]
    assert metrics["contexts_truncated"] == 3 and metrics["context_tokens_max"] <= 40


def test_rerun_is_byte_identical(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus")
    run(tmp_path, tiny_model_dir, corpus, "a.jsonl", **{**LOOSE, "max_context_tokens": 40})
    run(tmp_path, tiny_model_dir, corpus, "b.jsonl", **{**LOOSE, "max_context_tokens": 40})
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert metrics_result(tmp_path / "a.jsonl.metrics.json") == metrics_result(tmp_path / "b.jsonl.metrics.json")


def test_shipped_sample(tmp_path, tiny_model_dir):
    # The tiny tokenizer spends about three tokens where SmolLM2 spends one: wider bounds.
    corpus = REPO_ROOT / "data" / "raw" / "cmv"
    metrics = run(tmp_path, tiny_model_dir, corpus, min_tokens=16, max_tokens=4096, max_context_tokens=1024)
    rows = read_rows(tmp_path / "cmv.jsonl")
    assert metrics["kept"] == len(rows) >= 150
    dropped = sum(v for k, v in metrics.items() if k.startswith("dropped_"))
    assert metrics["candidates"] == metrics["kept"] + dropped
    assert metrics["conversations"] >= 60 and metrics["conversations_kept"] >= 60
    assert metrics["dropped_deleted"] and metrics["dropped_removed"] and metrics["dropped_op_reply"]
    assert len({row["metadata"]["utterance_id"] for row in rows}) == len(rows)
    assert max(row["metadata"]["depth"] for row in rows) >= 4
    assert metrics["contexts_truncated"] == sum(row["metadata"]["context_truncated"] for row in rows) > 0
    for row in rows:
        meta = row["metadata"]
        assert row["response"] not in ("[deleted]", "[removed]") and row["response"] == row["response"].strip()
        assert 16 <= meta["response_tokens"] <= 4096 and meta["context_tokens"] <= 1024
        assert row["context"].startswith("[...] " if meta["context_truncated"] else "OP: CMV")
        for text in (row["context"], row["response"]):
            assert "&gt;" not in text and "&amp;" not in text
    assert any("\n> " in row["response"] or row["response"].startswith("> ") for row in rows)
    assert any("Commenter: [deleted]" in row["context"] or "OP: [deleted]" in row["context"] for row in rows)
    assert any(ch in row["response"] for row in rows for ch in "’“é🙂")


BAD_LINES = {
    "malformed": ('{"id": "t1_x", "user": "a", "root": "t3_post", "reply-to": "t3_post", "text": "hi"',
                  r"utterances\.jsonl:13: malformed JSON: "),
    "no_text": ('{"id": "t1_x", "user": "a", "root": "t3_post", "reply-to": "t3_post", "meta": {}}',
                r"utterances\.jsonl:13: record missing required field 'text'$"),
    "no_conversation": ('{"id": "t1_x", "user": "a", "reply-to": "t3_post", "text": "hi", "meta": {}}',
                        r"utterances\.jsonl:13: record missing required field 'conversation_id' \(old layout: 'root'\)$"),
    "unknown_parent": ('{"id": "t1_x", "user": "a", "root": "t3_post", "reply-to": "t1_nope", "text": "hi", "meta": {}}',
                       r"utterances\.jsonl:13: reply-to 't1_nope' is not an utterance in the corpus$"),
    "other_conversation": ('{"id": "t1_x", "user": "a", "root": "t3_other", "reply-to": "t1_c1", "text": "hi", "meta": {}}',
                           r"utterances\.jsonl:13: reply-to 't1_c1' is in conversation 't3_post', not 't3_other'$"),
    "duplicate": ('{"id": "t1_c4", "user": "a", "root": "t3_post", "reply-to": "t1_c1", "text": "hi", "meta": {}}',
                  r"utterances\.jsonl:13: duplicate utterance id 't1_c4' \(first on line 5\)$"),
    "reply_loop": ('{"id": "t1_x", "user": "a", "root": "t3_post", "reply-to": "t1_x", "text": "hi", '
                   '"meta": {"success": 1}}',
                   r"utterances\.jsonl:13: reply-to chain of 't1_x' loops back on itself$"),
    "text_not_string": ('{"id": "t1_x", "user": "a", "root": "t3_post", "reply-to": "t3_post", "text": 5, "meta": {}}',
                        r"utterances\.jsonl:13: field 'text' must be a string, got int$"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_utterance_line_names_file_and_line(tmp_path, tiny_model_dir, case):
    line, message = BAD_LINES[case]
    corpus = write_corpus(tmp_path / "corpus")
    with open(corpus / "utterances.jsonl", "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    with pytest.raises(StageError, match=message):
        run(tmp_path, tiny_model_dir, corpus, **LOOSE)
    assert not (tmp_path / "cmv.jsonl").exists() and not (tmp_path / "cmv.jsonl.metrics.json").exists()


def test_malformed_conversations_json_names_file_and_line(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "conversations.json").write_text('{"t3_post": {"op-title": "x",\n "train": 1,\n}}')
    with pytest.raises(StageError, match=r"conversations\.json:3: malformed JSON: "):
        run(tmp_path, tiny_model_dir, corpus, **LOOSE)
    assert not (tmp_path / "cmv.jsonl").exists()


def test_missing_corpus_files_are_named(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "conversations.json").unlink()
    with pytest.raises(StageError, match=r"conversations\.json: ConvoKit conversations file not found$"):
        run(tmp_path, tiny_model_dir, corpus, **LOOSE)
    with pytest.raises(StageError, match=r"nowhere/utterances\.jsonl: ConvoKit utterances file not found$"):
        run(tmp_path, tiny_model_dir, tmp_path / "nowhere", **LOOSE)
    assert not (tmp_path / "cmv.jsonl").exists()


def test_nothing_left_after_filtering_reports_reasons(tmp_path, tiny_model_dir):
    with pytest.raises(StageError, match=(
            r"corpus: no examples left after filtering \(9 candidates; dropped deleted=1, excluded_speaker=1, "
            r"op_reply=2, removed=1, too_short=4\); check cmv_preprocess\.min_tokens / cmv_preprocess\.max_tokens$")):
        run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "corpus"),
            min_tokens=4000, max_tokens=5000, max_context_tokens=None)
    assert not (tmp_path / "cmv.jsonl").exists() and not (tmp_path / "cmv.jsonl.metrics.json").exists()


@pytest.mark.parametrize("section, message", [
    (dict(min_tokens=600, max_tokens=512), r"^cmv_preprocess\.min_tokens: must not exceed max_tokens \(600 > 512\)$"),
    (dict(min_tokens=0), r"^cmv_preprocess\.min_tokens: must be at least 1, got 0$"),
    (dict(max_context_tokens=4),
     r"^cmv_preprocess\.max_context_tokens: must be at least 8 \(or null for no limit\), got 4$"),
    (dict(max_token=5), r"^cmv_preprocess\.max_token: unknown key \(did you mean 'max_tokens'\?\)$"),
])
def test_bad_params_name_the_key(tmp_path, tiny_model_dir, section, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, tiny_model_dir, write_corpus(tmp_path / "corpus"), **section)
    assert not (tmp_path / "cmv.jsonl").exists()
