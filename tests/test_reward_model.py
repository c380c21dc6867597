import json
import random

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


def style_split(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choice(STYLED if label else NEUTRAL).split()
        rng.shuffle(words)
        rows.append({"id": seed * 1000 + i, "texts": " ".join(words), "label": label})
    return rows


@pytest.fixture
def style_data(tmp_path):
    data = tmp_path / "style"
    for split, n, seed in (("train", 64, 1), ("validation", 16, 2), ("test", 24, 3)):
        write_jsonl(data / f"{split}.jsonl", style_split(n, seed))
    return data


def run(tmp_path, data, tiny_model_dir, **section):
    section = {"base": "policy", "max_length": 32, "trainer": dict(FAST), **section}
    params = params_file(tmp_path / "params.yaml", {"reward_model": section})
    return reward_model.main(["--params", str(params), "--data", str(data), "--policy", str(tiny_model_dir),
                              "--out", str(tmp_path / "reward"), "--metrics", str(tmp_path / "metrics.json"),
                              "--plots", str(tmp_path / "plots" / "reward_model")])


def test_classifier_separates_the_styles(workdir, style_data, tiny_model_dir):
    metrics = run(workdir, style_data, tiny_model_dir)
    assert metrics["roc_auc"] >= 0.9 and metrics["accuracy"] >= 0.8
    assert metrics["test_examples"] == 24 and metrics["train_examples"] == 64
    assert json.loads((workdir / "metrics.json").read_text()) == metrics

    reward_fn = load_reward_fn(workdir / "reward")
    styled, neutral = reward_fn(["you are so cute darling", "i love your smile"]), reward_fn(["the bus is late", "send the report"])
    assert min(styled) > max(neutral)
    assert metrics["mean_reward_target_style"] > metrics["mean_reward_neutral"]

    plots = workdir / "plots" / "reward_model"
    roc = json.loads((plots / "plots" / "sklearn" / "roc.json").read_text())["roc"]
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    assert (plots / "plots" / "images" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    card = (workdir / "reward" / "README.md").read_text()
    assert f"| roc_auc | {metrics['roc_auc']} |" in card and "train.jsonl" in card
    assert (plots / "plots" / "metrics" / "train" / "loss.tsv").is_file() or (plots / "plots" / "metrics" / "loss.tsv").is_file()


def test_pairwise_bradley_terry_training(workdir, style_data, tiny_model_dir):
    metrics = run(workdir, style_data, tiny_model_dir, objective="pairwise", pairs_per_example=2)
    assert metrics["objective"] == "pairwise" and metrics["roc_auc"] >= 0.85
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


@pytest.mark.parametrize("split, content, message", [
    ("train", [{"id": 1, "texts": "a", "label": 1}, {"id": 2, "texts": "b", "label": 1}],
     r"train\.jsonl: every row has label 1; a reward model needs both classes \(0 and 1\)$"),
    ("test", [{"id": 1, "texts": "a", "label": 1}, {"id": 2, "texts": "b", "label": 2}],
     r"test\.jsonl:2: label must be 0 or 1, got 2$"),
    ("validation", [{"id": 1, "texts": "", "label": 1}], r"validation\.jsonl:1: 'texts' must be a non-empty string$"),
    ("train", [{"id": 1, "text": "wrong column", "label": 1}], r"train\.jsonl:1: record missing required field 'texts'$"),
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
    with pytest.raises(StageError, match=r"^reward_model\.objectiv: unknown key \(did you mean 'objective'\?\)$"):
        run(workdir, style_data, tiny_model_dir, objectiv="pairwise")
    with pytest.raises(StageError, match=r"^reward_model\.trainer: output_dir is set by the stage, not in params$"):
        run(workdir, style_data, tiny_model_dir, trainer={"output_dir": "x"})
    with pytest.raises(StageError, match=r"^reward_model\.base: model directory 'no/such/model' does not exist$"):
        run(workdir, style_data, tiny_model_dir, base="no/such/model")
    with pytest.raises(StageError, match=r"^reward_model\.trainer\.learning_rat: unknown key"):
        run(workdir, style_data, tiny_model_dir, trainer={"learning_rat": 1.0})
    assert not (workdir / "reward").exists()


def test_reward_fn_needs_a_reward_model(tmp_path, tiny_model_dir):
    with pytest.raises(StageError, match=r"not a reward model directory \(no reward\.json\)"):
        load_reward_fn(tiny_model_dir)
