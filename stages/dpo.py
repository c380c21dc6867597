"""Direct preference optimisation on labelled pairs: a new LoRA (or full) update on top of a policy.

In:  --start   the policy to improve: an SFT adapter (models/sft/persuasion), an earlier DPO adapter
               (models/dpo/rlaif) or a full model; its adapters are merged into the base first, so the
               merged start policy is both what trains and the frozen DPO reference
     --train   labelled pairs (label_ai / label_human: `{"prompt", "chosen", "rejected", "metadata"}`)
     --eval    held-out labelled pairs for preference accuracy and reward margin
     --eval-human  optional: held-out pairs labelled by people, scored the same way (eval_human_*)
     params `dpo.defaults` with `dpo.<variant>` on top (any trl DPOConfig field under `trainer:`)
Out: models/dpo/<variant>/       adapter + stack.json (what it sits on) + tokenizer + README.md model card
     metrics/dpo/<variant>.json  held-out reward margin, preference accuracy and loss, before and after
     plots/dpo/<variant>/        DVCLive curves: loss, rewards/chosen, rewards/rejected, margins, accuracies

    python -m stages.dpo --variant rlaif --start models/sft/persuasion \
        --train data/labelled/ai.jsonl --eval data/labelled/eval.jsonl \
        --out models/dpo/rlaif --metrics metrics/dpo/rlaif.json

trl's default DPO reference for a PEFT model is the model with its adapter switched off. Merging
the start policy's adapters into the weights before adding the new adapter makes that reference
the start policy (the SFT model), not the bare base model.
"""

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, iter_jsonl, write_json
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import load_tokenizer, peak_memory_mb, resolve_precision
from stages.lib.params import DEFAULT_PARAMS, build
from stages.lib.policy import is_adapter, load_merged, policy_stack, require_policy_dir, write_stack
from stages.lib.training import (LoraParams, check_precision, is_main_process, load_variant_params, lora_config,
                                 precision_flags)

log = get_logger("dpo")

# trl DPOConfig values the project chooses differently from trl's defaults; `trainer:` overrides them.
TRAINER_DEFAULTS = {
    "beta": 0.1,
    "loss_type": ["sigmoid"],
    "learning_rate": 5e-5,
    "num_train_epochs": 1,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 2,
    # trl averages the held-out reward margin and accuracy per batch: one pair a batch makes them means over pairs.
    "per_device_eval_batch_size": 1,
    "max_length": 512,
    # trl turns it on by default; it costs about a third of the speed and is only needed when memory is short.
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "eval_strategy": "no",
    "save_strategy": "no",
    "seed": 42,
}
MANAGED = {"output_dir", "bf16", "fp16", "use_cpu", "report_to", "logging_dir", "push_to_hub", "hub_model_id",
           "model_init_kwargs", "resume_from_checkpoint"}
CUT_MARK = "\n[...]\n"


@dataclass
class DPOParams:
    method: Literal["lora", "full"] = "lora"
    lora: LoraParams = field(default_factory=LoraParams)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    include_ties: bool = False       # pairs the judge or labeller called equal carry no preference
    eval_before: bool = False        # also evaluate before training (policy == reference: margin 0, loss log 2)
    max_prompt_tokens: int = 384     # longer prompts lose the middle of their longest message
    max_train_pairs: int | None = None
    trainer: dict[str, Any] = field(default_factory=dict)  # trl DPOConfig fields

    def __post_init__(self):
        managed = sorted(MANAGED & set(self.trainer))
        if managed:
            raise ValueError(f"trainer {managed[0]} is set by the stage, not in params")
        if self.max_prompt_tokens < 32:
            raise ValueError(f"max_prompt_tokens must be at least 32, got {self.max_prompt_tokens}")


def trainer_config(params: DPOParams, variant: str, output_dir: Path, precision: str):
    from trl import DPOConfig

    values = {**TRAINER_DEFAULTS, **params.trainer, "output_dir": str(output_dir), "report_to": "none",
              **precision_flags(precision)}
    config = build(DPOConfig, values, f"dpo.{variant}.trainer")
    if config.max_length is not None and config.max_length <= params.max_prompt_tokens:
        raise StageError(f"dpo.{variant}.trainer.max_length: {config.max_length} leaves no room for the responses "
                         f"after a prompt of up to max_prompt_tokens {params.max_prompt_tokens} tokens")
    return config


