"""How far attention alone keeps a LoRA training step from the matmul bound, at a given sequence length.

The training bound of sft_throughput.py counts the weight matmuls only: 4 x parameters FLOP a token.
Attention adds work that grows with the sequence: this measures, in one run, on the bound's device
and dtype (benchmarks/matmul.py):
  attention  torch's scaled_dot_product_attention (what the stages train with: the model's SDPA),
             causal, forward + backward, the model's query and key/value heads and head size, one
             sequence of --length tokens, times the model's layers
  matmuls    the 4 x parameters x length FLOP of the same sequence at the measured matmul FLOP/s
and prints the ceiling a step could reach if every matmul ran at the measured peak and nothing but
attention came on top: tokens / (matmul time + attention time), as a share of the bound.

    python benchmarks/attention.py --model models/base --length 1024
    python benchmarks/attention.py --model DIR --length 64 --repeats 1
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from matmul import (bound_device, bound_dtype, device_name, matmul_flops,  # noqa: E402  (benchmarks/matmul.py)
                    model_parameters)


def attention_seconds(config, length: int, dtype: str, device: str, repeats: int) -> float:
    """Best time of causal SDPA forward + backward for one sequence through one layer's heads."""
    import torch

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kind = getattr(torch, dtype)
    query = torch.randn(1, heads, length, dim, device=device, dtype=kind, requires_grad=True)
    key, value = (torch.randn(1, kv_heads, length, dim, device=device, dtype=kind, requires_grad=True)
                  for _ in range(2))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                               enable_gqa=kv_heads != heads)
        out.backward(torch.ones_like(out))
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/base")
    parser.add_argument("--length", type=int, default=1024, help="tokens in the sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best counts)")
    args = parser.parse_args()

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    parameters = model_parameters(args.model)
    device = bound_device()
    dtype = bound_dtype(device)
    flops = matmul_flops(dtype=dtype, device=device)
    layer = attention_seconds(config, args.length, dtype, device, args.repeats)
    attention = layer * config.num_hidden_layers
    matmuls = 4 * parameters * args.length / flops
    bound = args.length / matmuls
    ceiling = args.length / (matmuls + attention)
    print(f"attention: at {args.length} tokens, attention takes {attention / (matmuls + attention):.0%} of a step "
          f"whose matmuls run at peak: ceiling {ceiling:.0f} tok/s = {ceiling / bound:.1%} of bound | attention "
          f"{attention * 1e3:.1f} ms ({config.num_hidden_layers} layers x {layer * 1e3:.2f} ms SDPA forward + "
          f"backward, {config.num_attention_heads} heads), matmuls {matmuls * 1e3:.1f} ms at {flops / 1e9:.0f} "
          f"GFLOP/s {dtype}, bound {bound:.0f} tok/s (4 x {parameters / 1e6:.2f}M params) | model {args.model} | "
          f"{device_name(device)}")


if __name__ == "__main__":
    main()
