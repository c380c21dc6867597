"""Apply a params preset (configs/presets/*.yaml) to params.yaml, or print it as `dvc exp run -S` options.

A preset maps dotted params keys to values:

    base_model.source: Qwen/Qwen2.5-0.5B-Instruct
    generate_preferences.ai_pool_size: 8000

    python -m tools.preset configs/presets/qwen2.5-0.5b-persuasion.yaml            # edit params.yaml in place
    dvc exp run $(python -m tools.preset configs/presets/qwen2.5-0.5b-persuasion.yaml --as-set)

Editing keeps params.yaml's comments and order; a key that params.yaml does not have is an error (a typo in a
preset would otherwise be a new key that no stage reads), unless its parent is a `trainer:` mapping, which
takes any field of the trainer's config.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.params import DEFAULT_PARAMS


def read_preset(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise StageError(f"{path}: preset not found")
    try:
        preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise StageError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(preset, dict) or not all(isinstance(k, str) and "." in k for k in preset):
        raise StageError(f"{path}: a preset maps dotted params keys (section.key) to values")
    return preset


def yaml11_float(value: float) -> str:
    """`1e-05` is a string to YAML 1.1; `1.0e-05` is a float to both 1.1 and 1.2."""
    text = repr(value)
    if text in ("inf", "-inf", "nan"):
        return {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}[text]
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if not exponent:
        return mantissa
    return f"{mantissa}e{'-' if exponent.startswith('-') else '+'}{exponent.lstrip('+-')}"


def apply(params_path: Path, preset: dict, preset_path: Path) -> list[str]:
    """Set every key of `preset` in params.yaml, keeping its comments; returns the keys whose value changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    # Written so that PyYAML (YAML 1.1, which DVC templating and the stages read with) reads them back the same.
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml.representer.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", yaml11_float(v)))
    params = yaml.load(params_path.read_text(encoding="utf-8"))
    changed = []
    for dotted, value in preset.items():
        *parents, leaf = dotted.split(".")
        node = params
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise StageError(f"{preset_path}: {dotted}: params.yaml has no '{'.'.join(parents[:depth + 1])}'")
            if node[part] is None and parents[depth] == "trainer":
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict) or (leaf not in node and parents[-1:] != ["trainer"]):
            raise StageError(f"{preset_path}: {dotted}: params.yaml has no such key")
        if leaf not in node:
            node.insert(0, leaf, value)  # first in its mapping: trailing comments and blank lines stay put
            changed.append(dotted)
        elif node[leaf] != value:
            node[leaf] = value
            changed.append(dotted)
    with open(params_path, "w", encoding="utf-8") as handle:
        yaml.dump(params, handle)
    return changed


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path(DEFAULT_PARAMS))
    parser.add_argument("--as-set", action="store_true", help="print `-S key=value` options instead of editing")
    args = parser.parse_args(argv)

    preset = read_preset(args.preset)
    if args.as_set:
        options = [f"-S {key}={json.dumps(value)}" for key, value in preset.items()]
        print(" ".join(options))
        return options
    changed = apply(args.params, preset, args.preset)
    print(f"{args.params}: {len(changed)} of {len(preset)} keys changed by {args.preset}", file=sys.stderr)
    return changed


if __name__ == "__main__":
    run_stage(main)
