"""Generated tokens/s of `generate_preferences`' batched sampling against a one-at-a-time loop.

One run, same model, prompts and sampling settings (temperature and top_p from the
`generate_preferences` params, as are the defaults of --batch-size and --max-new-tokens):
  batched  stages.lib.generation.sample_pairs, run before and after the loop (the two runs' total counts, so a
           steady drift of the machine's speed cancels): length-sorted batches, each prompt encoded once
           without padding into a preallocated KV cache that both of its responses decode from, after
           the keys and values of the longest beginning it shares with an earlier prompt
  loop     one prompt, one response per generate call, twice per prompt
  prompt   the batched run's prompt pass alone (stages.lib.generation.prompt_cache, timed inside
           that run): prompt tokens run through the model per second (a prompt that begins like an
           earlier one, the next turn of a conversation, runs only what follows the shared beginning),
           against the forward bound, measured matmul FLOP/s / (2 x parameters): a forward pass costs
           half the 4 x parameters a token of
           sft_throughput.py's training bound; the matmuls on the model's device, in bf16 where it has
           it (CUDA with bf16, a CPU with AVX-512 BF16 or AMX), fp32 otherwise (benchmarks/matmul.py)

    python benchmarks/generation.py --model models/sft/persuasion --prompts data/persuasion/sft/val.jsonl
    python benchmarks/generation.py --model DIR --prompts prompts.jsonl --count 2 --max-new-tokens 4

Target: batched >= 8x loop. Prints one line with the ratio, the prompt pass's share of the bound
and the absolute figures.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import stages.lib.generation as generation  # noqa: E402
from matmul import bound_device, bound_dtype, device_name, matmul_flops  # noqa: E402  (benchmarks/matmul.py)
from stages.lib.generation import sample_pairs  # noqa: E402
from stages.lib.params import load_params  # noqa: E402
from stages.lib.models import inference_dtype  # noqa: E402
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


class PromptPassTimer:
    """Wraps `stages.lib.generation.prompt_cache` while active: seconds spent in it, prompt tokens it encoded and
    prompt tokens it took from an earlier prompt that began the same way."""

    def __init__(self):
        self.seconds, self.tokens, self.reused, self.original = 0.0, 0, 0, generation.prompt_cache

    def timed(self, model, prompts, repeats, capacity, prefixes):  # generate_batches always passes its prefixes
        encoded, reused = prefixes.encoded, prefixes.reused
        start = time.perf_counter()
        cache = self.original(model, prompts, repeats, capacity, prefixes)
        self.seconds += time.perf_counter() - start
        if cache is not None:  # None: nothing was encoded (sliding-window models encode the padded batch)
            self.tokens += prefixes.encoded - encoded
            self.reused += prefixes.reused - reused
        return cache

    def __enter__(self):
        generation.prompt_cache = self.timed
        return self

    def __exit__(self, *exc):
        generation.prompt_cache = self.original


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
    model, tokenizer = load_policy(args.model, inference_dtype())  # as the stages sample

    # Untimed warm-up of both paths: the first calls pay for allocations and lazy initialisation.
    sample_pairs(model, tokenizer, prompts[:1], 2, 1, **sampling)
    loop_pairs(model, tokenizer, prompts[:1], 2, **sampling)

    def batched_run(prompt_pass):
        torch.manual_seed(0)
        start = time.perf_counter()
        with prompt_pass:
            _, tokens = sample_pairs(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, **sampling)
        return tokens, time.perf_counter() - start

    # Batched, loop, batched again: the machine's speed drifts over a run (shared cores), and totalling the two
    # batched runs around the loop cancels a steady drift.
    prompt_pass = PromptPassTimer()
    batched_tokens, batched_s = batched_run(prompt_pass)
    torch.manual_seed(0)
    start = time.perf_counter()
    loop_tokens = loop_pairs(model, tokenizer, prompts, args.max_new_tokens, **sampling)
    loop_s = time.perf_counter() - start
    again_tokens, again_s = batched_run(prompt_pass)
    batched_tokens, batched_s = batched_tokens + again_tokens, batched_s + again_s

    device = model.device.type if model.device.type in ("cpu", "cuda") else bound_device()
    dtype = bound_dtype(device)
    flops, parameters = matmul_flops(dtype=dtype, device=device), sum(p.numel() for p in model.parameters())
    bound = flops / (2 * parameters)
    batched, loop = batched_tokens / batched_s, loop_tokens / loop_s
    encoded = prompt_pass.tokens / prompt_pass.seconds if prompt_pass.tokens else float("nan")
    print(f"generation: {batched / loop:.1f}x one-prompt-one-response loop (target >= 8), prompt pass "
          f"{encoded / bound:.1%} of bound | batched {batched:.0f} generated tok/s ({batched_tokens} tokens, batch "
          f"{args.batch_size} prompts x 2, twice), loop {loop:.0f} tok/s ({loop_tokens} tokens), prompt pass "
          f"{encoded:.0f} tok/s ({prompt_pass.tokens} tokens in {prompt_pass.seconds:.2f} of {batched_s:.2f} s, "
          f"{prompt_pass.reused} "
          f"more reused from earlier prompts, "
          f"{next(model.parameters()).dtype}), bound {bound:.0f} tok/s ({flops / 1e9:.0f} GFLOP/s {dtype} matmul / "
          f"(2 x {parameters / 1e6:.2f}M params)) | {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, "
          f"model {args.model} | {device_name(device)}")


if __name__ == "__main__":
    main()
