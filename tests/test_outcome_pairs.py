import itertools
import json
from pathlib import Path

import pytest

from stages import outcome_pairs
from stages.lib import StageError
from tests.conftest import REPO_ROOT, metrics_result, params_file

# (id, speaker, reply-to, success, pair_ids, text), three posts.
THREAD = [
    ("t3_a", "op_a", None, None, [], "Body of post A &amp; more."),
    ("t1_aw1", "alice", "t3_a", 1, ["p_1"], "Winner one: &gt; quoted\n\nand a reason."),
    ("t1_ad1", "op_a", "t1_aw1", 1, ["p_1"], "Deeper in the winning branch, not a branch opener."),
    ("t1_aw2", "bob", "t3_a", 1, ["p_2"], "Winner two."),
    ("t1_al1", "carol", "t3_a", 0, ["p_1", "p_2"], "Loser one."),
    ("t1_al2", "dave", "t3_a", 0, ["p_1"], "Loser two, café ’quotes’."),
    ("t1_ax", "erin", "t3_a", None, [], "Just a comment."),
    ("t3_b", "op_b", None, None, [], "Body of post B."),
    ("t1_bw1", "[deleted]", "t3_b", 1, ["p_3"], "[deleted]"),
    ("t1_bl1", "frank", "t3_b", 0, ["p_3"], "A loser whose winner is gone."),
    ("t1_bw2", "gina", "t3_b", 1, ["p_4"], "A winner whose loser was removed."),
    ("t1_bl2", "hank", "t3_b", 0, ["p_4"], "[removed]"),
    ("t1_bw3", "ivy", "t3_b", 1, ["p_5"], "A winner whose loser is empty."),
    ("t1_bl3", "jack", "t3_b", 0, ["p_5"], "  \r\n "),
    ("t1_bw4", "kate", "t3_b", 1, ["p_6", "p_7"], "Winner under two pair ids."),
    ("t1_bl4", "leo", "t3_b", 0, ["p_6", "p_7"], "Loser under the same two."),
    ("t3_c", "op_c", None, None, [], "Body of post C, from the post itself."),
    ("t1_cw1", "mia", "t3_c", 1, ["p_8"], "Winner C."),
    ("t1_cl1", "ned", "t3_c", 0, ["p_8"], "Loser C."),
]
CONVERSATIONS = {
    "t3_a": {"op-userID": "op_a", "op-title": "CMV: Post A", "op-text-body": "Body of post A &amp; more.",
             "pair_ids": ["p_1", "p_2"], "train": 1},
    "t3_b": {"op-userID": "op_b", "op-title": "CMV: Post B", "op-text-body": "Body of post B.",
             "pair_ids": ["p_3", "p_4", "p_5", "p_6", "p_7"], "train": 1},
    "t3_c": {"op-userID": "op_c", "op-title": "CMV: Post C", "pair_ids": ["p_8"], "train": 0},
}
# (conversation, pair id, chosen, rejected) in corpus order.
EXPECTED = [
    ("t3_a", "p_1", "t1_aw1", "t1_al1"),
    ("t3_a", "p_1", "t1_aw1", "t1_al2"),
    ("t3_a", "p_2", "t1_aw2", "t1_al1"),
    ("t3_b", "p_6", "t1_bw4", "t1_bl4"),
    ("t3_c", "p_8", "t1_cw1", "t1_cl1"),
]


