"""Direct preference optimisation on labelled pairs: a new LoRA (or full) update on top of a policy.

In:  --start   the policy to improve: an SFT adapter (models/sft/persuasion), an earlier DPO adapter
               (models/dpo/rlaif) or a full model; its adapters are merged into the base first, so the
               merged start policy is both what trains and the frozen DPO reference
     --train   labelled pairs (label_ai / label_human: `{"prompt", "chosen", "rejected", "metadata"}`)
     --eval    held-out labelled pairs for preference accuracy and reward margin
     --eval-human  optional: held-out pairs labelled by people, scored the same way (eval_human_*)
     params `dpo.defaults` with `dpo.<name>` on top (any trl DPOConfig field under `trainer:`; a `start`
               set there is what dvc.yaml passes as --start, as for dpo@imported, and must equal it)
Out: models/dpo/<name>/          adapter + stack.json (what it sits on) + tokenizer + README.md model card
     metrics/dpo/<name>.json     held-out reward margin, preference accuracy and loss, before and after
     plots/dpo/<name>/           DVCLive curves: loss, rewards/chosen, rewards/rejected, margins, accuracies

    python -m stages.dpo --name rlaif --start models/sft/persuasion \
        --train data/labelled/ai.jsonl --eval data/labelled/eval.jsonl \
        --out models/dpo/rlaif --metrics metrics/dpo/rlaif.json --plots plots/dpo/rlaif

trl's default DPO reference for a PEFT model is the model with its adapter switched off. Merging
the start policy's adapters into the weights before adding the new adapter makes that reference
the start policy (the SFT model), not the bare base model.
"""

import argparse
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import write_metrics
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import load_tokenizer, peak_memory_mb
from stages.lib.params import DEFAULT_PARAMS
from stages.lib.policy import load_merged, policy_stack, require_policy_dir
from stages.lib.records import read_labelled_pairs
from stages.lib.training import (LoraParams, Section, is_main_process, live_callbacks, load_variant_params,
                                 model_card, model_config, refuse_stage_fields, save_trained,
                                 trainer_config, training_precision)

log = get_logger("dpo")

CUT_MARK = "\n[...]\n"


@dataclass
class DPOParams:
    # What dvc.yaml passes as --start, for a variant whose item reads it from params (dpo.imported); null: the
    # item names the start itself. Checked, never used in place of --start.
    start: Path | None
    method: Literal["lora", "full"]
    lora: LoraParams
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    include_ties: bool       # pairs the judge or labeller called equal carry no preference
    eval_before: bool        # also evaluate before training (policy == reference: margin 0, loss log 2)
    max_prompt_tokens: int   # longer prompts lose the middle of their longest message
    max_train_pairs: int | None
    trainer: dict[str, Any]  # trl DPOConfig fields

    def __post_init__(self):
        refuse_stage_fields(self.trainer, also={"model_init_kwargs"})
        if self.max_prompt_tokens < 32:
            raise ValueError(f"max_prompt_tokens must be at least 32, got {self.max_prompt_tokens}")


def dpo_config(run: Section, output_dir: Path, precision: str):
    from trl import DPOConfig

    config = trainer_config(DPOConfig, run.params.trainer, f"{run.key}.trainer", output_dir, precision, run.where)
    if config.max_length is not None and config.max_length <= run.params.max_prompt_tokens:
        raise StageError(f"{run.where('trainer.max_length')}: {config.max_length} leaves no room for the responses "
                         f"after a prompt of up to max_prompt_tokens {run.params.max_prompt_tokens} tokens")
    return config


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


