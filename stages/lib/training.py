"""The shape every training stage shares (sft, dpo, reward_model, rl).

params   `<section>.defaults` with `<section>.<name>` on top, each checked under the key the user wrote
config   the trl / transformers config from the section's `trainer:` block; the stage adds only paths,
         precision and logging (`STAGE_FIELDS`), which `trainer:` may not set
model    LoRA and 4-bit loading through trl's `ModelConfig` / `get_peft_config` / `get_quantization_config`
live     one DVCLive directory per run (the stage's `--plots`), attached as the trainer's callback
save     model + tokenizer + adapter stack + model card, written whole or not at all
"""

import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from stages.lib.errors import StageError
from stages.lib.io import atomic_dir, file_md5
from stages.lib.log import get_logger
from stages.lib.models import resolve_precision
from stages.lib.params import build, load_params
from stages.lib.policy import is_adapter, write_stack

T = TypeVar("T")
log = get_logger("training")

# Trainer-config fields that come from the stage itself (paths from dvc.yaml, precision from `precision`).
STAGE_FIELDS = frozenset({"output_dir", "bf16", "fp16", "use_cpu", "report_to", "logging_dir", "push_to_hub",
                          "hub_model_id", "resume_from_checkpoint"})


@dataclass
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | str


def refuse_stage_fields(trainer: Mapping[str, Any], also: Iterable[str] = ()) -> None:
    """For a params `__post_init__`: a `trainer:` key the stage sets itself is an error naming it."""
    managed = sorted((STAGE_FIELDS | set(also)) & set(trainer))
    if managed:
        raise ValueError(f"trainer {managed[0]} is set by the stage, not in params")


def merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, nested dicts merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Section:
    """A fan-out stage's params: `<section>.defaults` with `<section>.<name>` on top."""
    params: Any          # the parsed dataclass
    values: dict         # the merged mapping it was parsed from (logged, and written into the model card)
    key: str             # `<section>.<name>`, the prefix of every error about this run
    own: dict            # what `<section>.<name>` itself sets

    def where(self, path: str) -> str:
        """The key the user wrote for `path` (e.g. `trainer.beta`): the item's own block, else `defaults`."""
        node = self.own
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return f"{self.key.rsplit('.', 1)[0]}.defaults.{path}"
            node = node[part]
        return f"{self.key}.{path}"


def load_variant_params(path, section: str, name: str, cls: type[T]) -> Section:
    """`<section>.defaults` with `<section>.<name>` on top; each part checked under its own name."""
    values = load_params(path).get(section)
    if not isinstance(values, dict) or "defaults" not in values:
        raise StageError(f"{section}.defaults: section missing from params")
    if name not in values:
        have = ", ".join(k for k in values if k != "defaults")
        raise StageError(f"{section}.{name}: no such entry in params (have: {have})")
    build(cls, values["defaults"], f"{section}.defaults")
    merged = merge(values["defaults"] or {}, values[name] or {})
    return Section(build(cls, merged, f"{section}.{name}"), merged, f"{section}.{name}", values[name] or {})