def read_pairs(path: Path) -> list[dict]:
    pairs = []
    for line, record in iter_jsonl(path, required=("prompt", "chosen", "rejected", "metadata")):
        where = f"{path}:{line}"
        if not isinstance(record["prompt"], list) or not record["prompt"]:
            raise StageError(f"{where}: 'prompt' must be a non-empty list of chat messages")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str):
                raise StageError(f"{where}: '{key}' must be a string")
        if not isinstance(record["metadata"], dict):
            raise StageError(f"{where}: 'metadata' must be an object")
        pairs.append(record)
    return pairs


def fit_prompt(messages: list[dict], tokenizer, max_tokens: int, key: str) -> tuple[list[dict], bool]:
    """Cut the middle out of the longest message until the rendered prompt fits in `max_tokens`.

    trl truncates a DPO example from its end, which would cut the responses; the start of a
    thread (the claim) and its end (the turn being answered) carry the most, so the middle goes.
    """
    messages = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    cut = False
    for _ in range(4):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        excess = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - max_tokens
        if excess <= 0:
            return messages, cut
        longest = max(range(len(messages)), key=lambda i: len(messages[i]["content"]))
        ids = tokenizer(messages[longest]["content"], add_special_tokens=False)["input_ids"]
        keep = len(ids) - excess - len(tokenizer(CUT_MARK, add_special_tokens=False)["input_ids"]) - 2
        if keep < 8:
            rest = excess + max_tokens - len(ids)
            raise StageError(f"{key}: {max_tokens} is too small: without its longest message a prompt already "
                             f"takes about {rest} tokens")
        head = keep // 4
        content = tokenizer.decode(ids[:head]) + CUT_MARK + tokenizer.decode(ids[len(ids) - (keep - head):])
        messages[longest] = {**messages[longest], "content": content}
        cut = True
    raise StageError(f"{key}: could not fit a prompt into {max_tokens} tokens")


