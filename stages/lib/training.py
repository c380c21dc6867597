"""What the training stages share: `defaults` + per-variant params, LoRA settings, precision checks."""

import copy
import os
from dataclasses import dataclass
from typing import TypeVar

from stages.lib.errors import StageError
from stages.lib.params import build, load_params

T = TypeVar("T")


@dataclass
class LoraParams:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


def merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, nested dicts merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_variant_params(path, section: str, variant: str, cls: type[T]) -> tuple[T, dict]:
    """`<section>.defaults` with `<section>.<variant>` on top; each part checked under its own name."""
    values = load_params(path).get(section)
    if not isinstance(values, dict) or "defaults" not in values:
        raise StageError(f"{section}.defaults: section missing from params")
    if variant not in values:
        have = ", ".join(k for k in values if k != "defaults")
        raise StageError(f"{section}.{variant}: no such entry in params (have: {have})")
    build(cls, values["defaults"], f"{section}.defaults")
    merged = merge(values["defaults"] or {}, values[variant] or {})
    return build(cls, merged, f"{section}.{variant}"), merged


def lora_config(method: str, lora: LoraParams):
    """A peft LoraConfig for `lora` / `qlora`; None for full fine-tuning."""
    if method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def check_precision(precision: str, key: str) -> None:
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        raise StageError(f"{key}: fp16 needs a CUDA GPU; use auto, bf16 or fp32")


def precision_flags(precision: str) -> dict:
    """The trainer-config fields that follow from the stage's precision choice."""
    import torch

    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not torch.cuda.is_available()}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
