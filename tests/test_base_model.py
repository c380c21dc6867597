import json
from pathlib import Path

import pytest
import torch

from stages import base_model
from stages.lib import StageError
from stages.lib.models import load_tokenizer
from tests.conftest import params_file


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 32) -> str:
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(tmp_path: Path, **section) -> dict:
    params = params_file(tmp_path / "params.yaml", {"base_model": section})
    return base_model.main(["--params", str(params), "--out", str(tmp_path / "base"),
                            "--metrics", str(tmp_path / "metrics.json")])


def test_local_model_is_saved_as_safetensors_with_identical_outputs(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, source=str(tiny_model_dir))
    out = tmp_path / "base"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    original, saved = load_causal_lm(tiny_model_dir), load_causal_lm(out)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    assert torch.equal(original(ids).logits, saved(ids).logits)

    tokenizer = load_tokenizer(out)
    chat = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == \
        load_tokenizer(tiny_model_dir).apply_chat_template(chat, tokenize=False)
    assert tokenizer.pad_token is not None

    assert metrics["parameters"] == sum(p.numel() for p in original.parameters())
    assert metrics["vocab_size"] == len(tokenizer) == 384
    assert metrics["hidden_size"] == 32 and metrics["layers"] == 2
    assert metrics["source"] == f"local:{tiny_model_dir}"
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_saved_dtype_follows_param(tmp_path, tiny_model_dir):
    run(tmp_path, source=str(tiny_model_dir), dtype="bfloat16")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize("source, message", [
    ("./no/such/model", r"^base_model\.source: path './no/such/model' does not exist$"),
    ("/no/such/model", r"^base_model\.source: path '/no/such/model' does not exist$"),
    ("not-a-model-id", r"^base_model\.source: path 'not-a-model-id' does not exist$"),
    ("someorg/somemodel", r"^base_model\.source: 'someorg/somemodel' is not a local path and could not be loaded"),
])
def test_missing_source_is_one_line_naming_the_key(tmp_path, source, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, source=source)
    assert not (tmp_path / "base").exists() and not (tmp_path / "metrics.json").exists()


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match=r"^base_model\.source: '.*empty' has no config\.json"):
        run(tmp_path, source=str(tmp_path / "empty"))


def test_a_source_with_quantized_weights_is_refused_in_one_line(tmp_path, tiny_model_dir, monkeypatch):
    # Later stages run without bitsandbytes (stages.lib.errors.run_stage), so models/base must hold plain weights.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained

    def quantized(*args, **kwargs):
        model = loaded(*args, **kwargs)
        model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", quantized)
    with pytest.raises(StageError, match=r"^base_model\.source: '.*' holds weights quantized by bitsandbytes; give the "
                                         r"unquantized model \(method: qlora quantizes it when it trains\)$"):
        run(tmp_path, source=str(tiny_model_dir))
    assert not (tmp_path / "base").exists() and not (tmp_path / "metrics.json").exists()


def test_bad_params_name_the_key(tmp_path):
    with pytest.raises(StageError, match=r"^base_model\.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'fp8'$"):
        run(tmp_path, source="embedded", dtype="fp8")
    with pytest.raises(StageError, match=r"^base_model\.sorce: unknown key \(did you mean 'source'\?\)$"):
        run(tmp_path, sorce="embedded")


@pytest.mark.slow
def test_embedded_model_answers_a_chat_prompt(tmp_path):
    metrics = run(tmp_path, source="embedded")
    assert metrics["source"] == "embedded:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert metrics["parameters"] == 134_515_008 and metrics["vocab_size"] == 49_152
    out = tmp_path / "base"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer, model = load_tokenizer(out), load_causal_lm(out)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    reply = greedy_reply(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    assert reply.strip(), "the saved model gave an empty greedy reply"
    assert "Paris" in reply