def trainer_config(config_class: type[T], trainer: Mapping[str, Any], key: str, output_dir: Path, precision: str,
                   where=None, **from_stage) -> T:
    """`config_class` from a `trainer:` block plus the fields the stage sets, with every RNG seeded from its
    `seed`; errors name `key.<field>`, or the key `where(field path)` returns (the block the user actually
    wrote it in)."""
    import torch

    values = {**trainer, **from_stage, "output_dir": str(output_dir), "report_to": "none",
              "bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not torch.cuda.is_available()}
    try:
        config = build(config_class, values, key)
    except StageError as err:
        field_key, _, rest = str(err).partition(": ")
        name = field_key[len(key) + 1:].split(".")[0] if field_key.startswith(key + ".") else None
        if where is None or name is None or name not in trainer:
            raise
        raise StageError(f"{where('trainer.' + field_key[len(key) + 1:])}: {rest}") from None
    from transformers import set_seed

    # The trainers seed in their own __init__, but trl's SFT and DPO trainers draw the LoRA weights before
    # that: unseeded, two runs of the same params would start from different adapters.
    set_seed(config.seed)
    return config


def training_precision(choice: str, method: str, key: str) -> str:
    """`auto` resolved for this machine (see `resolve_precision`); fp16 without CUDA is an error naming `key`."""
    import torch

    precision = resolve_precision(choice, method)
    if precision == "fp16" and not torch.cuda.is_available():
        raise StageError(f"{key}: fp16 needs a CUDA GPU; use auto, bf16 or fp32")
    return precision


def model_config(method: str, lora: LoraParams, precision: str):
    """trl's `ModelConfig` for `method`: LoRA (lora, qlora) and 4-bit NF4 frozen weights (qlora)."""
    from trl import ModelConfig

    compute = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    return ModelConfig(use_peft=method != "full", lora_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                       lora_target_modules=lora.target_modules, lora_task_type="CAUSAL_LM",
                       load_in_4bit=method == "qlora", bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                       dtype=compute if method == "qlora" else "float32")


def load_trainable(model_dir: Path, config):
    """A causal LM to train: fp32 weights (autocast runs bf16 / fp16), or frozen 4-bit weights for qlora."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, config.dtype),
                                                quantization_config=get_quantization_config(config))


def check_qlora(key: str) -> None:
    """Quantize and run one small layer, so a missing 4-bit backend fails here in one line."""
    import torch

    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = layer.to(device)
        layer(torch.zeros(1, 64, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot run here
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise StageError(f"{key}: qlora needs bitsandbytes 4-bit support, which cannot run here ({reason}); "
                         f"use lora or full") from None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def live_callbacks(plots: Path, resume: bool = False) -> list:
    """The trainer's DVCLive callback writing to `plots` (main process only; other ranks log nothing)."""
    if not is_main_process():
        return []
    from transformers.integrations import DVCLiveCallback

    from stages.lib.live import open_live

    return [DVCLiveCallback(live=open_live(plots, resume=resume, fresh=not resume))]


def step_clock():
    """A trainer callback summing the seconds spent inside optimizer steps (forward, backward, update), so
    evaluation, checkpoint saves and logging between steps do not count as training time (`.seconds`)."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        seconds = 0.0
        started = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.started is not None:
                self.seconds += time.perf_counter() - self.started
                self.started = None

    return StepClock()


def checkpoint_dir(root: Path, values: dict, files: Iterable[Path], model_dir: Path) -> Path:
    """`root/<hash of params, data and base model>`; checkpoints of other keys can never resume: removed."""
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(file_md5(path).encode())
    for name in sorted(os.listdir(model_dir)):
        digest.update(f"{name}:{(model_dir / name).stat().st_size}".encode())
    digest.update((model_dir / "config.json").read_bytes())
    directory = root / digest.hexdigest()[:16]
    if is_main_process() and root.is_dir():
        for stale in root.iterdir():
            if stale != directory:
                shutil.rmtree(stale, ignore_errors=True)
    return directory


def complete_checkpoint(path: Path) -> bool:
    """Whether the trainer finished saving `path`: it writes trainer_state.json last, after the weights,
    optimizer and RNG state, so a parsable state naming the folder's own step marks a finished save."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    return (isinstance(state, dict) and state.get("global_step") == checkpoint_step(path)
            and any((path / name).is_file() for name in weights))


def checkpoint_step(path: Path) -> int | None:
    number = path.name.removeprefix("checkpoint-")
    return int(number) if path.name.startswith("checkpoint-") and number.isdigit() else None


def resumable_checkpoint(directory: Path) -> str | None:
    """The latest complete `checkpoint-N` in `directory`, if any. Checkpoints whose save was cut off
    (a kill during the save) are logged and removed: resuming from one would fail."""
    if not directory.is_dir():
        return None
    found = sorted((p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    latest = None
    for path in found:
        if complete_checkpoint(path):
            latest = latest or str(path)
        elif is_main_process():
            log.warning("removing %s: its save was cut off (no complete trainer state and weights)", path)
            shutil.rmtree(path, ignore_errors=True)
    return latest


# Metric names holding these words measure the run (speed, memory), not the model: they stay in the stage's metrics
# file and out of the model card, so that a rerun that trains the same weights writes the same model directory.
RUN_MEASURES = ("second", "memory", "rss")


def model_card(title: str, facts: list[str], data: Mapping[str, Path], metrics: dict, params: dict,
               usage: str) -> str:
    """One model card for every trained model: what it came from, the data's md5s, metrics and params (the run's
    speed and memory left out: `RUN_MEASURES`)."""
    lines = [
        f"# {title}", "", *[f"- {fact}" for fact in facts],
        *[f"- {role} `{path}`: md5 `{file_md5(path)}` (as recorded in dvc.lock)" for role, path in data.items()],
        "", "## Metrics", "", "| metric | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in metrics.items()
          if not any(word in key for word in RUN_MEASURES)],
        "", "## Params", "", "```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```", "",
        usage, "",
    ]
    return "\n".join(lines)


def sort_target_modules(directory: Path) -> None:
    """Rewrite an adapter's config with its target modules sorted: peft writes the set it matched in the process's
    string-hash order, which changes from run to run, and with it the directory's hash that later stages depend on."""
    path = Path(directory) / "adapter_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_trained(out: Path, model, tokenizer, card: str, stack: tuple[Path, list[Path]] | None = None,
                 extra: Callable[[Path], Any] | None = None) -> None:
    """Write `out` whole: the model (or adapter), its tokenizer, `stack.json` for an adapter trained on merged
    adapters (`stack`: base model and adapters below), what `extra(dir)` writes, and the model card."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        sort_target_modules(tmp)
        tokenizer.save_pretrained(str(tmp))
        if stack is not None and is_adapter(tmp):
            write_stack(tmp, *stack)
        if extra is not None:
            extra(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
