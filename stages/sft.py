"""Supervised fine-tuning of the base model on one workflow's chats: LoRA, QLoRA or full.

In:  models/base; train and eval JSONL chat records `{"messages", "tools"?}`;
     params `sft.defaults` with `sft.<name>` on top (any trl SFTConfig field under `trainer:`)
Out: models/sft/<name>/       adapter (or full model), tokenizer with its training chat template,
                              tools.json (the tool schemas, when the chats have tools),
                              README.md model card (base model, data hashes, params, metrics)
     metrics/sft/<name>.json  train/eval loss, eval perplexity, the base model's eval loss,
                              tokens seen, tokens/s, peak memory
     plots/sft/<name>/        DVCLive curves: train and eval loss, learning rate

    python -m stages.sft --name persona --model models/base \
        --train data/persona/train.jsonl --eval data/persona/val.jsonl \
        --out models/sft/persona --metrics metrics/sft/persona.json --plots plots/sft/persona

The same command runs data-parallel under `accelerate launch` or `torchrun`. Checkpoints go
to checkpoints/sft/<name>/<key>, the key a hash of the params, data and base model: a run
killed mid-way resumes from its last checkpoint on the next `dvc repro`; changed params start fresh.
"""

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.errors import skip_bitsandbytes
from stages.lib.chat import chat_dataset, resolve_chat_template, tokenize_chats
from stages.lib.io import write_json, write_metrics
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import load_tokenizer, peak_memory_mb, require_model_dir
from stages.lib.params import DEFAULT_PARAMS
from stages.lib.policy import MODEL_TOOLS_FILE
from stages.lib.records import read_chat_records
from stages.lib.training import (LoraParams, Section, check_qlora, checkpoint_dir, is_main_process, live_callbacks,
                                 load_trainable, load_variant_params, model_card, model_config, refuse_stage_fields,
                                 resumable_checkpoint, save_trained, step_clock, trainer_config, training_precision)

log = get_logger("sft")


@dataclass
class SFTParams:
    method: Literal["lora", "qlora", "full"]
    lora: LoraParams
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    chat_template: str  # auto | model | chatml | path to a .jinja file
    max_train_examples: int | None
    max_eval_examples: int | None
    trainer: dict[str, Any]  # trl SFTConfig fields

    def __post_init__(self):
        refuse_stage_fields(self.trainer, also={"chat_template_path"})


def check_packing(config, key: str) -> None:
    """Packed examples share one attention window unless FlashAttention honours their boundaries."""
    import torch

    if config.packing and not torch.cuda.is_available():
        raise StageError(f"{key}.trainer.packing: packed examples would attend to each other without "
                         f"FlashAttention, which needs CUDA; leave packing off (batches are grouped by length)")


def select_examples(records, tokenizer, template, max_length: int, limit: int | None, key: str, split: str):
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
        raise StageError(f"{key}.trainer.max_length: {max_length} is shorter than every {split} example "
                         f"(the earliest assistant token is at position {first})")
    truncated = sum(1 for t in tokenized if t.n_tokens > max_length)
    return kept, len(records) - len(kept), truncated


def load_chats(args, run: Section, config):
    """(tokenizer with the training template, train records, eval records, counts of dropped / truncated)."""
    params = run.params
    tokenizer = load_tokenizer(args.model)
    train, held_out = read_chat_records(args.train), read_chat_records(args.eval)
    for path, records in ((args.train, train), (args.eval, held_out)):
        if not records:
            raise StageError(f"{path}: no records")
    template = resolve_chat_template(tokenizer, params.chat_template, needs_assistant_mask=config.assistant_only_loss,
                                     needs_tools=any(r["tools"] for r in train + held_out),
                                     key=f"{run.key}.chat_template")
    tokenizer.chat_template = template
    train, dropped_train, truncated = select_examples(train, tokenizer, template, config.max_length,
                                                      params.max_train_examples, run.key, "training")
    held_out, dropped_eval, _ = select_examples(held_out, tokenizer, template, config.max_length,
                                                params.max_eval_examples, run.key, "eval")
    if dropped_train or dropped_eval:
        log.warning("dropped %d train and %d eval examples with no assistant token within max_length %d",
                    dropped_train, dropped_eval, config.max_length)
    return tokenizer, train, held_out, {"dropped_examples": dropped_train + dropped_eval,
                                        "truncated_train_examples": truncated}


def tool_schemas(records: list[dict]) -> list[dict]:
    """Every tool the chats offer, once each (by name), in order of first appearance."""
    tools = {}
    for record in records:
        for tool in record["tools"] or []:
            tools.setdefault(tool.get("function", tool).get("name"), tool)
    return list(tools.values())