def write_corpus(root: Path, layout: str = "old", thread=THREAD, conversations=CONVERSATIONS) -> Path:
    """A ConvoKit corpus directory in the `old` (hosted zip) or `current` layout."""
    root.mkdir(parents=True, exist_ok=True)
    speaker_key, conversation_key = ("user", "root") if layout == "old" else ("speaker", "conversation_id")
    lines, root_of = [], {}
    for timestamp, (uid, speaker, reply_to, success, pair_ids, text) in enumerate(thread):
        root_of[uid] = uid if reply_to is None else root_of[reply_to]
        meta = {"pair_ids": pair_ids, "success": success, "replies": [u[0] for u in thread if u[2] == uid],
                "score": 2}
        record = {"id": uid, speaker_key: speaker, conversation_key: root_of[uid], "reply-to": reply_to,
                  "timestamp": 1400000000 + timestamp, "text": text, "meta": meta}
        if layout == "current":
            record["vectors"] = []
        lines.append(json.dumps(record, ensure_ascii=False))
    (root / "utterances.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if layout == "current":
        conversations = {cid: {"meta": meta, "vectors": []} for cid, meta in conversations.items()}
    (root / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False), encoding="utf-8")
    speakers = {u[1]: {} for u in thread}
    (root / ("users.json" if layout == "old" else "speakers.json")).write_text(json.dumps(speakers))
    return root


def run(tmp_path: Path, corpus: Path, out: str = "pairs", **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"outcome_pairs": section} if section else None)
    return outcome_pairs.main(["--params", str(params), "--corpus", str(corpus), "--out", str(tmp_path / out),
                               "--metrics", str(tmp_path / f"{out}.metrics.json")])


def read_pairs(directory: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (directory / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "test")}


def keys(pairs: list[dict]) -> list[tuple]:
    return [tuple(p["metadata"][k] for k in ("conversation_id", "pair_id", "chosen_id", "rejected_id")) for p in pairs]


def many_posts_corpus(root: Path, posts: int = 40) -> Path:
    """`posts` posts; post i has (i % 4) + 1 pairs under one pair id: one winner, that many losers."""
    thread, conversations = [], {}
    for i in range(posts):
        post, pair = f"t3_p{i:02d}", f"p_{i}"
        thread.append((post, f"op{i}", None, None, [], f"Body {i}."))
        thread.append((f"t1_w{i:02d}", f"w{i}", post, 1, [pair], f"Winner of post {i}."))
        thread.extend((f"t1_l{i:02d}_{j}", f"l{i}_{j}", post, 0, [pair], f"Loser {j} of post {i}.")
                      for j in range(i % 4 + 1))
        conversations[post] = {"op-userID": f"op{i}", "op-title": f"CMV: Post {i}", "op-text-body": f"Body {i}.",
                               "pair_ids": [pair], "train": 1}
    return write_corpus(root, thread=thread, conversations=conversations)


def test_pairs_are_exactly_the_winner_loser_combinations_of_each_pair_id(tmp_path):
    metrics = run(tmp_path, write_corpus(tmp_path / "corpus"))
    splits = read_pairs(tmp_path / "pairs")
    every = splits["train"] + splits["test"]
    assert sorted(keys(every)) == sorted(EXPECTED)
    for split in splits.values():  # each file keeps corpus order
        assert keys(split) == [k for k in EXPECTED if k in keys(split)]
    by_key = dict(zip(keys(every), every))
    first = by_key[EXPECTED[0]]
    assert first["prompt"] == [{"role": "user", "content": "CMV: Post A\n\nBody of post A & more."}]
    assert first["chosen"] == "Winner one: > quoted\n\nand a reason."
    assert first["rejected"] == "Loser one."
    assert first["metadata"] == {"source": "cmv", "conversation_id": "t3_a", "pair_id": "p_1",
                                 "chosen_id": "t1_aw1", "rejected_id": "t1_al1"}
    assert by_key[EXPECTED[1]]["rejected"] == "Loser two, café ’quotes’."
    # No op-text-body: the post utterance's own text.
    assert by_key[EXPECTED[4]]["prompt"][0]["content"] == "CMV: Post C\n\nBody of post C, from the post itself."
    assert list(first) == ["prompt", "chosen", "rejected", "metadata"]
    assert metrics["pairs"] == metrics["train_pairs"] + metrics["test_pairs"] == 5
    assert {k: metrics[k] for k in ("pair_ids", "dropped_deleted", "dropped_removed", "dropped_empty",
                                    "pair_ids_without_winner", "pair_ids_without_loser", "duplicate_pairs")} == {
        "pair_ids": 8, "dropped_deleted": 1, "dropped_removed": 1, "dropped_empty": 1,
        "pair_ids_without_winner": 1, "pair_ids_without_loser": 2, "duplicate_pairs": 1}
    assert json.loads((tmp_path / "pairs.metrics.json").read_text()) == metrics


