"""Sample two responses per prompt from the persuasion SFT model, for three disjoint prompt pools.

In:  the persuasion SFT model (a LoRA adapter directory or a full model); the val and test
     splits of the persuasion SFT data; params `generate_preferences`
Out: <out>/ai.jsonl     prompts an AI judge will label (RLAIF)
     <out>/human.jsonl  prompts people will label (RLHF)
     <out>/eval.jsonl   held-out final-evaluation prompts that no training stage reads
     one line per prompt: {"prompt": [system, user], "response_1", "response_2",
                           "metadata": {provenance..., "prompt_id", "pool"}}
     <metrics>          prompts per pool, generated tokens, tokens/s

    python -m stages.generate_preferences --model models/sft/persuasion \
        --prompts data/persuasion/sft/val.jsonl data/persuasion/sft/test.jsonl \
        --out data/preferences --metrics metrics/generate_preferences.json

Pools are drawn by whole conversations, so no thread feeds both a training pool and the
evaluation pool. Generation is batched: prompts of similar length share a batch, each is
encoded once without padding, and its KV cache serves both samples drawn from it.
"""

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.chat import read_chat_records
from stages.lib.generation import generate_batches
from stages.lib.io import atomic_dir, write_json, write_jsonl
from stages.lib.log import get_logger, log_config
from stages.lib.policy import load_policy, require_policy_dir
from stages.lib.params import DEFAULT_PARAMS, load_section

log = get_logger("generate_preferences")

POOLS = ("ai", "human", "eval")
# Conversations are dealt to the pool whose labels cost most to redo first: growing the AI pool
# (labels recomputed in seconds) moves neither the people's labels nor the held-out pool.
DEAL_ORDER = ("human", "eval", "ai")


@dataclass
class GeneratePreferencesParams:
    ai_pool_size: int = 24
    human_pool_size: int = 6
    eval_pool_size: int = 12
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 96
    batch_size: int = 8  # prompts per generate call; each call returns both samples of every prompt
    seed: int = 42

    def __post_init__(self):
        for pool in POOLS:
            if getattr(self, f"{pool}_pool_size") < 0:
                raise ValueError(f"{pool}_pool_size must not be negative, got {getattr(self, f'{pool}_pool_size')}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}" if self.max_new_tokens < 1
                             else f"batch_size must be at least 1, got {self.batch_size}")


def read_prompts(paths: Sequence[Path]) -> list[dict]:
    """Prompt records: the chat up to its last assistant turn, with provenance and a stable id."""
    prompts = []
    for path in paths:
        for record in read_chat_records(path):
            messages = record["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            metadata = dict(record.get("metadata") or {})
            prompts.append({"prompt": messages[:last], "metadata": metadata, "where": record["where"]})
    for prompt in prompts:
        meta = prompt["metadata"]
        if "conversation_id" not in meta or "utterance_id" not in meta:
            raise StageError(f"{prompt['where']}: metadata needs conversation_id and utterance_id")
        meta["prompt_id"] = f"{meta.get('source', 'data')}:{meta['utterance_id']}"
    return prompts


def draw_pools(prompts: list[dict], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Shuffle conversations with the seed and deal them out whole, in the order of `sizes`, until each pool is full.

    A conversation that overfills a pool gives the pool what it needs; the rest of it goes unused.
    """
    by_conversation: dict[str, list[dict]] = {}
    for prompt in prompts:
        by_conversation.setdefault(str(prompt["metadata"]["conversation_id"]), []).append(prompt)
    order = sorted(by_conversation)
    random.Random(seed).shuffle(order)
    remaining = iter(order)
    pools = {}
    for pool, size in sizes.items():
        chosen: list[dict] = []
        while len(chosen) < size:
            conversation = next(remaining, None)
            if conversation is None:
                asked = " + ".join(f"{p} {n}" for p, n in sizes.items())
                raise StageError(
                    f"generate_preferences: the pools ask for {sum(sizes.values())} prompts ({asked}) but only "
                    f"{len(prompts)} prompts in {len(by_conversation)} conversations exist (pools take whole "
                    f"conversations); lower generate_preferences.{pool}_pool_size")
            chosen.extend(by_conversation[conversation])
        pools[pool] = chosen[:size]
    return pools


def sample_pairs(model, tokenizer, prompts: list[list[dict]], params: GeneratePreferencesParams, progress=None):
    """Two sampled responses per prompt, and the number of tokens generated (up to each EOS).

    On long prompts the prompt pass dominates, so each prompt is encoded once, without padding,
    and its KV cache shared by both samples; batches hold prompts of similar length, so decoding
    spends little attention on padding.
    """
    import torch

    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    pairs, generated = [None] * len(prompts), 0
    for indices, new in generate_batches(model, tokenizer, encoded, 2, params.max_new_tokens, params.batch_size,
                                         do_sample=True, temperature=params.temperature, top_p=params.top_p):
        # A sample ends at its first EOS (included); what follows is padding.
        ended = new == tokenizer.eos_token_id
        lengths_new = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])
        generated += int(lengths_new.sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, i in enumerate(indices):
            pairs[i] = (texts[2 * j].strip(), texts[2 * j + 1].strip())
        if progress:
            progress.update(len(indices))
    return pairs, generated


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--prompts", required=True, type=Path, nargs="+", help="chat JSONL files to draw prompts from")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "generate_preferences", GeneratePreferencesParams)
    log_config(log, "generate_preferences", params)
    require_policy_dir(args.model, "--model")
    sizes = {pool: getattr(params, f"{pool}_pool_size") for pool in DEAL_ORDER}
    pools = draw_pools(read_prompts(args.prompts), sizes, params.seed)

    import torch
    from tqdm import tqdm

    torch.manual_seed(params.seed)
    model, tokenizer = load_policy(args.model)
    everything = [(pool, prompt) for pool in POOLS for prompt in pools[pool]]
    started = time.perf_counter()
    with tqdm(total=len(everything), desc="prompts", unit="prompt") as progress:
        pairs, generated = sample_pairs(model, tokenizer, [p["prompt"] for _, p in everything], params, progress)
    elapsed = time.perf_counter() - started

    rows = {pool: [] for pool in POOLS}
    for (pool, prompt), (first, second) in zip(everything, pairs):
        rows[pool].append({"prompt": prompt["prompt"], "response_1": first, "response_2": second,
                           "metadata": {**prompt["metadata"], "pool": pool}})
    with atomic_dir(args.out) as tmp:
        for pool in POOLS:
            write_jsonl(tmp / f"{pool}.jsonl", rows[pool])
    metrics = {
        **{f"{pool}_prompts": len(rows[pool]) for pool in POOLS},
        "generated_tokens": generated,
        "generated_tokens_per_second": round(generated / max(elapsed, 1e-9), 1),
        "identical_pairs": sum(1 for first, second in pairs if first == second),
        "empty_responses": sum((not first) + (not second) for first, second in pairs),
    }
    write_json(args.metrics, metrics)
    log.info("%d prompts, %d tokens generated at %.1f tokens/s", len(everything), generated,
             metrics["generated_tokens_per_second"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