def preference_dataset(pairs: list[dict], tokenizer, run: Section):
    """trl's conversational preference format, prompts cut to fit; returns (dataset, prompts cut)."""
    from datasets import Dataset

    rows, cut_count = [], 0
    for pair in pairs:
        prompt, cut = fit_prompt(pair["prompt"], tokenizer, run.params.max_prompt_tokens,
                                 run.where("max_prompt_tokens"))
        cut_count += cut
        rows.append({"prompt": prompt,
                     "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                     "rejected": [{"role": "assistant", "content": pair["rejected"]}]})
    return Dataset.from_list(rows), cut_count


def select_pairs(path: Path, run: Section) -> tuple[list[dict], int]:
    """The labelled pairs in `path` DPO learns from: ties left out unless `include_ties`."""
    pairs = read_labelled_pairs(path)
    usable = [p for p in pairs if run.params.include_ties or not p["metadata"].get("is_equal", False)]
    if not usable:
        what = (f"all {len(pairs)} pairs are ties (set {run.key}.include_ties to train on them)" if pairs
                else "no pairs")
        raise StageError(f"{path}: {what}")
    return usable, len(pairs) - len(usable)


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


def load_pairs(args, run: Section, tokenizer) -> dict:
    """Train, held-out and (if given) people's held-out pairs as datasets, with their counts."""
    train, ties = select_pairs(args.train, run)
    held_out, _ = select_pairs(args.eval, run)
    human = select_pairs(args.eval_human, run)[0] if args.eval_human else []
    if run.params.max_train_pairs is not None:
        train = train[:run.params.max_train_pairs]
    train_data, cut = preference_dataset(train, tokenizer, run)
    return {"train": train_data, "eval": preference_dataset(held_out, tokenizer, run)[0],
            "eval_human": preference_dataset(human, tokenizer, run)[0] if human else None,
            "counts": {"train_pairs": len(train), "ties_left_out": ties, "prompts_cut": cut,
                       "eval_pairs": len(held_out)}, "human_pairs": len(human)}


def train_and_evaluate(trainer, data: dict, eval_before: bool) -> dict:
    """Train, then score the held-out pairs (and people's held-out pairs); the metrics of the run."""
    # Before any step the policy equals the reference: margin 0, loss log 2; measured only when asked.
    before = trainer.evaluate(metric_key_prefix="eval") if eval_before else None
    started = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - started
    after = trainer.evaluate(metric_key_prefix="eval")
    human = (trainer.evaluate(eval_dataset=data["eval_human"], metric_key_prefix="eval_human")
             if data["eval_human"] is not None else None)
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **eval_summary(after),
        **(eval_summary(before, "_before") if before else {}),
        **({**eval_summary(human, prefix="eval_human"), "eval_human_pairs": data["human_pairs"]} if human else {}),
        "train_loss": round(result.training_loss, 4),
        "train_loss_first": round(train_losses[0], 4) if train_losses else None,
        "train_loss_last": round(train_losses[-1], 4) if train_losses else None,
        **data["counts"],
        "steps": trainer.state.global_step,
        "train_seconds": round(elapsed, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--name", required=True, help="the variant: its params are dpo.<name>")
    parser.add_argument("--start", required=True, type=Path, help="policy to improve (adapter or model dir)")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--eval", required=True, type=Path, help="held-out pairs (the AI judge's labels)")
    parser.add_argument("--eval-human", type=Path, help="held-out pairs labelled by people (label_human --eval-out)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path, help="this run's DVCLive directory")
    args = parser.parse_args(argv)

    run = load_variant_params(args.params, "dpo", args.name, DPOParams)
    params = run.params
    if params.start is not None and params.start != args.start:
        raise StageError(f"{run.where('start')}: {params.start}, but --start is {args.start} (dvc.yaml's "
                         f"dpo@{args.name} must pass ${{dpo.{args.name}.start}})")
    require_policy_dir(args.start, "--start")
    precision = training_precision(params.precision, params.method, f"{run.key}.precision")
    config = dpo_config(run, args.out.with_name(args.out.name + ".work"), precision)
    if is_main_process():
        log_config(log, run.key, {**config_dict(params), "precision": precision})
    tokenizer = load_tokenizer(args.start)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_pairs(args, run, tokenizer)

    from trl import DPOTrainer, get_peft_config

    model_args = model_config(params.method, params.lora, precision)
    # Full fine-tuning needs its own frozen copy of the start policy; a LoRA's reference is its base.
    trainer = DPOTrainer(model=load_merged(args.start), ref_model=load_merged(args.start) if params.method == "full"
                         else None, args=config, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tokenizer, peft_config=get_peft_config(model_args),
                         callbacks=live_callbacks(args.plots))
    metrics = {**train_and_evaluate(trainer, data, params.eval_before), "precision": precision,
               "method": params.method}
    if not all(math.isfinite(v) for v in (metrics["eval_loss"], metrics["train_loss"])):
        raise StageError(f"{run.key}: training diverged (loss {metrics['train_loss']}); lower the learning rate")
    if trainer.is_world_process_zero():
        base, adapters = policy_stack(args.start)
        stack = " -> ".join(f"`{p}`" for p in [base, *adapters]) if params.method != "full" else "the full model"
        pairs = {"Train pairs": args.train, "Held-out pairs": args.eval,
                 **({"People's held-out pairs": args.eval_human} if args.eval_human else {})}
        card = model_card(f"DPO model: {args.name}", [f"Start policy: `{args.start}`; trained on top of: {stack}"],
                          pairs, metrics, run.values, USAGE)
        save_trained(args.out, trainer.model, tokenizer, card, stack=(base, adapters))
        shutil.rmtree(config.output_dir, ignore_errors=True)
        write_metrics(args.metrics, metrics)
        log.info("held-out reward margin %.4f, preference accuracy %.3f, loss %.4f (%d pairs)",
                 metrics["eval_reward_margin"], metrics["eval_reward_accuracy"], metrics["eval_loss"],
                 metrics["eval_pairs"])
    return metrics


USAGE = ("Load with `stages.lib.policy.load_policy(dir)`: it merges the adapters listed in stack.json into the "
         "base model, then this one.")


if __name__ == "__main__":
    run_stage(main)
