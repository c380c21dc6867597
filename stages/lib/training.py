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


def check_qlora(key: str) -> None:
    """Quantize and run one small layer, so a missing 4-bit backend fails here in one line."""
    import torch

    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = layer.to(device)
        layer(torch.zeros(1, 64, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot run here
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise StageError(f"{key}: qlora needs bitsandbytes 4-bit support, which cannot run here ({reason}); "
                         f"use lora or full") from None


def load_trainable(model_dir, method: str, precision: str):
    """A causal LM to train: fp32 weights (autocast handles bf16 / fp16), or 4-bit NF4 frozen weights for qlora."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    kwargs = {"dtype": torch.float32}
    if method == "qlora":
        kwargs = {"dtype": compute, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
