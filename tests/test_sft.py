import json
import subprocess
import sys

import pytest
import torch

from stages import sft
from stages.lib import StageError
from stages.lib.chat import CHATML_TEMPLATE, chat_dataset, tokenize_chats
from stages.lib.records import read_chat_records
from stages.lib.models import load_tokenizer, resolve_precision
from tests.chats import chat, tool_chat, write_jsonl
from stages.lib.io import file_md5
from tests.conftest import params_file, venv_env, write_params

FAST = {"max_steps": 12, "logging_steps": 2, "eval_steps": 4, "save_steps": 4, "learning_rate": 5e-3,
        "max_length": 512}


@pytest.fixture
def data(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(20)] + [tool_chat(i) for i in range(6)])
    val = write_jsonl(tmp_path / "val.jsonl", [chat(i) for i in range(40, 46)] + [tool_chat(99)])
    return train, val


def run(tmp_path, tiny_model_dir, data, workflow="toy", defaults=None, **overrides):
    defaults = {"lora": {"r": 8, "alpha": 16}, "trainer": dict(FAST), **(defaults or {})}
    params = params_file(tmp_path / "params.yaml", {"sft": {"defaults": defaults, workflow: overrides}})
    train, val = data
    return sft.main(["--params", str(params), "--name", workflow, "--model", str(tiny_model_dir),
                     "--train", str(train), "--eval", str(val), "--out", str(tmp_path / "out"),
                     "--metrics", str(tmp_path / "metrics.json"), "--checkpoints", str(tmp_path / "checkpoints"),
                     "--plots", str(tmp_path / "plots" / "sft" / workflow)])


def test_lora_training_lowers_eval_loss_and_saves_an_adapter(workdir, tiny_model_dir, data):
    metrics = run(workdir, tiny_model_dir, data)
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["steps"] == 12 and metrics["method"] == "lora" and metrics["precision"] == resolve_precision("auto")
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    assert json.loads((workdir / "metrics.json").read_text()) == metrics

    out = workdir / "out"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    tuned = AutoPeftModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 5, 9, 42]])
    assert not torch.allclose(tuned(ids).logits, base(ids).logits)
    # The tokenizer saved with the adapter carries the template it was trained with.
    assert load_tokenizer(out).chat_template == CHATML_TEMPLATE

    card = (out / "README.md").read_text()
    assert file_md5(data[0]) in card and f"| eval_loss | {metrics['eval_loss']} |" in card

    losses = (workdir / "plots" / "sft" / "toy" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert losses[0] == "step\tloss" and len(losses) == 1 + 12 // 2
    eval_losses = (workdir / "plots" / "sft" / "toy" / "plots" / "metrics" / "eval" / "loss.tsv").read_text()
    assert len(eval_losses.splitlines()) >= 4  # base, every 4 steps, final
    # Checkpoints are scaffolding: gone once the final adapter is saved.
    assert not any((workdir / "checkpoints" / "toy").iterdir())


def test_loss_mask_covers_exactly_the_assistant_tokens(workdir, tiny_model_dir, data):
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    records = read_chat_records(data[0])[:3] + read_chat_records(data[0])[-2:]
    config = SFTConfig(output_dir=str(workdir / "o"), use_cpu=True, bf16=False, assistant_only_loss=True,
                       max_length=None, report_to="none")
    trainer = SFTTrainer(model=str(tiny_model_dir), args=config, train_dataset=chat_dataset(records),
                         processing_class=tokenizer)
    expected = tokenize_chats(records, tokenizer, CHATML_TEMPLATE)
    for row, tokens in zip(trainer.train_dataset, expected):
        masked = [i for i, label in enumerate(row["labels"]) if label != -100]
        assert masked == [i for first, last in tokens.assistant_spans for i in range(first, last)]
        decoded = tokenizer.decode([row["input_ids"][i] for i in masked])
        assert decoded.endswith("<|im_end|>") and "<|im_start|>" not in decoded and "user" not in decoded


def test_each_tool_call_renders_once_with_arguments_encoded_once(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    record = tool_chat(7)
    record["messages"][2]["tool_calls"].append(
        {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"id": "8", "q": [1, {"a": "é"}]}, ensure_ascii=False)}})
    text = tokenizer.apply_chat_template(record["messages"], tools=record["tools"], tokenize=False,
                                         chat_template=CHATML_TEMPLATE)
    assert text.count('<tool_call>\n{"name": "lookup", "arguments": {"id": "7"}}\n</tool_call>') == 1
    assert text.count('{"name": "lookup", "arguments": {"id": "8", "q": [1, {"a": "é"}]}}') == 1
    assert '\\"' not in text  # no argument was JSON-encoded a second time
    assistant_turn = text.split("<|im_start|>assistant\n")[1]
    calls = [json.loads(block.split("\n")[1]) for block in assistant_turn.split("<tool_call>")[1:]]
    assert [c["arguments"] for c in calls] == [{"id": "7"}, {"id": "8", "q": [1, {"a": "é"}]}]
    # The same chat with arguments as objects renders identically.
    for call in record["messages"][2]["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    assert tokenizer.apply_chat_template(record["messages"], tools=record["tools"], tokenize=False,
                                         chat_template=CHATML_TEMPLATE) == text


