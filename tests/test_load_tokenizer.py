"""Loading a tokenizer: the class AutoTokenizer would pick, without importing torch for the generic one."""

import json
import shutil
import subprocess
import sys

import pytest

from stages.lib import StageError
from stages.lib.models import load_tokenizer
from tests.conftest import REPO_ROOT

PROBE = """
import sys
from stages.lib.models import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1])
print(type(tokenizer).__name__, "torch" in sys.modules, tokenizer("public goods")["input_ids"])
"""

MESSAGES = [{"role": "user", "content": "How many coins go to the pot?"},
            {"role": "assistant", "content": '{"types": [{"id": "type_1"}]}'}]


def test_a_generic_tokenizer_loads_without_torch_and_matches_auto_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    result = subprocess.run([sys.executable, "-c", PROBE, str(tiny_model_dir)], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    auto = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert result.stdout.split(" ", 2)[:2] == [type(auto).__name__, "False"], result.stderr
    assert result.stdout.split(" ", 2)[2].strip() == str(auto("public goods")["input_ids"])

    loaded = load_tokenizer(tiny_model_dir)
    assert type(loaded) is type(auto)
    assert loaded.apply_chat_template(MESSAGES) == auto.apply_chat_template(MESSAGES)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (
        auto.pad_token_id, auto.eos_token_id, auto.padding_side)


@pytest.mark.parametrize("change", ["other class", "no tokenizer.json", "broken config"])
def test_any_other_directory_goes_through_auto_tokenizer(tiny_model_dir, tmp_path, monkeypatch, change):
    import transformers

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_path = model / "tokenizer_config.json"
    if change == "other class":
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    elif change == "no tokenizer.json":
        (model / "tokenizer.json").unlink()
    else:
        config_path.write_text("{not json")
    calls = []

    class Recording:
        @staticmethod
        def from_pretrained(path):
            calls.append(path)
            return "auto"

    monkeypatch.setattr(transformers, "AutoTokenizer", Recording)
    assert load_tokenizer(model) == "auto" and calls == [str(model)]


def test_a_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(StageError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "absent")
