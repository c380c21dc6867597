"""Generated tokens/s of `generate_preferences`' batched sampling against a one-at-a-time loop.

One run, same model, prompts and sampling settings:
  batched  the stage's sample_pairs: length-sorted batches, each prompt encoded once without
           padding into a preallocated KV cache that both of its responses decode from
  loop     one prompt, one response per generate call, twice per prompt

    python benchmarks/generation.py --model models/sft/persuasion --prompts data/persuasion/sft/val.jsonl

Target: batched >= 3x loop. Prints one line with the ratio and the absolute figures.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.generate_preferences import GeneratePreferencesParams, read_prompts, sample_pairs  # noqa: E402
from stages.lib.policy import load_policy  # noqa: E402


def loop_pairs(model, tokenizer, prompts, params):
    import torch

    generated = 0
    for prompt in prompts:
        for _ in range(2):
            inputs = tokenizer.apply_chat_template([prompt], add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
            with torch.no_grad():
                output = model.generate(**inputs, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                        max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = output[0, inputs["input_ids"].shape[1]:]
            ended = (new == tokenizer.eos_token_id).nonzero()
            generated += int(ended[0, 0]) + 1 if len(ended) else len(new)
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/sft/persuasion")
    parser.add_argument("--prompts", type=Path, default=ROOT / "data/persuasion/sft/val.jsonl")
    parser.add_argument("--count", type=int, default=16, help="prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    params = GeneratePreferencesParams(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    prompts = [p["prompt"] for p in read_prompts([args.prompts])][:args.count]
    model, tokenizer = load_policy(args.model)

    # Untimed warm-up of both paths: the first calls pay for allocations and lazy initialisation.
    warm_up = GeneratePreferencesParams(batch_size=1, max_new_tokens=2)
    sample_pairs(model, tokenizer, prompts[:1], warm_up)
    loop_pairs(model, tokenizer, prompts[:1], warm_up)

    torch.manual_seed(0)
    start = time.perf_counter()
    _, batched_tokens = sample_pairs(model, tokenizer, prompts, params)
    batched_s = time.perf_counter() - start
    torch.manual_seed(0)
    start = time.perf_counter()
    loop_tokens = loop_pairs(model, tokenizer, prompts, params)
    loop_s = time.perf_counter() - start

    batched, loop = batched_tokens / batched_s, loop_tokens / loop_s
    print(f"generation: {batched / loop:.1f}x one-prompt-one-response loop (target >= 3) | batched {batched:.0f} "
          f"generated tok/s ({batched_tokens} tokens, batch {args.batch_size} prompts x 2), loop {loop:.0f} tok/s "
          f"({loop_tokens} tokens) | {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, model {args.model} | "
          f"{platform.machine()} {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