def test_plain_chats_render_as_the_models_own_template(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    for record in (chat(0), chat(5)):
        for generation_prompt in (False, True):
            messages = record["messages"][:-1] if generation_prompt else record["messages"]
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 chat_template=CHATML_TEMPLATE) == \
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_full_fine_tuning_and_qlora(workdir, tiny_model_dir, qlora_model_dir, data):
    full = run(workdir, tiny_model_dir, data, method="full", trainer={"learning_rate": 1e-3})
    assert full["eval_loss"] < full["base_eval_loss"]
    assert (workdir / "out" / "model.safetensors").is_file() and not (workdir / "out" / "adapter_config.json").exists()
    qlora = run(workdir, qlora_model_dir, data, method="qlora")
    assert qlora["method"] == "qlora" and qlora["eval_loss"] < qlora["base_eval_loss"]
    assert (workdir / "out" / "adapter_config.json").is_file()


class Killed(Exception):
    """Stands in for the process being killed mid-training."""


def test_killed_run_resumes_from_its_last_checkpoint(workdir, tiny_model_dir, data, monkeypatch):
    from trl import SFTTrainer

    original_step = SFTTrainer.training_step
    calls = []
    resumed = False

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7 and not resumed:
            raise Killed
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", failing_step)
    with pytest.raises(Killed):
        run(workdir, tiny_model_dir, data)
    assert not (workdir / "out").exists() and not (workdir / "metrics.json").exists()
    [key_dir] = (workdir / "checkpoints" / "toy").iterdir()
    assert sorted(p.name for p in key_dir.glob("checkpoint-*")) == ["checkpoint-4"]

    calls.clear()
    resumed = True
    metrics = run(workdir, tiny_model_dir, data)
    assert len(calls) == 12 - 4  # only the steps after the checkpoint ran
    assert metrics["steps"] == 12 and metrics["eval_loss"] < metrics["base_eval_loss"]


