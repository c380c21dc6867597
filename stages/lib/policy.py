"""Loading a trained policy: a full model, an SFT adapter, or an adapter trained on top of others.

An adapter trained on top of earlier adapters (DPO on SFT, DPO on DPO, PPO on SFT) is saved with
`stack.json`: the base model directory and the adapters merged into it, in order, before this
adapter was trained. Loading replays the merges, so the result is the model that was trained.
"""

import json
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.models import load_tokenizer, require_model_dir, torch_dtype
from stages.lib.tools import read_tools

STACK_FILE = "stack.json"
# Written by the SFT stage into a model trained on chats with tools: the records' own "tools" list.
MODEL_TOOLS_FILE = "tools.json"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def require_policy_dir(path: str | Path, key: str) -> Path:
    """A model directory or an adapter directory; anything else is a one-line error naming `key`."""
    path = Path(path)
    if is_adapter(path):
        return path
    return require_model_dir(path, key)


def policy_stack(path: str | Path) -> tuple[Path, list[Path]]:
    """(base model directory, adapters to merge in order, `path` last if it is an adapter)."""
    path = Path(path)
    if not is_adapter(path):
        return require_model_dir(path, str(path)), []
    stack_file = path / STACK_FILE
    if stack_file.is_file():
        try:
            stack = json.loads(stack_file.read_text())
            base, below = Path(stack["base"]), [Path(p) for p in stack["adapters"]]
        except (ValueError, KeyError, TypeError) as err:
            raise StageError(f"{stack_file}: not a valid adapter stack ({err})") from None
    else:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        base, below = Path(config.get("base_model_name_or_path") or ""), []
    require_model_dir(base, f"{path}: base model")
    for adapter in below:
        if not is_adapter(adapter):
            raise StageError(f"{stack_file}: adapter directory '{adapter}' not found")
    return base, [*below, path]


def write_stack(out_dir: Path, base: Path, adapters: list[Path]) -> None:
    """Record, next to a new adapter, what it was trained on top of."""
    (out_dir / STACK_FILE).write_text(json.dumps(
        {"base": str(base), "adapters": [str(a) for a in adapters]}, indent=2) + "\n")


def load_merged(path: str | Path, dtype: str = "float32", keep_last_adapter: bool = False):
    """The policy at `path` with every adapter merged into the base weights.

    With `keep_last_adapter`, the last adapter stays a live PEFT adapter on top of the merged rest.
    """
    from transformers import AutoModelForCausalLM

    base, adapters = policy_stack(path)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype(dtype))
    if adapters:
        from peft import PeftModel

        for i, adapter in enumerate(adapters):
            model = PeftModel.from_pretrained(model, str(adapter))
            if not (keep_last_adapter and i == len(adapters) - 1):
                model = model.merge_and_unload()
    return model


def load_policy(path: str | Path, dtype: str = "float32", padding_side: str = "left"):
    """(model in eval mode with adapters merged, tokenizer with a pad token) for generation or scoring."""
    path = Path(path)
    model = load_merged(path, dtype)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def read_model_tools(model_dir: str | Path) -> list[dict] | None:
    """The tools a model was fine-tuned with, from the `tools.json` of its directory or, for an adapter
    trained on top of others, of the nearest model below it in its stack; None when none has one."""
    model_dir = Path(model_dir)
    base, adapters = policy_stack(model_dir)
    for directory in dict.fromkeys([model_dir, *reversed(adapters), base]):
        path = directory / MODEL_TOOLS_FILE
        if path.is_file():
            return read_tools(path)[0]
    return None
