#!/usr/bin/env bash
# Training throughput of the embedded pipeline on a CUDA GPU: tokens/s and model FLOPs utilisation per stage.
#
#   bash benchmarks/gpu.sh            # from anywhere; it works from the repository root
#
# 1. uses the venv $VENV (default .venv; created if missing) and installs the pinned stack as the
#    Makefile does (requirements.txt with constraints.txt, requirements-embedded.txt with --no-deps);
#    if that torch sees no GPU, reinstalls the same version's CUDA build (torch==X+$TORCH_CUDA, default
#    cu128) from $TORCH_INDEX (default the PyTorch wheel index of that build)
# 2. measures the GPU's bf16 peak: an 8192^3 matmul (benchmarks/matmul.py), the MFU denominator
# 3. runs `dvc repro` of the training stages (sft@persona sft@persuasion sft@agent reward_model@style
#    dpo rl, and what they need) from scratch in a copy of the project (benchmarks/pipeline.py
#    --scratch-only), with precision bf16 for sft, dpo and rl; attention is transformers' default, SDPA
# 4. prints per stage: wall time, tokens/s and peak memory from its metrics JSON, and
#    MFU = tokens/s x FLOPs per token / measured peak, FLOPs per token 4 x parameters for LoRA
#    (forward and the input-gradient half of backward), 6 x parameters for full fine-tuning
#
# Everything runs under one deadline of $BUDGET_S seconds (default 480) through `timeout`.
# WORKDIR (default a new temp dir) keeps the copy, its metrics and the logs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUDGET_S=${BUDGET_S:-480}
VENV=${VENV:-.venv}
TORCH_CUDA=${TORCH_CUDA:-cu128}   # the CUDA build's local version label and wheel index
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/$TORCH_CUDA}
WORKDIR=${WORKDIR:-$(mktemp -d -t gpu-bench-XXXXXX)}
REPORT_RESERVE_S=30   # the repro stops this long before the deadline, so the report still prints
TARGETS=(sft@persona sft@persuasion sft@agent reward_model@style dpo rl)
PRECISION=(sft.defaults.precision=bf16 dpo.defaults.precision=bf16 rl.precision=bf16)
deadline=$((SECONDS + BUDGET_S))
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1

step() { printf '== gpu.sh [%3d s] %s\n' "$SECONDS" "$*"; }

# attempt NAME RESERVE_S CMD...: CMD under the time left minus RESERVE_S, one line on a timeout or failure.
attempt() {
  local name=$1 reserve=$2 rc=0
  shift 2
  local left=$((deadline - SECONDS - reserve))
  if ((left <= 0)); then
    step "$name: no time left of the ${BUDGET_S} s budget"
    return 124
  fi
  step "$name (at most ${left} s)"
  timeout --kill-after=10 "$left" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    step "$name: timed out (the whole run has ${BUDGET_S} s; set BUDGET_S for more)"
  elif ((rc != 0)); then
    step "$name: failed (exit $rc)"
  fi
  return "$rc"
}

run_step() { attempt "$@" || exit $?; }

cuda_ok() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
torch_version() { "$PY" -c 'import torch; print(torch.__version__)'; }

step "repository $(pwd), venv $VENV, work directory $WORKDIR, budget ${BUDGET_S} s"
mkdir -p "$WORKDIR"
LOGS=$WORKDIR.logs
mkdir -p "$LOGS"

if [[ ! -x $VENV/bin/python ]]; then
  run_step "create the venv $VENV" 0 python3 -m venv "$VENV"
fi
VENV_BIN=$(cd "$VENV/bin" && pwd)
PY=$VENV_BIN/python
export PATH="$VENV_BIN:$PATH"   # the stage commands in dvc.yaml say `python`
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)   # an array: `timeout` runs no shell functions

run_step "install requirements.txt with constraints.txt" 0 "${PIP[@]}" -r requirements.txt -c constraints.txt
run_step "install requirements-embedded.txt (--no-deps)" 0 "${PIP[@]}" --no-deps -r requirements-embedded.txt

TORCH_VERSION=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' requirements.txt)
if cuda_ok; then
  step "the pinned torch sees a GPU"
