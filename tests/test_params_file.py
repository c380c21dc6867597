"""Every section of the shipped params.yaml parses into its stage's dataclass."""

import pytest
import yaml

from stages.base_model import BaseModelParams
from stages.lib.params import load_params, parse_section
from tests.conftest import REPO_ROOT

SECTIONS = {
    "base_model": BaseModelParams,
}


def test_every_section_has_a_parser():
    assert set(load_params(REPO_ROOT / "params.yaml")) == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_parses(section):
    parse_section(load_params(REPO_ROOT / "params.yaml"), section, SECTIONS[section])


def test_every_params_section_is_read_by_a_stage():
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    declared = set()
    for stage in dvc_yaml["stages"].values():
        for entry in stage.get("params", []):
            declared.update(entry if isinstance(entry, dict) else [entry.split(".")[0]])
    assert set(SECTIONS) <= declared
