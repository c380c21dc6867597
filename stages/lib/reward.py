"""Scoring texts with a reward model trained by the `reward_model` stage."""

import json
from pathlib import Path
from typing import Callable

from stages.lib.errors import StageError

REWARD_CONFIG = "reward.json"


def reward_inputs(tokenizer, texts: list[str], config: dict) -> list[str]:
    """The texts as the model saw them in training: a pairwise model's end with the EOS token."""
    suffix = tokenizer.eos_token if config.get("append_eos_token") else ""
    return [t if not suffix or t.endswith(suffix) else t + suffix for t in texts]


def score_texts(model, tokenizer, texts: list[str], config: dict, batch_size: int = 32) -> list[float]:
    """A two-class classifier scores logit(1) - logit(0); a pairwise (Bradley-Terry) model its single logit,
    on the text formatted as in training (`config`: what reward.json holds)."""
    import torch

    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = reward_inputs(tokenizer, texts[start:start + batch_size], config)
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=config["max_length"],
                           return_tensors="pt").to(device)
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        values = logits[:, 1] - logits[:, 0] if logits.shape[-1] == 2 else logits[:, 0]
        scores.extend(values.tolist())
    return scores


def load_reward_fn(model_dir: str | Path, batch_size: int = 32, device: str | None = None) -> Callable[[list[str]], list[float]]:
    """`reward_fn(texts) -> list[float]`: higher means more of the target style (see `score_texts`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    config_path = model_dir / REWARD_CONFIG
    if not config_path.is_file():
        raise StageError(f"{model_dir}: not a reward model directory (no {REWARD_CONFIG})")
    config = json.loads(config_path.read_text())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(device).eval()
    return lambda texts: score_texts(model, tokenizer, texts, config, batch_size)