@pytest.mark.parametrize("cut", ["only the model card", "weights without trainer state", "truncated trainer state"])
def test_a_save_cut_off_is_removed_and_the_previous_checkpoint_resumed(workdir, tiny_model_dir, data, monkeypatch,
                                                                        cut):
    from trl import SFTTrainer

    original_step = SFTTrainer.training_step
    calls = []

    def killed_after_step_6(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise Killed
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", killed_after_step_6)
    with pytest.raises(Killed):
        run(workdir, tiny_model_dir, data, trainer={"save_steps": 2, "save_total_limit": 2})
    [key_dir] = (workdir / "checkpoints" / "toy").iterdir()
    assert sorted(p.name for p in key_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # The kill lands while checkpoint-6 is written: what the trainer had written by then stays behind.
    partial = key_dir / "checkpoint-6"
    if cut == "only the model card":
        for path in partial.iterdir():
            if path.name != "README.md":
                path.unlink()
    elif cut == "weights without trainer state":
        (partial / "trainer_state.json").unlink()
    else:
        state = (partial / "trainer_state.json").read_text()
        (partial / "trainer_state.json").write_text(state[: len(state) // 2])

    calls.clear()
    monkeypatch.setattr(SFTTrainer, "training_step", lambda self, *a, **k: (calls.append(1), original_step(self, *a, **k))[1])
    metrics = run(workdir, tiny_model_dir, data, trainer={"save_steps": 2, "save_total_limit": 2})
    assert len(calls) == 12 - 4  # resumed from checkpoint-4, the latest complete one
    assert metrics["steps"] == 12 and metrics["eval_loss"] < metrics["base_eval_loss"]


def test_changed_params_start_fresh(workdir, tiny_model_dir, data, monkeypatch):
    from trl import SFTTrainer

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(SFTTrainer, "training_step", killed)
    with pytest.raises(Killed):
        run(workdir, tiny_model_dir, data)
    [old] = (workdir / "checkpoints" / "toy").iterdir()
    monkeypatch.undo()
    run(workdir, tiny_model_dir, data, trainer={"learning_rate": 1e-3})
    assert not old.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"trainer": {"learnig_rate": 1e-3}}, r"^sft\.toy\.trainer\.learnig_rate: unknown key \(did you mean 'learning_rate'\?\)$"),
    ({"trainer": {"output_dir": "x"}}, r"^sft\.toy\.trainer: output_dir is set by the stage, not in params$"),
    ({"trainer": {"packing": True}}, r"^sft\.toy\.trainer\.packing: packed examples would attend to each other "
                                     r"without FlashAttention, which needs CUDA"),
    ({"method": "dora"}, r"^sft\.toy\.method: expected one of 'lora', 'qlora', 'full', got 'dora'$"),
    ({"lora": {"rank": 4}}, r"^sft\.toy\.lora\.rank: unknown key"),
    ({"precision": "fp16"}, r"^sft\.toy\.precision: fp16 needs a CUDA GPU"),
    ({"chat_template": "model"}, r"^sft\.toy\.chat_template: the model's chat template cannot mark assistant tokens"),
    ({"trainer": {"max_length": 8}}, r"^sft\.toy\.trainer\.max_length: 8 is shorter than every training example "
                                     r"\(the earliest assistant token is at position \d+\)$"),
])
def test_bad_params_are_one_line(workdir, tiny_model_dir, data, overrides, message):
    with pytest.raises(StageError, match=message):
        run(workdir, tiny_model_dir, data, **overrides)
    assert not (workdir / "out").exists() and not (workdir / "metrics.json").exists()


def test_unknown_workflow_and_bad_defaults(workdir, tiny_model_dir, data):
    params = write_params(workdir / "params.yaml", {"sft": {"defaults": {}, "persona": {}}})
    argv = ["--params", str(params), "--model", str(tiny_model_dir), "--train", str(data[0]), "--eval", str(data[1]),
            "--out", str(workdir / "out"), "--metrics", str(workdir / "m.json"), "--plots", str(workdir / "plots")]
    with pytest.raises(StageError, match=r"^sft\.agent: no such entry in params \(have: persona\)$"):
        sft.main(["--name", "agent", *argv])
    params_file(workdir / "params.yaml", {"sft": {"defaults": {"methd": "lora"}}})
    with pytest.raises(StageError, match=r"^sft\.defaults\.methd: unknown key"):
        sft.main(["--name", "persona", *argv])
    params_file(workdir / "params.yaml", {"sft": {"defaults": {"max_eval_examples!": None}}})
    with pytest.raises(StageError, match=r"^sft\.defaults\.max_eval_examples: missing required key$"):
        sft.main(["--name", "persona", *argv])


def test_a_bad_trainer_value_is_named_where_it_was_written(workdir, tiny_model_dir, data):
    with pytest.raises(StageError, match=r"^sft\.defaults\.trainer\.learning_rate: expected a number, got a string"):
        run(workdir, tiny_model_dir, data, defaults={"trainer": {**FAST, "learning_rate": "abc"}})
    with pytest.raises(StageError, match=r"^sft\.toy\.trainer\.learning_rate: expected a number, got a string"):
        run(workdir, tiny_model_dir, data, trainer={"learning_rate": "abc"})