def sft_metrics(trainer, result, base_eval: dict, final_eval: dict, elapsed: float | None, counts: dict) -> dict:
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    return {
        "train_loss": round(train_losses[-1], 4) if train_losses else None,
        "train_loss_mean": round(result.training_loss, 4),
        "eval_loss": round(final_eval["eval_loss"], 4),
        "eval_perplexity": round(math.exp(final_eval["eval_loss"]), 3),
        "base_eval_loss": round(base_eval["eval_loss"], 4),
        "base_eval_perplexity": round(math.exp(base_eval["eval_loss"]), 3),
        **counts,
        "steps": trainer.state.global_step,
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_seen / elapsed, 1) if elapsed else None,
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def train_resumable(trainer, output_dir: Path, clock):
    """Train from the last checkpoint in `output_dir`, if any: (base eval, train result, final eval, seconds
    spent inside optimizer steps (`clock`: evaluations and saves excluded), or None after a resume, when the
    tokens seen were not all seen in this run)."""
    last = resumable_checkpoint(output_dir)
    if last:
        log.info("resuming from %s", last)
        base_eval = json.loads((output_dir / "base_eval.json").read_text())
    else:
        # With LoRA's B matrices at zero, the untrained model is exactly the base model.
        base_eval = trainer.evaluate()
        if trainer.is_world_process_zero():
            write_json(output_dir / "base_eval.json", base_eval)
    from transformers import set_seed

    # The length-grouped sampler shuffles with the global RNG: a resumed run reseeds it as a fresh one does.
    set_seed(trainer.args.seed)
    result = trainer.train(resume_from_checkpoint=last)
    # The trainer may have just evaluated at its last step; do not pay for the same pass twice.
    final_eval = next((entry for entry in reversed(trainer.state.log_history)
                       if "eval_loss" in entry and entry.get("step") == trainer.state.global_step), None)
    return base_eval, result, final_eval or trainer.evaluate(), None if last else clock.seconds


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--name", required=True, help="the workflow: its params are sft.<name>")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path, help="this run's DVCLive directory")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/sft"))
    args = parser.parse_args(argv)

    run = load_variant_params(args.params, "sft", args.name, SFTParams)
    params = run.params
    if params.method != "qlora":
        skip_bitsandbytes()
    require_model_dir(args.model, "--model")
    precision = training_precision(params.precision, params.method, f"{run.key}.precision")
    if params.method == "qlora":
        check_qlora(f"{run.key}.method")
    output_dir = checkpoint_dir(args.checkpoints / args.name, run.values, [args.train, args.eval], args.model)
    from trl import SFTConfig, SFTTrainer, get_peft_config

    config = trainer_config(SFTConfig, params.trainer, f"{run.key}.trainer", output_dir, precision, run.where)
    check_packing(config, run.key)
    if is_main_process():
        log_config(log, run.key, {**config_dict(params), "precision": precision, "checkpoints": str(output_dir)})
    tokenizer, train, held_out, counts = load_chats(args, run, config)

    model_args = model_config(params.method, params.lora, precision)
    clock = step_clock()
    trainer = SFTTrainer(model=load_trainable(args.model, model_args), args=config, train_dataset=chat_dataset(train),
                         eval_dataset=chat_dataset(held_out), processing_class=tokenizer,
                         peft_config=get_peft_config(model_args), callbacks=[*live_callbacks(args.plots), clock])
    base_eval, result, final_eval, elapsed = train_resumable(trainer, output_dir, clock)
    metrics = {**sft_metrics(trainer, result, base_eval, final_eval, elapsed,
                             {"train_examples": len(train), "eval_examples": len(held_out), **counts}),
               "precision": precision, "method": params.method}
    if trainer.is_world_process_zero():
        tools = tool_schemas(train + held_out)
        card = model_card(f"SFT model: {args.name}", [f"Base model: `{args.model}` ({base_source(args.model)})",
                                                      f"Method: {params.method}"],
                          {"Data": args.train, "Eval data": args.eval}, metrics, run.values, USAGE)
        save_trained(args.out, trainer.model, tokenizer, card,
                     extra=(lambda out: write_json(out / MODEL_TOOLS_FILE, tools)) if tools else None)
        write_metrics(args.metrics, metrics)
        # Renamed first: a kill during the removal must not leave checkpoints without their base_eval.json.
        done = output_dir.with_name(output_dir.name + ".done")
        if output_dir.is_dir():
            output_dir.rename(done)
        shutil.rmtree(done, ignore_errors=True)
        log.info("%s: eval loss %.4f (base %.4f) after %d steps, %d tokens at %.0f tokens/s", args.name,
                 metrics["eval_loss"], metrics["base_eval_loss"], metrics["steps"], metrics["tokens_seen"],
                 metrics["tokens_per_second"] or 0)
    return metrics


USAGE = ("Load with `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` (adapters) or "
         "`transformers.AutoModelForCausalLM.from_pretrained(dir)` (full fine-tuning); the tokenizer in this "
         "directory carries the chat template the model was trained with.")


def base_source(model_dir: Path) -> str:
    provenance = model_dir / "provenance.json"
    return json.loads(provenance.read_text())["source"] if provenance.is_file() else str(model_dir)


if __name__ == "__main__":
    run_stage(main, quantized=True)  # method: qlora; main skips bitsandbytes for lora and full
