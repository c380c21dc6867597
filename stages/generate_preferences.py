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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import run_stage
from stages.lib.generation import PromptPrefixes, sample_pairs
from stages.lib.io import atomic_dir, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.models import inference_dtype
from stages.lib.policy import load_policy, require_policy_dir
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import PoolRecord, draw_pools, read_prompts, write_pool

log = get_logger("generate_preferences")

POOLS = ("ai", "human", "eval")
# Conversations are dealt to the pool whose labels cost most to redo first: growing the AI pool
# (labels recomputed in seconds) moves neither the people's labels nor the held-out pool.
DEAL_ORDER = ("human", "eval", "ai")


@dataclass
class GeneratePreferencesParams:
    ai_pool_size: int
    human_pool_size: int
    eval_pool_size: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int  # prompts per generate call; each call returns both samples of every prompt
    seed: int

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
    dtype = inference_dtype()
    model, tokenizer = load_policy(args.model, dtype)
    everything = [(pool, prompt) for pool in POOLS for prompt in pools[pool]]
    prefixes = PromptPrefixes()
    started = time.perf_counter()
    with tqdm(total=len(everything), desc="prompts", unit="prompt") as progress:
        pairs, generated = sample_pairs(model, tokenizer, [p["prompt"] for _, p in everything], params.max_new_tokens,
                                        params.batch_size, params.temperature, params.top_p, progress, prefixes)
    elapsed = time.perf_counter() - started

    rows = {pool: [] for pool in POOLS}
    for (pool, prompt), (first, second) in zip(everything, pairs):
        rows[pool].append(PoolRecord(prompt=prompt["prompt"], response_1=first, response_2=second,
                                     metadata={**prompt["metadata"], "pool": pool}))
    with atomic_dir(args.out) as tmp:
        for pool in POOLS:
            write_pool(tmp / f"{pool}.jsonl", rows[pool])
    metrics = {
        **{f"{pool}_prompts": len(rows[pool]) for pool in POOLS},
        "generated_tokens": generated,
        "generated_tokens_per_second": round(generated / max(elapsed, 1e-9), 1),
        "dtype": dtype,
        # Prompt tokens run through the model, and those taken from an earlier prompt of the same conversation
        "prompt_tokens_encoded": prefixes.encoded,
        "prompt_tokens_reused": prefixes.reused,
        "identical_pairs": sum(1 for first, second in pairs if first == second),
        "empty_responses": sum((not first) + (not second) for first, second in pairs),
    }
    write_metrics(args.metrics, metrics)
    log.info("%d prompts, %d tokens generated at %.1f tokens/s", len(everything), generated,
             metrics["generated_tokens_per_second"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
