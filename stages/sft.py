"""Supervised fine-tuning of the base model on one workflow's chats: LoRA, QLoRA or full.

In:  models/base; train and eval JSONL chat records `{"messages", "tools"?}`;
     params `sft.defaults` with `sft.<workflow>` on top (any trl SFTConfig field under `trainer:`)
Out: models/sft/<workflow>/     adapter (or full model), tokenizer with its training chat template,
                                README.md model card (base model, data hashes, params, metrics)
     metrics/sft/<workflow>.json train/eval loss, eval perplexity, the base model's eval loss,
                                tokens seen, tokens/s, peak memory
     plots/sft/<workflow>/      DVCLive curves: train and eval loss, learning rate

    python -m stages.sft --workflow persona --model models/base \
        --train data/persona/train.jsonl --eval data/persona/val.jsonl \
        --out models/sft/persona --metrics metrics/sft/persona.json

The same command runs data-parallel under `accelerate launch` or `torchrun`. Checkpoints go
to checkpoints/sft/<workflow>/<key>, the key a hash of the params, data and base model: a run
killed mid-way resumes from its last checkpoint on the next `dvc repro`; changed params start fresh.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.chat import chat_dataset, read_chat_records, resolve_chat_template, tokenize_chats
from stages.lib.io import atomic_dir, atomic_file, write_json
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import peak_memory_mb, require_model_dir, resolve_precision
from stages.lib.params import DEFAULT_PARAMS, build
from stages.lib.training import (LoraParams, check_precision, check_qlora, is_main_process, load_trainable,
                                 load_variant_params, lora_config, precision_flags)

log = get_logger("sft")

# trl SFTConfig values the project chooses differently from trl's defaults; `trainer:` overrides them.
TRAINER_DEFAULTS = {
    "assistant_only_loss": True,
    "max_length": 1024,
    # trl turns it on by default; it costs about a third of the speed and is only needed when memory is short.
    "gradient_checkpointing": False,
    # Batches of similar length waste less compute on padding (packing is unsafe without FlashAttention).
    "train_sampling_strategy": "group_by_length",
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "logging_steps": 5,
    "eval_strategy": "steps",
    "eval_steps": 20,
    "save_strategy": "steps",
    "save_steps": 20,
    "save_total_limit": 1,
    "include_num_input_tokens_seen": "non_padding",
    "seed": 42,
}
# Set by the stage itself: paths come from dvc.yaml, precision and logging from the params below.
MANAGED = {"output_dir", "bf16", "fp16", "use_cpu", "report_to", "chat_template_path", "resume_from_checkpoint",
           "logging_dir", "push_to_hub", "hub_model_id"}


@dataclass
class SFTParams:
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraParams = field(default_factory=LoraParams)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    chat_template: str = "auto"  # auto | model | chatml | path to a .jinja file
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    trainer: dict[str, Any] = field(default_factory=dict)  # trl SFTConfig fields

    def __post_init__(self):
        managed = sorted(MANAGED & set(self.trainer))
        if managed:
            raise ValueError(f"trainer {managed[0]} is set by the stage, not in params")


def load_sft_params(path: str, workflow: str) -> tuple[SFTParams, dict]:
    return load_variant_params(path, "sft", workflow, SFTParams)


def trainer_config(params: SFTParams, workflow: str, output_dir: Path, precision: str):
    from trl import SFTConfig

    values = {**TRAINER_DEFAULTS, **params.trainer}
    values.update(output_dir=str(output_dir), report_to="none", **precision_flags(precision))
    return build(SFTConfig, values, f"sft.{workflow}.trainer")


def check_packing(config, workflow: str) -> None:
    """Packed examples share one attention window unless FlashAttention honours their boundaries."""
    import torch

    if config.packing and not torch.cuda.is_available():
        raise StageError(f"sft.{workflow}.trainer.packing: packed examples would attend to each other without "
                         f"FlashAttention, which needs CUDA; leave packing off (batches are grouped by length)")


def select_examples(records, tokenizer, template, max_length: int, limit: int | None, workflow: str, split: str):
    """Drop examples whose first assistant token lies beyond max_length: they would train on nothing."""
    for record in records:
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise StageError(f"{record['where']}: record has no assistant turn")
    if limit is not None:
        records = records[:limit]
    tokenized = tokenize_chats(records, tokenizer, template)
    kept = [r for r, t in zip(records, tokenized) if t.assistant_spans and t.assistant_spans[0][0] < max_length]
    if not kept:
        first = min(t.assistant_spans[0][0] for t in tokenized if t.assistant_spans)
        raise StageError(f"sft.{workflow}.trainer.max_length: {max_length} is shorter than every {split} example "
                         f"(the earliest assistant token is at position {first})")
    truncated = sum(1 for t in tokenized if t.n_tokens > max_length)
    return kept, len(records) - len(kept), truncated


def checkpoint_key(merged_params: dict, files: Sequence[Path], model_dir: Path) -> str:
    digest = hashlib.sha256(json.dumps(merged_params, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(file_md5(path).encode())
    for name in sorted(os.listdir(model_dir)):
        digest.update(f"{name}:{(model_dir / name).stat().st_size}".encode())
    digest.update((model_dir / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def file_md5(path: Path) -> str:
    """The md5 DVC records for a file in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(model_dir: Path, params: SFTParams, precision: str):
    # Trained weights stay fp32 under bf16/fp16 autocast (mixed precision); QLoRA's frozen ones are 4-bit.
    return load_trainable(model_dir, params.method, precision)


