"""Generated tokens/s of `generate_preferences`' batched sampling against a one-at-a-time loop.

One run, same model, prompts and sampling settings (temperature and top_p from the
`generate_preferences` params, as are the defaults of --batch-size and --max-new-tokens):
  batched  stages.lib.generation.sample_pairs: length-sorted batches, each prompt encoded once
           without padding into a preallocated KV cache that both of its responses decode from
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

from stages.lib.generation import sample_pairs  # noqa: E402
from stages.lib.params import load_params  # noqa: E402
from stages.lib.policy import load_policy  # noqa: E402
from stages.lib.records import read_prompts  # noqa: E402


def loop_pairs(model, tokenizer, prompts, max_new_tokens, temperature, top_p):
    import torch

    generated = 0
    for prompt in prompts:
        for _ in range(2):
            inputs = tokenizer.apply_chat_template([prompt], add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
            with torch.no_grad():
                output = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=top_p,
                                        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = output[0, inputs["input_ids"].shape[1]:]
            ended = (new == tokenizer.eos_token_id).nonzero()
            generated += int(ended[0, 0]) + 1 if len(ended) else len(new)
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/sft/persuasion")
    parser.add_argument("--prompts", type=Path, default=ROOT / "data/persuasion/sft/val.jsonl")
    parser.add_argument("--count", type=int, default=16, help="prompts")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--batch-size", type=int, help="prompts per generate call (default: the params')")
    parser.add_argument("--max-new-tokens", type=int, help="(default: the params')")
    args = parser.parse_args()
    section = load_params(args.params)["generate_preferences"]
    if args.batch_size is None:
        args.batch_size = section["batch_size"]
    if args.max_new_tokens is None:
        args.max_new_tokens = section["max_new_tokens"]
    sampling = {"temperature": section["temperature"], "top_p": section["top_p"]}

    import torch

    prompts = [p["prompt"] for p in read_prompts([args.prompts])][:args.count]
    model, tokenizer = load_policy(args.model)

    # Untimed warm-up of both paths: the first calls pay for allocations and lazy initialisation.
    sample_pairs(model, tokenizer, prompts[:1], 2, 1, **sampling)
    loop_pairs(model, tokenizer, prompts[:1], 2, **sampling)

    torch.manual_seed(0)
    start = time.perf_counter()
    _, batched_tokens = sample_pairs(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, **sampling)
    batched_s = time.perf_counter() - start
    torch.manual_seed(0)
    start = time.perf_counter()
    loop_tokens = loop_pairs(model, tokenizer, prompts, args.max_new_tokens, **sampling)
    loop_s = time.perf_counter() - start

    batched, loop = batched_tokens / batched_s, loop_tokens / loop_s
    print(f"generation: {batched / loop:.1f}x one-prompt-one-response loop (target >= 3) | batched {batched:.0f} "
          f"generated tok/s ({batched_tokens} tokens, batch {args.batch_size} prompts x 2), loop {loop:.0f} tok/s "
          f"({loop_tokens} tokens) | {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, model {args.model} | "
          f"{platform.machine()} {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
