"""Training tokens/s of the `sft` stage with the project's params against trl's defaults and the machine's bound.

One run, same model, same data, same number of steps; both configurations run the stage itself
(`python -m stages.sft`, each in its own process, so each peak memory is its own), and their figures
are read from the metrics JSON the stage writes (tokens_per_second, tokens_seen, peak_memory_mb):
  stage     params.yaml as it is: sft.defaults with sft.<workflow> on top
  defaults  the same params with every `trainer:` key removed, so trl's SFTConfig defaults apply, and
            precision bf16, which trl's defaults ask for
  bound     measured matmul FLOP/s / (4 x parameters): forward plus the input-gradient half of
            backward per token, which is all LoRA needs (frozen weights get no gradient); the
            matmuls in bf16 where the machine has it (CUDA with bf16, a CPU with AVX-512 BF16 or
            AMX: stages.lib.models.cpu_has_bf16), fp32 otherwise (benchmarks/matmul.py)
Both runs render the chats with the project's ChatML template and train --steps optimizer steps with
no evaluation or checkpoint inside the timed loop.

    python benchmarks/sft_throughput.py --workflow persuasion --steps 3
    python benchmarks/sft_throughput.py --model DIR --data chats.jsonl --params params.yaml --steps 1

--model, --data and --params default to models/base, the workflow's SFT train split and the
project's params.yaml. Prints one line: the stage's training tokens/s, its ratios to trl's
defaults and to the bound, and the absolute figures.

Targets on the embedded model on a CPU: stage >= 1.5x defaults, stage >= 50% of the bound,
peak RSS <= 4 GB. trl's defaults ask for bf16 autocast, which is very slow on CPUs without
AVX-512 BF16: the data is limited to short conversations to keep that run to minutes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from matmul import (bound_device, bound_dtype, device_name, matmul_flops,  # noqa: E402  (benchmarks/matmul.py)
                    model_parameters)

DATA = {"persona": "data/persona/train.jsonl", "persuasion": "data/persuasion/sft/train.jsonl",
        "agent": "data/agent/openai/train.jsonl"}


def write_short_records(source: Path, model: Path, max_tokens: int, out: Path) -> int:
    """The conversations of `source` at most `max_tokens` long (rendered with the project's ChatML template)."""
    from stages.lib.chat import CHATML_TEMPLATE, tokenize_chats
    from stages.lib.io import write_jsonl
    from stages.lib.models import load_tokenizer
    from stages.lib.records import read_chat_records

    records = read_chat_records(source)
    lengths = tokenize_chats(records, load_tokenizer(model), CHATML_TEMPLATE)
    short = [{"messages": r["messages"], "tools": r["tools"]} for r, t in zip(records, lengths)
             if t.n_tokens <= max_tokens]
    if not short:
        sys.exit(f"{source}: no conversation is at most {max_tokens} tokens long")
    return write_jsonl(out, short)


def run_params(path: Path, workflow: str, steps: int, trl_defaults: bool) -> dict:
    """The params file for one run: as it is, or with trl's trainer defaults; the timed loop only trains."""
    params = yaml.safe_load(path.read_text())
    sections = params["sft"]
    sections[workflow] = sections.get(workflow) or {}
    if trl_defaults:
        sections["defaults"].update(trainer={}, precision="bf16")
        sections[workflow]["trainer"] = {}
    # The same rendering in both runs: trl's defaults train on whole chats, for which `auto` would pick
    # the model's own template.
    sections[workflow].update(chat_template="chatml", max_eval_examples=2)
    sections[workflow]["trainer"] = {**(sections[workflow].get("trainer") or {}), "max_steps": steps,
                                     "eval_strategy": "no", "save_strategy": "no", "logging_steps": steps,
                                     "include_num_input_tokens_seen": "non_padding", "disable_tqdm": True}
    return params


def trainer_setting(params: dict, workflow: str, field: str):
    from trl import SFTConfig

    merged = {**(params["sft"]["defaults"].get("trainer") or {}), **params["sft"][workflow]["trainer"]}
    return merged.get(field, SFTConfig.__dataclass_fields__[field].default)


def run_stage(which: str, params: dict, args, data: Path, work: Path) -> dict:
    """One run of `python -m stages.sft`; its metrics JSON with the settings that differ between the runs."""
    run_dir = work / which
    run_dir.mkdir()
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "stages.sft", "--params", str(run_dir / "params.yaml"), "--name", args.workflow,
               "--model", str(args.model), "--train", str(data), "--eval", str(data), "--out", str(run_dir / "model"),
               "--metrics", str(run_dir / "metrics.json"), "--plots", str(run_dir / "plots"),
               "--checkpoints", str(run_dir / "checkpoints")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        sys.exit(f"{which} run failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "batch": trainer_setting(params, args.workflow, "per_device_train_batch_size"),
            "checkpointing": trainer_setting(params, args.workflow, "gradient_checkpointing")}


def report(results: dict, flops: float, dtype: str, parameters: int, args, examples: int) -> str:
    stage, defaults = results["stage"], results["defaults"]
    bound = flops / (4 * parameters)
    speed, baseline = stage["tokens_per_second"], defaults["tokens_per_second"]
    return (f"sft_throughput: {speed / baseline:.1f}x trl defaults (target >= 1.5), {speed / bound:.1%} of bound "
            f"(target >= 50%), peak RSS {stage['peak_memory_mb'] / 1024:.2f} GB (target <= 4) | "
            f"stage {speed:.0f} tok/s ({stage['tokens_seen']} tokens, batch {stage['batch']}, "
            f"{stage['precision']}, checkpointing {stage['checkpointing']}), defaults {baseline:.1f} tok/s "
            f"({defaults['tokens_seen']} tokens, batch {defaults['batch']}, {defaults['precision']}, checkpointing "
            f"{defaults['checkpointing']}, peak RSS {defaults['peak_memory_mb'] / 1024:.2f} GB), "
            f"bound {bound:.0f} tok/s ({flops / 1e9:.0f} GFLOP/s {dtype} matmul / (4 x {parameters / 1e6:.2f}M "
            f"params)) | {args.steps} steps, {examples} conversations <= {args.max_tokens} tokens from {args.data} | "
            f"{device_name(bound_device())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflow", default="persuasion")
    parser.add_argument("--data", type=Path, default=None, help="default: the workflow's SFT train split")
    parser.add_argument("--model", type=Path, default=ROOT / "models/base")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256, help="use conversations up to this long")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="the params both runs start from")
    args = parser.parse_args()
    args.data = args.data or ROOT / DATA[args.workflow]

    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp:
        work = Path(tmp)
        examples = write_short_records(args.data, args.model, args.max_tokens, work / "train.jsonl")
        results = {which: run_stage(which, run_params(args.params, args.workflow, args.steps, which == "defaults"),
                                    args, work / "train.jsonl", work)
                   for which in ("stage", "defaults")}
    dtype = bound_dtype(bound_device())
    print(report(results, matmul_flops(dtype=dtype), dtype, model_parameters(args.model), args, examples))


if __name__ == "__main__":
    main()