def model_card(workflow: str, params: dict, metrics: dict, model_dir: Path, data: dict[str, str], method: str) -> str:
    source = model_dir / "provenance.json"
    base = json.loads(source.read_text())["source"] if source.is_file() else str(model_dir)
    lines = [
        f"# SFT model: {workflow}", "",
        f"- Base model: `{model_dir}` ({base})",
        f"- Method: {method}",
        *[f"- Data `{path}`: md5 `{digest}` (as recorded in dvc.lock)" for path, digest in data.items()],
        "", "## Metrics", "", "| metric | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in metrics.items()],
        "", "## Params", "", "```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```", "",
        "Load with `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` (adapters) or "
        "`transformers.AutoModelForCausalLM.from_pretrained(dir)` (full fine-tuning); the tokenizer in this "
        "directory carries the chat template the model was trained with.", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--workflow", required=True)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/sft"))
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="root of the DVCLive directories")
    args = parser.parse_args(argv)

    workflow = args.workflow
    params, merged = load_sft_params(args.params, workflow)
    require_model_dir(args.model, "--model")
    precision = resolve_precision(params.precision, params.method)
    check_precision(precision, f"sft.{workflow}.precision")
    if params.method == "qlora":
        check_qlora(f"sft.{workflow}.method")

    key = checkpoint_key(merged, [args.train, args.eval], args.model)
    output_dir = args.checkpoints / workflow / key
    config = trainer_config(params, workflow, output_dir, precision)
    check_packing(config, workflow)
    if is_main_process():
        log_config(log, f"sft.{workflow}", {**config_dict(params), "precision": precision, "checkpoints": str(output_dir)})

    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    train_records, eval_records = read_chat_records(args.train), read_chat_records(args.eval)
    for path, records in ((args.train, train_records), (args.eval, eval_records)):
        if not records:
            raise StageError(f"{path}: no records")
    needs_tools = any(r["tools"] for r in train_records + eval_records)
    template = resolve_chat_template(tokenizer, params.chat_template, needs_assistant_mask=config.assistant_only_loss,
                                     needs_tools=needs_tools, key=f"sft.{workflow}.chat_template")
    tokenizer.chat_template = template
    train_records, dropped_train, truncated_train = select_examples(
        train_records, tokenizer, template, config.max_length, params.max_train_examples, workflow, "training")
    eval_records, dropped_eval, _ = select_examples(
        eval_records, tokenizer, template, config.max_length, params.max_eval_examples, workflow, "eval")
    if dropped_train or dropped_eval:
        log.warning("dropped %d train and %d eval examples with no assistant token within max_length %d",
                    dropped_train, dropped_eval, config.max_length)

    from trl import SFTTrainer

    callbacks = []
    if is_main_process():
        from transformers.integrations import DVCLiveCallback

        from stages.lib.live import open_live

        shutil.rmtree(args.plots / "sft" / workflow, ignore_errors=True)
        callbacks.append(DVCLiveCallback(live=open_live("sft", workflow, root=args.plots)))
    # Checkpoints of other params for this workflow can never be resumed: drop them.
    if is_main_process() and (args.checkpoints / workflow).is_dir():
        for stale in (args.checkpoints / workflow).iterdir():
            if stale.name != key:
                shutil.rmtree(stale, ignore_errors=True)

    trainer = SFTTrainer(
        model=load_model(args.model, params, precision),
        args=config,
        train_dataset=chat_dataset(train_records),
        eval_dataset=chat_dataset(eval_records),
        processing_class=tokenizer,
        peft_config=lora_config(params.method, params.lora),
        callbacks=callbacks,
    )
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        log.info("resuming from %s", last)
        base_eval = json.loads((output_dir / "base_eval.json").read_text())
    else:
        # With LoRA's B matrices at zero, the untrained model is exactly the base model.
        base_eval = trainer.evaluate()
        if trainer.is_world_process_zero():
            write_json(output_dir / "base_eval.json", base_eval)

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    elapsed = time.perf_counter() - started
    # The trainer may have just evaluated at its last step; do not pay for the same pass twice.
    final_eval = next((entry for entry in reversed(trainer.state.log_history)
                       if "eval_loss" in entry and entry.get("step") == trainer.state.global_step), None)
    final_eval = final_eval or trainer.evaluate()

    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    metrics = {
        "train_loss": round(train_losses[-1], 4) if train_losses else None,
        "train_loss_mean": round(result.training_loss, 4),
        "eval_loss": round(final_eval["eval_loss"], 4),
        "eval_perplexity": round(math.exp(final_eval["eval_loss"]), 3),
        "base_eval_loss": round(base_eval["eval_loss"], 4),
        "base_eval_perplexity": round(math.exp(base_eval["eval_loss"]), 3),
        "train_examples": len(train_records),
        "eval_examples": len(eval_records),
        "dropped_examples": dropped_train + dropped_eval,
        "truncated_train_examples": truncated_train,
        "steps": trainer.state.global_step,
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_seen / elapsed, 1) if not last else None,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "precision": precision,
        "method": params.method,
    }
    if trainer.is_world_process_zero():
        with atomic_dir(args.out) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            data = {str(args.train): file_md5(args.train), str(args.eval): file_md5(args.eval)}
            with atomic_file(tmp / "README.md") as handle:
                handle.write(model_card(workflow, merged, metrics, args.model, data, params.method))
        write_json(args.metrics, metrics)
        shutil.rmtree(output_dir, ignore_errors=True)
        log.info("%s: eval loss %.4f (base %.4f) after %d steps, %d tokens at %.0f tokens/s",
                 workflow, metrics["eval_loss"], metrics["base_eval_loss"], metrics["steps"], tokens_seen,
                 metrics["tokens_per_second"] or 0)
    return metrics


if __name__ == "__main__":
    run_stage(main)
