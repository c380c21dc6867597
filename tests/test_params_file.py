"""Every section of the shipped params.yaml parses into its stage's dataclass."""

import dataclasses
import re
import typing

import pytest
import yaml

from stages import dpo, rl, sft
from stages.base_model import BaseModelParams
from stages.cmv_preprocess import CmvPreprocessParams
from stages.compare import CompareParams
from stages.evaluate import EvaluateParams
from stages.generate_preferences import GeneratePreferencesParams
from stages.import_pairs import ImportPairsParams
from stages.label_ai import LabelAIParams
from stages.label_human import LabelHumanParams
from stages.lib.params import load_params, parse_section
from stages.lib.training import load_variant_params, trainer_config
from stages.p4g_preprocess import P4gPreprocessParams
from stages.persona_dataset import PersonaDatasetParams
from stages.outcome_pairs import OutcomePairsParams
from stages.reward_model import RewardModelParams
from stages.rl import RLParams
from stages.sft_dataset import SftDatasetParams
from stages.tau2_make import Tau2MakeParams
from stages.tau2_to_openai import Tau2ToOpenAIParams
from stages.token_analysis import TokenAnalysisParams
from tests.conftest import REPO_ROOT

SECTIONS = {
    "base_model": BaseModelParams,
    "persona_dataset": PersonaDatasetParams,
    "cmv_preprocess": CmvPreprocessParams,
    "p4g_preprocess": P4gPreprocessParams,
    "sft_dataset": SftDatasetParams,
    "tau2_make": Tau2MakeParams,
    "tau2_to_openai": Tau2ToOpenAIParams,
    "token_analysis": TokenAnalysisParams,
    "outcome_pairs": OutcomePairsParams,
    "generate_preferences": GeneratePreferencesParams,
    "label_ai": LabelAIParams,
    "label_human": LabelHumanParams,
    "import_pairs": ImportPairsParams,
    "rl": RLParams,
    "evaluate": EvaluateParams,
    "compare": CompareParams,
}
# Sections of several parts, parsed by their stage's own loader.
COMPOSITE_SECTIONS = {"sft", "dpo", "reward_model", "judges"}
# Sections that only dvc.yaml reads, through ${...} templating.
TEMPLATE_SECTIONS = {"raw"}


def params() -> dict:
    return load_params(REPO_ROOT / "params.yaml")


def test_every_section_has_a_parser():
    assert set(params()) == set(SECTIONS) | COMPOSITE_SECTIONS | TEMPLATE_SECTIONS


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_parses(section):
    parse_section(params(), section, SECTIONS[section])


def test_every_reward_model_and_judge_parses():
    from stages.lib.judges import parse_judge

    items = set(params()["reward_model"]) - {"defaults"}
    assert items == {"style", "persuasion"}
    for item in items:
        load_variant_params(REPO_ROOT / "params.yaml", "reward_model", item, RewardModelParams)
    kinds = {parse_judge(name, values).kind for name, values in params()["judges"].items()}
    assert kinds == {"reward_model", "pairwise_llm", "scalar_llm", "callable"}


def test_every_sft_workflow_parses_and_has_a_stage():
    from trl import SFTConfig

    workflows = set(params()["sft"]) - {"defaults"}
    for workflow in workflows:
        run = load_variant_params(REPO_ROOT / "params.yaml", "sft", workflow, sft.SFTParams)
        config = trainer_config(SFTConfig, run.params.trainer, f"{run.key}.trainer", REPO_ROOT / "checkpoints", "fp32")
        # Activations are recomputed only where one conversation may be long enough to take the run past 4 GB
        # (measured: 1.4k-token chats 3.3 GB, 2.5k-token games 4.0 GB without recomputing).
        assert config.assistant_only_loss and config.gradient_checkpointing == (config.max_length > 2048)
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert set(dvc_yaml["stages"]["sft"]["foreach"]) == workflows


def test_every_dpo_variant_parses_and_has_a_stage():
    variants = set(params()["dpo"]) - {"defaults"}
    for variant in variants:
        run = load_variant_params(REPO_ROOT / "params.yaml", "dpo", variant, dpo.DPOParams)
        config = dpo.dpo_config(run, REPO_ROOT / "checkpoints", "fp32")
        assert config.max_length > run.params.max_prompt_tokens and not config.gradient_checkpointing
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert set(dvc_yaml["stages"]["dpo"]["foreach"]) == variants


def test_a_dpo_start_set_in_params_is_the_one_dvc_yaml_passes():
    """dpo.py refuses a `start` that differs from --start: a variant with one must get --start from it."""
    items = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["dpo"]["foreach"]
    starts = {variant: (values or {}).get("start") for variant, values in params()["dpo"].items()}
    assert starts.pop("defaults") is None and starts["imported"] == "models/sft/persuasion"
    for variant, start in starts.items():
        assert (items[variant]["start"] == f"${{dpo.{variant}.start}}") == (start is not None), variant


def test_every_rl_algorithm_config_builds_from_its_trainer_block():
    for algorithm in ("ppo", "grpo", "rloo"):
        section = {**params()["rl"], "algorithm": algorithm}
        parsed = parse_section({"rl": section}, "rl", RLParams)
        config = rl.rl_config(parsed, REPO_ROOT / "checkpoints", "fp32")
        assert config.learning_rate == parsed.learning_rate and config.seed == parsed.seed


def own_dataclasses(cls, seen=None):
    """`cls` and the project's dataclasses nested in its fields (library configs are theirs to default)."""
    seen = seen if seen is not None else []
    if dataclasses.is_dataclass(cls) and cls.__module__.startswith("stages") and cls not in seen:
        seen.append(cls)
        for field in dataclasses.fields(cls):
            for inner in [field.type, *typing.get_args(field.type)]:
                own_dataclasses(inner, seen)
    return seen


@pytest.mark.parametrize("cls", [*SECTIONS.values(), sft.SFTParams, dpo.DPOParams], ids=lambda c: c.__name__)
def test_params_yaml_is_the_only_place_a_value_is_set(cls):
    """No params field has a code default that could differ from params.yaml: the parser requires every key."""
    for inner in own_dataclasses(typing.get_type_hints(cls) and cls):
        hints = typing.get_type_hints(inner)
        for field in dataclasses.fields(inner):
            field.type = hints[field.name]
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, \
                f"{inner.__name__}.{field.name} has a code default"


def test_every_params_section_is_read_by_a_stage():
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    declared = set()
    for stage in dvc_yaml["stages"].values():
        stage = stage.get("do", stage)
        for entry in stage.get("params", []):
            declared.update(entry if isinstance(entry, dict) else [entry.split(".")[0]])
    assert set(SECTIONS) | COMPOSITE_SECTIONS <= declared


def test_raw_inputs_exist_and_are_all_used():
    raw = params()["raw"]
    for key, path in raw.items():
        assert (REPO_ROOT / path).exists(), f"raw.{key}: {path} is missing"
    used = set(re.findall(r"\$\{raw\.(\w+)\}", (REPO_ROOT / "dvc.yaml").read_text()))
    assert used == set(raw)
