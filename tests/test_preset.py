import shutil

import pytest
import yaml

from stages import dpo, sft
from stages.lib import StageError
from stages.lib.params import load_params, parse_section
from stages.lib.training import load_variant_params
from tests.conftest import REPO_ROOT
from tests.test_params_file import SECTIONS
from tools import preset

PRESETS = sorted((REPO_ROOT / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_shipped_preset_applies_and_every_section_still_parses(tmp_path, path):
    params = shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    changed = preset.main([str(path), "--params", str(params)])
    wanted = yaml.safe_load(path.read_text())
    assert changed and set(changed) <= set(wanted)
    values = load_params(params)
    for dotted, value in wanted.items():
        node = values
        for part in dotted.split("."):
            node = node[part]
        assert node == value, dotted
    for section, cls in SECTIONS.items():
        parse_section(values, section, cls)
    for workflow in set(values["sft"]) - {"defaults"}:
        load_variant_params(params, "sft", workflow, sft.SFTParams)
    for variant in set(values["dpo"]) - {"defaults"}:
        load_variant_params(params, "dpo", variant, dpo.DPOParams)
    # Comments of params.yaml survive the edit.
    assert "# One section per stage" in params.read_text()


def test_as_set_prints_dvc_exp_run_options(capsys):
    options = preset.main([str(PRESETS[0]), "--as-set"])
    assert capsys.readouterr().out.strip() == " ".join(options)
    assert all(option.startswith("-S ") and "=" in option for option in options)


@pytest.mark.parametrize("text, message", [
    ("sft.persuasion.trainer.learning_rate: 1.0e-4\ngenerate_preferences.ai_pool_sise: 10\n",
     r"generate_preferences\.ai_pool_sise: params\.yaml has no such key$"),
    ("nosection.key: 1\n", r"nosection\.key: params\.yaml has no 'nosection'$"),
    ("just: [a list\n", r"bad\.yaml:\d+: invalid YAML"),
    ("- a\n- b\n", r"bad\.yaml: a preset maps dotted params keys"),
])
def test_bad_preset_is_one_line_and_leaves_params_alone(tmp_path, text, message):
    params = shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    before = params.read_text()
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(StageError, match=message):
        preset.main([str(tmp_path / "bad.yaml"), "--params", str(params)])
    assert params.read_text() == before