def test_every_winner_is_paired_with_every_loser(tmp_path):
    thread = [("t3_x", "op", None, None, [], "Body.")]
    thread += [(f"t1_w{i}", f"w{i}", "t3_x", 1, ["p_9"], f"Winner {i}.") for i in range(2)]
    thread += [(f"t1_l{i}", f"l{i}", "t3_x", 0, ["p_9"], f"Loser {i}.") for i in range(3)]
    thread += [("t1_y", "y", "t3_x", 1, ["p_10"], "Another post's pair id lives here."),
               ("t3_z", "op2", None, None, [], "Body 2."), ("t1_zl", "z", "t3_z", 0, ["p_10"], "Not the same post."),
               ("t1_zw", "zw", "t3_z", 1, ["p_11"], "Winner Z."), ("t1_zl2", "zl", "t3_z", 0, ["p_11"], "Loser Z.")]
    conversations = {"t3_x": {"op-title": "CMV: X", "op-text-body": "Body.", "pair_ids": ["p_9", "p_10"]},
                     "t3_z": {"op-title": "CMV: Z", "op-text-body": "Body 2.", "pair_ids": ["p_10", "p_11"]}}
    metrics = run(tmp_path, write_corpus(tmp_path / "corpus", thread=thread, conversations=conversations),
                  test_ratio=0.5)
    splits = read_pairs(tmp_path / "pairs")
    every = keys(splits["train"] + splits["test"])
    winners, losers = ["t1_w0", "t1_w1"], ["t1_l0", "t1_l1", "t1_l2"]
    assert sorted(every) == sorted([("t3_x", "p_9", w, l) for w, l in itertools.product(winners, losers)]
                                   + [("t3_z", "p_11", "t1_zw", "t1_zl2")])
    # A pair id is one post's: p_10 in t3_x has no loser there, nor in t3_z a winner.
    assert metrics["pair_ids_without_loser"] == 1 and metrics["pair_ids_without_winner"] == 1


def test_both_layouts_give_the_same_pairs(tmp_path):
    run(tmp_path, write_corpus(tmp_path / "old", "old"), "old")
    run(tmp_path, write_corpus(tmp_path / "current", "current"), "current")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "current" / name).read_bytes()
    assert metrics_result(tmp_path / "old.metrics.json") == metrics_result(tmp_path / "current.metrics.json")


def test_split_is_by_post_seeded_and_near_the_ratio(tmp_path):
    corpus = many_posts_corpus(tmp_path / "corpus")
    metrics = run(tmp_path, corpus, "a", test_ratio=0.25, seed=0)
    run(tmp_path, corpus, "b", test_ratio=0.25, seed=0)
    run(tmp_path, corpus, "c", test_ratio=0.25, seed=1)
    splits = read_pairs(tmp_path / "a")
    train_posts = {p["metadata"]["conversation_id"] for p in splits["train"]}
    test_posts = {p["metadata"]["conversation_id"] for p in splits["test"]}
    assert train_posts and test_posts and not train_posts & test_posts
    assert len(train_posts | test_posts) == 40 and metrics["pairs"] == 100
    # Whole posts are dealt until the share is reached: it overshoots by less than one post (at most 4 pairs).
    assert 0.25 <= metrics["test_pairs"] / metrics["pairs"] < 0.25 + 4 / 100
    assert metrics["test_posts"] == len(test_posts) and metrics["train_posts"] == len(train_posts)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = {p["metadata"]["conversation_id"] for p in read_pairs(tmp_path / "c")["test"]}
    assert other != test_posts
    assert metrics["train_chosen_chars_mean"] == round(
        sum(len(p["chosen"]) for p in splits["train"]) / len(splits["train"]), 2)


