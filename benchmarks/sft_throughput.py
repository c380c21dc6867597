"""Training tokens/s of the `sft` stage's configuration against trl's defaults and the machine's bound.

One run, same model, same data, same number of steps, each configuration in its own process
(so each peak RSS is its own):
  stage     the SFTConfig the `sft` stage builds from params.yaml (sft.defaults + the workflow)
  defaults  plain trl SFTConfig() (use_cpu=True on a CPU; only bookkeeping fields set)
  bound     measured fp32 matmul FLOP/s / (4 x parameters): forward plus the input-gradient
            half of backward per token, which is all LoRA needs (frozen weights get no gradient)

    python benchmarks/sft_throughput.py --workflow persuasion --steps 3

Targets on the embedded model on a CPU: stage >= 1.5x defaults, stage >= 50% of the bound,
peak RSS <= 4 GB. trl's defaults ask for bf16 autocast, which is very slow on CPUs without
AVX-512 BF16: the data is limited to short conversations to keep that run to minutes.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_flops(size: int = 1024, repeats: int = 20) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def short_records(path: Path, tokenizer, template: str, max_tokens: int) -> list[dict]:
    from stages.lib.chat import read_chat_records, tokenize_chats

    records = read_chat_records(path)
    lengths = tokenize_chats(records, tokenizer, template)
    return [r for r, t in zip(records, lengths) if t.n_tokens <= max_tokens]


def train_once(which: str, args) -> dict:
    """Run `steps` optimizer steps of one configuration; report tokens, seconds, peak RSS."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stages import sft
    from stages.lib.chat import CHATML_TEMPLATE, chat_dataset
    from stages.lib.models import resolve_precision

    params, _ = sft.load_sft_params(str(ROOT / "params.yaml"), args.workflow)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    tokenizer.chat_template = CHATML_TEMPLATE  # renders plain chats exactly as the model's own template
    records = short_records(args.data, tokenizer, CHATML_TEMPLATE, args.max_tokens)
    output_dir = tempfile.mkdtemp()
    bookkeeping = dict(max_steps=args.steps, save_strategy="no", eval_strategy="no", report_to="none",
                       logging_steps=args.steps, include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    if which == "stage":
        config = sft.trainer_config(params, args.workflow, Path(output_dir), resolve_precision(params.precision))
        for key, value in bookkeeping.items():
            setattr(config, key, value)
    else:
        config = SFTConfig(output_dir=output_dir, use_cpu=not torch.cuda.is_available(), **bookkeeping)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=chat_dataset(records), processing_class=tokenizer,
                         peft_config=sft.lora_config(params))
    result = trainer.train()
    return {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "seconds": result.metrics["train_runtime"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch": config.per_device_train_batch_size,
        "bf16": config.bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "examples": len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflow", default="persuasion")
    parser.add_argument("--data", type=Path, default=None, help="default: the workflow's SFT train split")
    parser.add_argument("--model", type=Path, default=ROOT / "models/base")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256, help="use conversations up to this long")
    parser.add_argument("--run", choices=["stage", "defaults"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data is None:
        args.data = ROOT / {"persona": "data/persona/train.jsonl", "persuasion": "data/persuasion/sft/train.jsonl",
                            "agent": "data/agent/openai/train.jsonl"}[args.workflow]

    if args.run:
        print("RESULT " + json.dumps(train_once(args.run, args)))
        return

    results = {}
    for which in ("stage", "defaults"):
        command = [sys.executable, __file__, "--run", which, "--workflow", args.workflow, "--data", str(args.data),
                   "--model", str(args.model), "--steps", str(args.steps), "--max-tokens", str(args.max_tokens)]
        output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            sys.exit(f"{which} run failed:\n{output.stderr[-3000:]}")
        results[which] = json.loads(lines[-1][len("RESULT "):])

    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model)).parameters())
    flops = matmul_flops()
    bound = flops / (4 * parameters)
    stage = results["stage"]["tokens"] / results["stage"]["seconds"]
    defaults = results["defaults"]["tokens"] / results["defaults"]["seconds"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"sft_throughput: {stage / defaults:.1f}x trl defaults (target >= 1.5), {stage / bound:.0%} of bound "
          f"(target >= 50%), peak RSS {results['stage']['peak_rss_mb'] / 1024:.2f} GB (target <= 4) | "
          f"stage {stage:.0f} tok/s (batch {results['stage']['batch']}, bf16 {results['stage']['bf16']}, "
          f"checkpointing {results['stage']['gradient_checkpointing']}), defaults {defaults:.1f} tok/s "
          f"(batch {results['defaults']['batch']}, bf16 {results['defaults']['bf16']}, checkpointing "
          f"{results['defaults']['gradient_checkpointing']}, peak RSS {results['defaults']['peak_rss_mb'] / 1024:.2f} GB), "
          f"bound {bound:.0f} tok/s ({flops / 1e9:.0f} GFLOP/s, {parameters / 1e6:.1f}M params) | {args.steps} steps, "
          f"{results['stage']['examples']} conversations <= {args.max_tokens} tokens from {args.data} | "
          f"{cpu}, {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