def preference_dataset(pairs: list[dict], tokenizer, params: DPOParams, variant: str):
    """trl's conversational preference format, prompts cut to fit; returns (dataset, prompts cut)."""
    from datasets import Dataset

    rows, cut_count = [], 0
    for pair in pairs:
        prompt, cut = fit_prompt(pair["prompt"], tokenizer, params.max_prompt_tokens, f"dpo.{variant}.max_prompt_tokens")
        cut_count += cut
        rows.append({"prompt": prompt,
                     "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                     "rejected": [{"role": "assistant", "content": pair["rejected"]}]})
    return Dataset.from_list(rows), cut_count


def select_pairs(pairs: list[dict], params: DPOParams, path: Path, variant: str) -> tuple[list[dict], int]:
    usable = [p for p in pairs if params.include_ties or not p["metadata"].get("is_equal", False)]
    ties = len(pairs) - len(usable)
    if not usable:
        what = f"all {len(pairs)} pairs are ties (set dpo.{variant}.include_ties to train on them)" if pairs else "no pairs"
        raise StageError(f"{path}: {what}")
    return usable, ties


def model_card(variant: str, start: Path, stack: list[Path], params: dict, metrics: dict, data: dict) -> str:
    lines = [
        f"# DPO model: {variant}", "",
        f"- Start policy: `{start}`; trained on top of: {' -> '.join(f'`{p}`' for p in stack) or 'the full model'}",
        *[f"- {role} pairs: `{path}`" for role, path in data.items()],
        "", "## Metrics", "", "| metric | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in metrics.items()],
        "", "## Params", "", "```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```", "",
        "Load with `stages.lib.policy.load_policy(dir)`: it merges the adapters listed in stack.json into the "
        "base model, then this one.", "",
    ]
    return "\n".join(lines)


def eval_summary(result: dict, suffix: str = "", prefix: str = "eval") -> dict:
    """Loss, reward margin and preference accuracy from `trainer.evaluate(metric_key_prefix=prefix)`."""

    def reward_metric(name: str) -> float | None:
        # trl adds its reward metrics to the result as eval_rewards/*, whatever the prefix.
        value = result.get(f"{prefix}_rewards/{name}", result.get(f"eval_rewards/{name}"))
        return None if value is None else round(value, 4)

    return {
        f"{prefix}_loss{suffix}": round(result[f"{prefix}_loss"], 4),
        f"{prefix}_reward_margin{suffix}": reward_metric("margins"),
        f"{prefix}_reward_accuracy{suffix}": reward_metric("accuracies"),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--start", required=True, type=Path, help="policy to improve (adapter or model dir)")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--eval", required=True, type=Path, help="held-out pairs (the AI judge's labels)")
    parser.add_argument("--eval-human", type=Path, help="held-out pairs labelled by people (label_human --eval-out)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="root of the DVCLive directories")
    args = parser.parse_args(argv)

    variant = args.variant
    params, merged = load_variant_params(args.params, "dpo", variant, DPOParams)
    require_policy_dir(args.start, "--start")
    precision = resolve_precision(params.precision, params.method)
    check_precision(precision, f"dpo.{variant}.precision")
    config = trainer_config(params, variant, args.out.with_name(args.out.name + ".work"), precision)
    if is_main_process():
        log_config(log, f"dpo.{variant}", {**config_dict(params), "precision": precision})

    train_pairs, ties = select_pairs(read_pairs(args.train), params, args.train, variant)
    eval_pairs, _ = select_pairs(read_pairs(args.eval), params, args.eval, variant)
    human_pairs = []
    if args.eval_human:
        human_pairs, _ = select_pairs(read_pairs(args.eval_human), params, args.eval_human, variant)
    if params.max_train_pairs is not None:
        train_pairs = train_pairs[:params.max_train_pairs]
    tokenizer = load_tokenizer(args.start)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_data, train_cut = preference_dataset(train_pairs, tokenizer, params, variant)
    eval_data, _ = preference_dataset(eval_pairs, tokenizer, params, variant)
    human_data = preference_dataset(human_pairs, tokenizer, params, variant)[0] if human_pairs else None

    base, adapters = policy_stack(args.start)
    model = load_merged(args.start)
    # Full fine-tuning needs its own frozen copy of the start policy; a LoRA's reference is its base.
    ref_model = load_merged(args.start) if params.method == "full" else None

    from trl import DPOTrainer

    callbacks = []
    if is_main_process():
        from transformers.integrations import DVCLiveCallback

        from stages.lib.live import open_live

        shutil.rmtree(args.plots / "dpo" / variant, ignore_errors=True)
        callbacks.append(DVCLiveCallback(live=open_live("dpo", variant, root=args.plots)))
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer,
                         peft_config=lora_config(params.method, params.lora), callbacks=callbacks)
    # Before any step the policy equals the reference: margin 0, loss log 2; measured only when asked.
    before = trainer.evaluate(metric_key_prefix="eval") if params.eval_before else None
    started = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - started
    after = trainer.evaluate(metric_key_prefix="eval")
    human = trainer.evaluate(eval_dataset=human_data, metric_key_prefix="eval_human") if human_data else None

    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        **eval_summary(after),
        **(eval_summary(before, "_before") if before else {}),
        **({**eval_summary(human, prefix="eval_human"), "eval_human_pairs": len(human_pairs)} if human else {}),
        "train_loss": round(result.training_loss, 4),
        "train_loss_first": round(train_losses[0], 4) if train_losses else None,
        "train_loss_last": round(train_losses[-1], 4) if train_losses else None,
        "train_pairs": len(train_pairs),
        "ties_left_out": ties,
        "prompts_cut": train_cut,
        "eval_pairs": len(eval_pairs),
        "steps": trainer.state.global_step,
        "train_seconds": round(elapsed, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "precision": precision,
        "method": params.method,
    }
    if not all(math.isfinite(v) for v in (metrics["eval_loss"], metrics["train_loss"])):
        raise StageError(f"dpo.{variant}: training diverged (loss {metrics['train_loss']}); lower the learning rate")
    if not trainer.is_world_process_zero():
        return metrics

    with atomic_dir(args.out) as tmp:
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if is_adapter(tmp):
            write_stack(tmp, base, adapters)
        (tmp / "README.md").write_text(model_card(
            variant, args.start, [base, *adapters] if is_adapter(tmp) else [], merged, metrics,
            {"train": args.train, "eval": args.eval, **({"eval_human": args.eval_human} if args.eval_human else {})}))
    shutil.rmtree(config.output_dir, ignore_errors=True)
    write_json(args.metrics, metrics)
    log.info("held-out reward margin %.4f, preference accuracy %.3f, loss %.4f (%d pairs)",
             metrics["eval_reward_margin"], metrics["eval_reward_accuracy"], metrics["eval_loss"], len(eval_pairs))
    if human:
        log.info("held-out human-labelled: reward margin %.4f, preference accuracy %.3f, loss %.4f (%d pairs)",
                 metrics["eval_human_reward_margin"], metrics["eval_human_reward_accuracy"],
                 metrics["eval_human_loss"], len(human_pairs))
    return metrics


if __name__ == "__main__":
    run_stage(main)