def test_shipped_sample(tmp_path):
    metrics = run(tmp_path, REPO_ROOT / "data" / "raw" / "cmv")
    splits = read_pairs(tmp_path / "pairs")
    every = splits["train"] + splits["test"]
    assert metrics["pairs"] == len(every) >= 250
    assert not ({p["metadata"]["conversation_id"] for p in splits["train"]}
                & {p["metadata"]["conversation_id"] for p in splits["test"]})
    assert 0.25 <= metrics["test_pairs"] / metrics["pairs"] < 0.35
    assert metrics["dropped_deleted"] and metrics["pair_ids_without_winner"]
    assert len(set(keys(every))) == len(every)
    for pair in every:
        assert pair["prompt"][0]["content"].startswith("CMV: ")
        for side in ("chosen", "rejected"):
            assert pair[side] and pair[side] not in ("[deleted]", "[removed]") and "&gt;" not in pair[side]
    # Length alone does not tell the winner.
    longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in every) / len(every)
    assert 0.3 < longer < 0.7


@pytest.mark.parametrize("section, message", [
    ({"test_ratio": 0}, r"^outcome_pairs\.test_ratio: must be between 0 and 1 \(exclusive\), got 0"),
    ({"test_ratio": 1.5}, r"^outcome_pairs\.test_ratio: must be between 0 and 1"),
    ({"test_ratio": "a lot"}, r"^outcome_pairs\.test_ratio: "),
    ({"test_ratio": 0.99}, r"^outcome_pairs\.test_ratio: 0\.99 leaves no post for train"),
    ({"sead": 1}, r"^outcome_pairs\.sead: unknown key \(did you mean 'seed'\?\)$"),
])
def test_bad_params_name_the_key(tmp_path, section, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, write_corpus(tmp_path / "corpus"), **section)
    assert not (tmp_path / "pairs").exists()


def test_a_corpus_without_pairs_is_a_one_line_error(tmp_path):
    thread = [row for row in THREAD if row[0].startswith(("t3_", "t1_b")) and row[0] not in ("t1_bw4", "t1_bl4")]
    corpus = write_corpus(tmp_path / "corpus", thread=thread)
    with pytest.raises(StageError) as error:
        run(tmp_path, corpus)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{corpus}: no outcome pairs")
    assert "dropped_deleted=1" in message and "pair_ids_without_loser=2" in message
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "pairs.metrics.json").exists()


def test_one_post_leaves_nothing_for_train(tmp_path):
    thread = [row for row in THREAD if row[0] in ("t3_c", "t1_cw1", "t1_cl1")]
    with pytest.raises(StageError, match=r"^outcome_pairs\.test_ratio: 0\.25 leaves no post for train "
                                         r"\(1 pairs in 1 posts\)$"):
        run(tmp_path, write_corpus(tmp_path / "corpus", thread=thread))
    assert not (tmp_path / "pairs").exists()


def test_bad_utterance_line_names_file_and_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with open(corpus / "utterances.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"id": "t1_x", "user": "a", "root": "t3_a", "reply-to": "t1_nope", "text": "hi", "meta": {}}\n')
    with pytest.raises(StageError, match=rf"utterances\.jsonl:{len(THREAD) + 1}: reply-to 't1_nope' is not an "
                                         r"utterance in the corpus$"):
        run(tmp_path, corpus)
    corpus = write_corpus(tmp_path / "other")
    (corpus / "conversations.json").unlink()
    with pytest.raises(StageError, match=r"other/conversations\.json: ConvoKit conversations file not found$"):
        run(tmp_path, corpus)
    assert not (tmp_path / "pairs").exists()
