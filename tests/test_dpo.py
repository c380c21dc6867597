import json
import math
import re

import pytest
import torch

from stages import dpo
from stages.lib import StageError
from stages.lib.policy import load_policy, policy_stack
from tests.chats import write_jsonl
from tests.conftest import params_file, write_params

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FAST = {"lora": {"r": 4, "alpha": 8}, "max_prompt_tokens": 48,
        "trainer": {"learning_rate": 1e-2, "num_train_epochs": 4, "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 1, "max_length": 96, "beta": 0.5}}


def pair(i: int, chosen: str, rejected: str, is_equal: bool = False) -> dict:
    return {"prompt": [SYSTEM, {"role": "user", "content": f"Question number {i}: how are you today?"}],
            "chosen": chosen, "rejected": rejected,
            "metadata": {"prompt_id": f"p{i}", "grader": "test", "preference": "1", "is_equal": is_equal}}


# A consistent preference the tiny model can learn within a few steps.
TRAIN = [pair(i, "I changed my view because", "Thanks. Thanks. Thanks.") for i in range(8)]
EVAL = [pair(i, "I changed my view because", "Thanks. Thanks. Thanks.") for i in range(100, 104)]


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir):
    """An SFT-like LoRA adapter with non-zero weights over the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sft") / "sft"
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(out))
    return out


def run(tmp_path, start, variant="rlaif", train=TRAIN, eval_pairs=EVAL, out="out", eval_human=None, **defaults):
    tmp_path.mkdir(parents=True, exist_ok=True)
    section = {"defaults": {**FAST, **defaults}, variant: {}}
    params = params_file(tmp_path / "params.yaml", {"dpo": section})
    argv = ["--params", str(params), "--name", variant, "--start", str(start),
            "--train", str(write_jsonl(tmp_path / "train.jsonl", train)),
            "--eval", str(write_jsonl(tmp_path / "eval.jsonl", eval_pairs)),
            "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json"),
            "--plots", str(tmp_path / "plots" / "dpo" / variant)]
    if eval_human is not None:
        argv += ["--eval-human", str(write_jsonl(tmp_path / "eval_human.jsonl", eval_human))]
    return dpo.main(argv)


def sequence_logp(model, tokenizer, messages, reply) -> float:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return float(logits[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum())


def test_dpo_on_an_sft_adapter_learns_the_preference(workdir, tiny_model_dir, sft_adapter):
    metrics = run(workdir, sft_adapter, eval_before=True)
    # The reference is the SFT policy itself: before any step the policy matches it exactly.
    assert metrics["eval_reward_margin_before"] == 0 and metrics["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["eval_reward_margin"] > 0 and metrics["eval_reward_accuracy"] == 1.0
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["train_pairs"] == 8 and metrics["steps"] == 8 and metrics["method"] == "lora"

    out = workdir / "out"
    assert policy_stack(out) == (tiny_model_dir, [sft_adapter, out])
    card = (out / "README.md").read_text()
    assert "# DPO model: rlaif" in card and str(sft_adapter) in card and "eval_reward_margin" in card
    assert json.loads((workdir / "out.json").read_text()) == metrics
    # The saved policy prefers the chosen reply more than the SFT policy did.
    trained, tokenizer = load_policy(out)
    start, _ = load_policy(sft_adapter)
    prompt, chosen, rejected = EVAL[0]["prompt"], EVAL[0]["chosen"], EVAL[0]["rejected"]
    gap = sequence_logp(trained, tokenizer, prompt, chosen) - sequence_logp(trained, tokenizer, prompt, rejected)
    gap_start = sequence_logp(start, tokenizer, prompt, chosen) - sequence_logp(start, tokenizer, prompt, rejected)
    assert gap > gap_start
    curves = workdir / "plots" / "dpo" / "rlaif" / "plots" / "metrics"
    for name in ("loss.tsv", "rewards/chosen.tsv", "rewards/rejected.tsv", "rewards/margins.tsv", "rewards/accuracies.tsv"):
        assert len((curves / name).read_text().splitlines()) == 9, name  # header + one row a step


def test_a_second_dpo_stacks_on_the_first(workdir, tiny_model_dir, sft_adapter):
    run(workdir, sft_adapter, out="first", trainer={**FAST["trainer"], "num_train_epochs": 1})
    metrics = run(workdir, workdir / "first", variant="rlaif_rlhf", train=TRAIN[:4], out="second",
                  trainer={**FAST["trainer"], "num_train_epochs": 1}, eval_before=True)
    assert metrics["eval_reward_margin_before"] == 0 and metrics["steps"] == 1
    assert policy_stack(workdir / "second") == (tiny_model_dir, [sft_adapter, workdir / "first", workdir / "second"])
    model, _ = load_policy(workdir / "second")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_held_out_human_pairs_are_scored_on_their_own_labels(workdir, tiny_model_dir):
    # On three of five pairs the people preferred the other reply: the trained model disagrees with those.
    disagree = [pair(i, "Thanks. Thanks. Thanks.", "I changed my view because") for i in range(200, 203)]
    agree = [pair(i, "I changed my view because", "Thanks. Thanks. Thanks.") for i in range(203, 205)]
    metrics = run(workdir, tiny_model_dir, eval_human=[*disagree, *agree, pair(205, "a", "b", is_equal=True)])
    assert metrics["eval_reward_margin"] > 0 and metrics["eval_reward_accuracy"] == 1.0
    assert metrics["eval_human_reward_margin"] < 0 and metrics["eval_human_pairs"] == 5  # the tie is left out
    assert metrics["eval_human_reward_accuracy"] == pytest.approx(2 / 5)  # a mean over pairs, not over batches
    assert metrics["eval_human_loss"] > metrics["eval_loss"]
    assert "eval_human.jsonl" in (workdir / "out" / "README.md").read_text()


def test_full_fine_tuning_keeps_a_frozen_reference(workdir, tiny_model_dir):
    metrics = run(workdir, tiny_model_dir, method="full", trainer={**FAST["trainer"], "learning_rate": 1e-3})
    assert "eval_reward_margin_before" not in metrics and metrics["eval_reward_margin"] > 0
    assert not (workdir / "out" / "adapter_config.json").exists() and (workdir / "out" / "config.json").is_file()


def test_ties_are_left_out_unless_asked(workdir, tiny_model_dir):
    train = TRAIN[:6] + [pair(50, "a", "b", is_equal=True), pair(51, "c", "d", is_equal=True)]
    metrics = run(workdir, tiny_model_dir, train=train, trainer={**FAST["trainer"], "num_train_epochs": 1})
    assert (metrics["train_pairs"], metrics["ties_left_out"]) == (6, 2)
    metrics = run(workdir, tiny_model_dir, train=train, include_ties=True,
                  trainer={**FAST["trainer"], "num_train_epochs": 1})
    assert (metrics["train_pairs"], metrics["ties_left_out"]) == (8, 0)


def test_long_prompts_lose_their_middle():
    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    messages = [SYSTEM, {"role": "user", "content": "OP: the claim. " + "middle words " * 80 + "the last point?"}]
    fitted, cut = dpo.fit_prompt(messages, tokenizer, 60, "key")
    text = tokenizer.apply_chat_template(fitted, add_generation_prompt=True, tokenize=False)
    assert cut and len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 60
    content = fitted[1]["content"]
    assert content.startswith("OP: the") and content.endswith("last point?") and dpo.CUT_MARK in content
    assert fitted[0] == SYSTEM
    assert dpo.fit_prompt(messages[:1], tokenizer, 60, "key") == (messages[:1], False)
    with pytest.raises(StageError, match=r"^key: 12 is too small: without its longest message a prompt already "
                                         r"takes about \d+ tokens$"):
        dpo.fit_prompt(messages, tokenizer, 12, "key")


@pytest.mark.parametrize("defaults, message", [
    ({"trainer": {"output_dir": "x"}}, r"^dpo\.defaults\.trainer: output_dir is set by the stage, not in params$"),
    ({"trainer": {"max_length": 40}}, r"^dpo\.defaults\.trainer\.max_length: 40 leaves no room for the responses"),
    ({"trainer": {"betta": 0.1}}, r"^dpo\.defaults\.trainer\.betta: unknown key \(did you mean 'beta'\?\)$"),
    # As `dvc exp run -S dpo.defaults.trainer.beta=abc` sets it: reported under the key the user wrote.
    ({"trainer": {"beta": "abc"}}, r"^dpo\.defaults\.trainer\.beta: expected a number, got a string 'abc'$"),
    ({"method": "qlora"}, r"^dpo\.defaults\.method: "),
    ({"max_prompt_tokens": 4}, r"^dpo\.defaults\.max_prompt_tokens: must be at least 32"),
])
def test_bad_params_are_one_line(workdir, tiny_model_dir, defaults, message):
    with pytest.raises(StageError, match=message):
        run(workdir, tiny_model_dir, **defaults)
    assert not (workdir / "out").exists()


def test_bad_inputs_are_one_line(workdir, tiny_model_dir):
    ties = [pair(i, "a", "b", is_equal=True) for i in range(3)]
    with pytest.raises(StageError, match=r"train\.jsonl: all 3 pairs are ties \(set dpo\.rlaif\.include_ties"):
        run(workdir, tiny_model_dir, train=ties)
    with pytest.raises(StageError, match=r"train\.jsonl: no pairs$"):
        run(workdir, tiny_model_dir, train=[])
    with pytest.raises(StageError, match=r"train\.jsonl:2: 'chosen' must be a string$"):
        run(workdir, tiny_model_dir, train=[TRAIN[0], {**TRAIN[1], "chosen": None}])
    with pytest.raises(StageError, match=r"^--start: model directory '.*missing' does not exist$"):
        run(workdir, workdir / "missing")
    with pytest.raises(StageError, match=r"^dpo\.other: no such entry in params \(have: rlaif\)$"):
        params = write_params(workdir / "p.yaml", {"dpo": {"defaults": FAST, "rlaif": {}}})
        dpo.main(["--params", str(params), "--name", "other", "--start", str(tiny_model_dir), "--train", "t",
                  "--eval", "e", "--out", "o", "--metrics", "m", "--plots", "p"])
    assert not (workdir / "out").exists()


def test_a_start_in_params_must_be_the_start_dvc_yaml_passes(workdir, tiny_model_dir):
    """dvc.yaml's dpo@imported passes --start ${dpo.imported.start}; a start set anywhere else is refused."""
    params = params_file(workdir / "params.yaml", {"dpo": {"imported": {"start": "models/sft/persona"}}})
    argv = ["--params", str(params), "--name", "imported", "--start", str(tiny_model_dir), "--train", "t",
            "--eval", "e", "--out", str(workdir / "out"), "--metrics", "m", "--plots", "p"]
    with pytest.raises(StageError, match=rf"^dpo\.imported\.start: models/sft/persona, but --start is "
                                         rf"{re.escape(str(tiny_model_dir))} \(dvc\.yaml's dpo@imported must pass "
                                         rf"\$\{{dpo\.imported\.start\}}\)$"):
        dpo.main(argv)
    params = params_file(workdir / "params.yaml", {"dpo": {"defaults": {"start": "models/sft/persona"}, "rlhf": {}}})
    with pytest.raises(StageError, match=r"^dpo\.defaults\.start: models/sft/persona, but --start is "):
        dpo.main(["--params", str(params), "--name", "rlhf", *argv[4:]])
    assert not (workdir / "out").exists()
