"""Measured matrix-multiply FLOP/s of this machine: the peak the throughput benchmarks divide by.

The dtype is the one training can use here: bf16 on a CUDA GPU with bf16 and on a CPU with
AVX-512 BF16 or AMX (stages.lib.models.cpu_has_bf16), fp32 otherwise (without them bf16 matmuls
on a CPU are slower than fp32, so fp32 is the faster path and the honest bound).
sft_throughput.py and generation.py import `matmul_flops` and `bound_dtype`; benchmarks/gpu.sh
runs this script for its denominator.

    python benchmarks/matmul.py                      # this machine's device and dtype, 1024 x 1024
    python benchmarks/matmul.py --size 8192          # a GPU needs large matrices to reach its peak

Prints one line: `matmul: <GFLOP/s> GFLOP/s <dtype> on <device> ...`; --json PATH also writes
{"flops", "dtype", "device", "name", "size"} there (benchmarks/gpu.sh reads it).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bound_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bound_dtype(device: str) -> str:
    """bfloat16 where this device runs bf16 matmuls natively, else float32."""
    import torch

    from stages.lib.models import cpu_has_bf16

    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"


def matmul_flops(size: int = 1024, repeats: int = 20, dtype: str | None = None, device: str | None = None) -> float:
    """FLOP/s of the best of three rounds of `repeats` square `size` products, after three warm-ups."""
    import torch

    device = device or bound_device()
    dtype = dtype or bound_dtype(device)
    a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def model_parameters(model) -> int:
    """Parameters of the causal LM in directory `model`, counted on the meta device (nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or platform.machine())
    return f"{cpu}, {os.cpu_count()} cpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="square matrices of this side")
    parser.add_argument("--repeats", type=int, default=20, help="products per timed round")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bf16 where it is native")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    device = args.device or bound_device()
    dtype = args.dtype or bound_dtype(device)
    flops = matmul_flops(args.size, args.repeats, dtype, device)
    name = device_name(device)
    print(f"matmul: {flops / 1e9:.1f} GFLOP/s {dtype} on {device} | {args.size}^3, best of 3 x {args.repeats} | {name}")
    if args.json:
        args.json.write_text(json.dumps({"flops": flops, "dtype": dtype, "device": device, "name": name,
                                         "size": args.size}) + "\n")


if __name__ == "__main__":
    main()