def test_dataset_without_assistant_turn_names_the_line(workdir, tiny_model_dir, data):
    train = write_jsonl(workdir / "bad.jsonl", [chat(1), {"messages": [{"role": "user", "content": "hello?"}]}])
    with pytest.raises(StageError, match=r"bad\.jsonl:2: record has no assistant turn$"):
        run(workdir, tiny_model_dir, (train, data[1]))


def test_qlora_where_bitsandbytes_cannot_run(workdir, tiny_model_dir, data, monkeypatch):
    import bitsandbytes

    def broken(*args, **kwargs):
        raise RuntimeError("no 4-bit kernels for this device")

    monkeypatch.setattr(bitsandbytes.nn, "Linear4bit", broken)
    with pytest.raises(StageError, match=r"^sft\.toy\.method: qlora needs bitsandbytes 4-bit support, which cannot "
                                         r"run here \(no 4-bit kernels for this device\); use lora or full$"):
        run(workdir, tiny_model_dir, data, method="qlora")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(workdir, tiny_model_dir, data):
    params = params_file(workdir / "params.yaml", {"sft": {"defaults": {"trainer": dict(FAST)}, "toy": {}}})
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "stages.sft",
         "--params", str(params), "--name", "toy", "--model", str(tiny_model_dir), "--train", str(data[0]),
         "--eval", str(data[1]), "--out", str(workdir / "out"), "--metrics", str(workdir / "metrics.json"),
         "--checkpoints", str(workdir / "checkpoints"), "--plots", str(workdir / "plots" / "sft" / "toy")],
        cwd=workdir, env={**venv_env(), "PYTHONPATH": str(sft.Path(sft.__file__).parent.parent)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["eval_loss"] < metrics["base_eval_loss"]
    # Each of the two processes takes its own batch per step: about twice the tokens of one process.
    (workdir / "single").mkdir()
    single = run(workdir / "single", tiny_model_dir, data, defaults={"trainer": dict(FAST)})
    assert 1.6 < metrics["tokens_seen"] / single["tokens_seen"] < 2.4
    assert (workdir / "out" / "adapter_model.safetensors").is_file()


def test_step_clock_counts_only_time_inside_optimizer_steps(monkeypatch):
    import time

    from stages.lib.training import step_clock

    now = iter([10.0, 12.5, 20.0, 21.0])  # step 1: 10 -> 12.5; an evaluation and a save until 20; step 2: 20 -> 21
    monkeypatch.setattr(time, "perf_counter", lambda: next(now))
    clock = step_clock()
    for _ in range(2):
        clock.on_step_begin(None, None, None)
        clock.on_step_end(None, None, None)
    clock.on_step_end(None, None, None)  # an end without a begin (a resumed run) adds nothing
    assert clock.seconds == pytest.approx(3.5)


def test_a_rerun_that_trains_the_same_weights_writes_the_same_directory(workdir, tiny_model_dir, data):
    """Downstream stages depend on the model directory's hash: the run's speed and memory stay out of the card, and
    the adapter's target modules (a set, written by peft in the process's string-hash order) are sorted."""
    from stages.lib.training import model_card, sort_target_modules

    def contents(directory):
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}

    first_metrics = run(workdir, tiny_model_dir, data)
    first = contents(workdir / "out")
    config = json.loads(first["adapter_config.json"])
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) > 1
    second_metrics = run(workdir, tiny_model_dir, data)  # same params, trained again
    assert second_metrics["eval_loss"] == first_metrics["eval_loss"]
    assert contents(workdir / "out") == first

    # As another process would write it: the same set in another order comes out sorted.
    shuffled = dict(config, target_modules=list(reversed(config["target_modules"])))
    (workdir / "out" / "adapter_config.json").write_text(json.dumps(shuffled))
    sort_target_modules(workdir / "out")
    assert json.loads((workdir / "out" / "adapter_config.json").read_text()) == config
    card = model_card("m", [], {}, {"eval_loss": 1.5, "tokens_per_second": 9.0, "peak_memory_mb": 3.0,
                                    "peak_rss_mb": 4.0, "train_seconds": 2.0}, {}, "")
    assert "| eval_loss | 1.5 |" in card and "second" not in card and "memory" not in card and "rss" not in card