else
  CUDA_TORCH="torch==$TORCH_VERSION+$TORCH_CUDA"   # the label keeps pip from settling for a CPU wheel
  step "torch $(torch_version) sees no GPU: $CUDA_TORCH from $TORCH_INDEX"
  # --no-deps first: the download either succeeds or leaves the installed torch alone; then its CUDA dependencies.
  run_step "install $CUDA_TORCH" 0 "${PIP[@]}" --force-reinstall --no-deps "$CUDA_TORCH" --index-url "$TORCH_INDEX"
  run_step "install the CUDA build's dependencies" 0 "${PIP[@]}" "$CUDA_TORCH" --index-url "$TORCH_INDEX" \
    -c constraints.txt
  if ! cuda_ok; then
    step "no CUDA GPU visible to torch $(torch_version): stopping"
    exit 1
  fi
fi
step "$("$PY" -c 'import torch; c = torch.cuda
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {c.get_device_name()}, bf16 {c.is_bf16_supported()}")')"

run_step "measure the bf16 matmul peak (8192^3)" 0 \
  "$PY" benchmarks/matmul.py --device cuda --dtype bfloat16 --size 8192 --repeats 10 --json "$LOGS/matmul.json"

set_args=()
for setting in "${PRECISION[@]}"; do set_args+=(--set "$setting"); done
touch "$LOGS/repro.start"   # the copy keeps the git-tracked metrics of earlier runs: only newer ones count
rc=0
attempt "dvc repro ${TARGETS[*]} from scratch in $WORKDIR" "$REPORT_RESERVE_S" \
  "$PY" benchmarks/pipeline.py --scratch-only --workdir "$WORKDIR" --targets "${TARGETS[@]}" "${set_args[@]}" \
  > >(tee "$LOGS/pipeline.log") 2>&1 || rc=$?
sleep 1   # let tee finish writing the log

step "per-stage throughput (metrics in $WORKDIR/metrics, logs in $LOGS)"
"$PY" - "$WORKDIR" "$LOGS" <<'EOF'
import json
import re
import sys
from pathlib import Path

work, logs = Path(sys.argv[1]), Path(sys.argv[2])
peak = json.loads((logs / "matmul.json").read_text())
wall = dict(re.findall(r"^  (\S+)\s+([\d.]+) s$", (logs / "pipeline.log").read_text(), re.M))
started = (logs / "repro.start").stat().st_mtime


def parameters(model_dir: Path) -> tuple[int, str]:
    """The base model's parameter count and the attention its stages get (loaded as they load it)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return sum(p.numel() for p in model.parameters()), model.config._attn_implementation


n, attention = parameters(work / "models/base")
print(f"gpu: peak {peak['flops'] / 1e12:.1f} TFLOP/s {peak['dtype']} matmul on {peak['name']}; base model "
      f"{n / 1e6:.1f}M params; attention {attention}")
stages = {f"sft@{w}": f"metrics/sft/{w}.json" for w in ("persona", "persuasion", "agent")}
stages.update({"reward_model@style": "metrics/reward_model/style.json",
               **{f"dpo@{v}": f"metrics/dpo/{v}.json" for v in ("rlhf", "rlaif", "rlaif_rlhf")},
               "rl": "metrics/rl.json"})
for stage, path in stages.items():
    seconds = f"wall {float(wall[stage]):.1f} s" if stage in wall else "wall n/a"
    if not (work / path).is_file() or (work / path).stat().st_mtime < started:
        print(f"gpu: {stage:20s} {seconds}; did not run: no {path} from this run")
        continue
    metrics = json.loads((work / path).read_text())
    tokens_per_second = metrics.get("tokens_per_second")
    memory = metrics.get("peak_memory_mb")
    facts = [seconds, f"train {metrics['train_seconds']:.1f} s" if "train_seconds" in metrics else None,
             f"peak memory {memory / 1024:.2f} GB" if memory is not None else None,
             metrics.get("precision", "precision not recorded"), metrics.get("method")]
    if tokens_per_second:
        per_token = 6 if metrics.get("method") == "full" else 4
        mfu = tokens_per_second * per_token * n / peak["flops"]
        head = f"{tokens_per_second:.0f} tok/s, MFU {mfu:.2%} ({per_token} x params FLOPs a token)"
    else:
        head = "tok/s n/a (its metrics carry no token count)"
    print(f"gpu: {stage:20s} {head}; " + ", ".join(f for f in facts if f))
EOF
if ((rc != 0)); then
  step "the repro failed (exit $rc): see $LOGS/pipeline.log"
  exit "$rc"
fi
step "done in ${SECONDS} s (budget ${BUDGET_S} s)"
