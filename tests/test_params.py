from dataclasses import dataclass, field
from typing import Literal

import pytest

from stages.lib import StageError
from stages.lib.params import load_params, parse_section


@dataclass
class Lora:
    r: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class Example:
    name: str
    steps: int = 10
    lr: float = 1e-4
    mode: Literal["lora", "full"] = "lora"
    limit: int | None = None
    packing: bool = False
    lora: Lora = field(default_factory=Lora)


def parse(section: dict):
    return parse_section({"train": section}, "train", Example)


def test_values_are_converted_and_defaults_kept():
    cfg = parse({"name": "x", "lr": "2e-5", "steps": 3, "lora": {"r": 16}})
    assert cfg.lr == pytest.approx(2e-5)
    assert cfg.steps == 3
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.limit is None and cfg.mode == "lora"


def test_int_accepted_for_float_and_null_for_optional():
    cfg = parse({"name": "x", "lr": 1, "limit": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


@pytest.mark.parametrize("section, message", [
    ({"name": "x", "stpes": 3}, r"^train\.stpes: unknown key \(did you mean 'steps'\?\)$"),
    ({"name": "x", "lora": {"rank": 4}}, r"^train\.lora\.rank: unknown key"),
    ({"steps": 3}, r"^train\.name: missing required key$"),
    ({"name": "x", "steps": "ten"}, r"^train\.steps: expected an integer, got a string 'ten'$"),
    ({"name": "x", "steps": True}, r"^train\.steps: expected an integer"),
    ({"name": "x", "lr": "fast"}, r"^train\.lr: expected a number"),
    ({"name": "x", "mode": "qlora4"}, r"^train\.mode: expected one of 'lora', 'full', got 'qlora4'$"),
    ({"name": "x", "packing": "yes"}, r"^train\.packing: expected true or false"),
    ({"name": "x", "limit": "5"}, r"^train\.limit: expected int or null"),
    ({"name": "x", "lora": {"target_modules": "q_proj"}}, r"^train\.lora\.target_modules: expected a list"),
    ({"name": "x", "lora": {"target_modules": ["q", 3]}}, r"^train\.lora\.target_modules\[1\]: expected a string"),
    ({"name": "x", "lora": 8}, r"^train\.lora: expected a mapping"),
    ({"name": 7}, r"^train\.name: expected a string"),
])
def test_bad_sections_name_the_key(section, message):
    with pytest.raises(StageError, match=message):
        parse(section)


def test_missing_section_is_named():
    with pytest.raises(StageError, match=r"^train: section missing from params$"):
        parse_section({"other": {}}, "train", Example)


def test_post_init_errors_are_reported_against_the_section():
    @dataclass
    class Checked:
        ratio: float = 0.1

        def __post_init__(self):
            if not 0 <= self.ratio < 1:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")

    with pytest.raises(StageError, match=r"^split\.ratio: must be in \[0, 1\), got 1.5$"):
        parse_section({"split": {"ratio": 1.5}}, "split", Checked)


def test_trl_config_class_parses_and_rejects_unknown_keys():
    from trl import SFTConfig

    cfg = parse_section({"sft": {"output_dir": "out", "use_cpu": True, "bf16": False, "learning_rate": "5e-5", "max_steps": 2}}, "sft", SFTConfig)
    assert cfg.learning_rate == pytest.approx(5e-5) and cfg.max_steps == 2
    with pytest.raises(StageError, match=r"^sft\.learnig_rate: unknown key \(did you mean 'learning_rate'\?\)"):
        parse_section({"sft": {"output_dir": "out", "learnig_rate": 1e-4}}, "sft", SFTConfig)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  name: x\n  steps: [1, 2\n  lr: 3\n")
    with pytest.raises(StageError, match=r"params\.yaml:\d+: invalid YAML"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(StageError, match=r"nope\.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")
