import json
import math

import pytest
import torch

from stages import rl
from stages.lib import StageError
from stages.lib.policy import load_policy
from stages.lib.reward import load_reward_fn
from stages.lib.records import read_starters, split_starters
from tests.conftest import REPO_ROOT, params_file
from tests.tiny import build_tokenizer, save_tiny_reward_model

STARTERS = REPO_ROOT / "data" / "raw" / "starters" / "starters.jsonl"
FAST = {"steps": 2, "batch_size": 2, "num_generations": 2, "response_length": 6, "eval_prompts": 2,
        "eval_generations": 2, "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("reward") / "reward", build_tokenizer())


def run(tmp_path, policy, reward, prompts=STARTERS, judges=None, **section):
    table = {"style_rm": {"model": str(reward)}, **(judges or {})}
    params = params_file(tmp_path / "params.yaml", {"judges": table, "rl": {**FAST, **section}})
    argv = ["--params", str(params), "--start", str(policy), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
            "--metrics", str(tmp_path / "metrics.json"), "--plots", str(tmp_path / "plots" / "rl")]
    return rl.main(argv)


def logits_of(model_dir, ids):
    model, _ = load_policy(model_dir)
    with torch.no_grad():
        return model(ids).logits


def check_run(workdir, metrics, algorithm, start_dir):
    assert metrics["algorithm"] == algorithm and metrics["steps"] == 2
    for key in ("reward_before", "reward_after", "eval_kl", "train_reward_first", "train_reward_last"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_starters"] == 2 and metrics["eval_replies"] == 4 and metrics["train_starters"] == 62 - 2
    assert json.loads((workdir / "metrics.json").read_text()) == metrics

    out = workdir / "out"
    card = (out / "README.md").read_text()
    assert f"# Style RL policy ({algorithm.upper()})" in card and f"| reward_after | {metrics['reward_after']} |" in card
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    assert not torch.allclose(logits_of(out, ids), logits_of(start_dir, ids))

    replies = [json.loads(line) for line in (out / "eval_replies.jsonl").read_text().splitlines()]
    assert len(replies) == 2 and all(len(r["after"]) == len(r["reward_after"]) == 2 for r in replies)
    after = [x for r in replies for x in r["reward_after"]]
    assert sum(after) / len(after) == pytest.approx(metrics["reward_after"], abs=1e-3)
    curves = json.loads((workdir / "plots" / "rl" / "plots" / "custom" / "curves.json").read_text())
    assert [row["step"] for row in curves] == [1, 2] and all({"reward", "kl", "entropy"} <= set(r) for r in curves)
    rewards = json.loads((workdir / "plots" / "rl" / "plots" / "custom" / "eval_rewards.json").read_text())
    assert len(rewards) == 2 and {"prompt_id", "reward_before", "reward_after"} == set(rewards[0])


def test_ppo_trains_a_lora_adapter_against_the_reward_model(workdir, tiny_model_dir, reward_dir):
    metrics = run(workdir, tiny_model_dir, reward_dir, algorithm="ppo", kl_coef=0.1)
    check_run(workdir, metrics, "ppo", tiny_model_dir)
    assert json.loads((workdir / "out" / "adapter_config.json").read_text())["r"] == 4
    assert math.isfinite(metrics["train_kl_last"])
    dvclive = workdir / "plots" / "rl" / "plots" / "metrics" / "objective"
    assert len((dvclive / "rlhf_reward.tsv").read_text().splitlines()) == 1 + 2
    assert (dvclive / "kl.tsv").is_file() and (dvclive / "entropy.tsv").is_file()


@pytest.mark.parametrize("algorithm, method", [("grpo", "full"), ("rloo", "lora")])
def test_group_algorithms_train_with_the_reward_function(workdir, tiny_model_dir, reward_dir, algorithm, method):
    metrics = run(workdir, tiny_model_dir, reward_dir, algorithm=algorithm, method=method, kl_coef=0.05)
    check_run(workdir, metrics, algorithm, tiny_model_dir)
    assert metrics["method"] == method and math.isfinite(metrics["train_kl_last"])
    saved = {p.name for p in (workdir / "out").iterdir()}
    assert ("adapter_config.json" in saved) == (method == "lora") and ("config.json" in saved) == (method == "full")
    for curve in ("reward", "kl", "entropy"):
        assert (workdir / "plots" / "rl" / "plots" / "metrics" / f"{curve}.tsv").is_file()


def test_group_algorithms_take_a_weighted_sum_of_judges(workdir, tiny_model_dir, reward_dir):
    from stages.lib.scorers import repeated_trigrams

    rating = {"kind": "scalar_llm", "model": str(tiny_model_dir), "criterion": "How warm is it?",
              "max_context_tokens": 32, "scale": 5}
    rewards = [{"judge": "style_rm", "weight": 1.0}, {"judge": "repetition", "weight": -2.0},
               {"judge": "warmth", "weight": 0.5}]
    metrics = run(workdir, tiny_model_dir, reward_dir, judges={"warmth": rating}, algorithm="rloo", rewards=rewards)
    assert [(r["name"], r["weight"]) for r in metrics["rewards"]] == [("style_rm", 1.0), ("repetition", -2.0),
                                                                      ("warmth", 0.5)]
    assert metrics["rewards"][0]["model"] == str(reward_dir) and metrics["rewards"][1]["kind"] == "callable"
    replies = [json.loads(line) for line in (workdir / "out" / "eval_replies.jsonl").read_text().splitlines()]
    texts = [t for r in replies for t in r["before"]]
    from stages.lib.judges import load_judge, resolve_judges

    params = workdir / "params.yaml"
    [warmth] = resolve_judges(params, [("test", "warmth")], scalar=True)
    ratings = load_judge(warmth).score([[{"role": "user", "content": r["prompt"]}] for r in replies for _ in r["before"]],
                                       texts)
    assert all(1 <= x <= 5 for x in ratings)
    expected = [a - 2 * b + 0.5 * c for a, b, c in zip(load_reward_fn(reward_dir)(texts), repeated_trigrams([], texts),
                                                        ratings)]
    assert [x for r in replies for x in r["reward_before"]] == pytest.approx(expected, abs=1e-3)


def test_training_on_top_of_an_sft_adapter_records_the_stack(workdir, tiny_model_dir, reward_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = workdir / "sft"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(sft))
    build_tokenizer().save_pretrained(str(sft))

    metrics = run(workdir, sft, reward_dir, algorithm="rloo", method="lora")
    check_run(workdir, metrics, "rloo", sft)
    stack = json.loads((workdir / "out" / "stack.json").read_text())
    assert stack == {"base": str(tiny_model_dir), "adapters": [str(sft)]}


def test_single_logit_head_scores_like_the_reward_function(tmp_path, reward_dir):
    model = rl.single_logit_model(reward_dir).eval()
    assert model.score.out_features == 1
    tokenizer = build_tokenizer()
    texts = ["Hello, how are you today?", "the agent calls a tool", "coins"]
    with torch.no_grad():
        single = [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]
    assert single == pytest.approx(load_reward_fn(reward_dir)(texts), abs=1e-5)


def test_ppo_reads_the_reward_at_the_last_word_of_the_reply(reward_dir):
    from trl.experimental.utils import get_reward

    tokenizer = build_tokenizer()
    end = tokenizer.eos_token_id
    prompt = tokenizer(rl.render(tokenizer, "Hello, how are you today?"), add_special_tokens=False)["input_ids"]
    reply = tokenizer("I changed my view", add_special_tokens=False)["input_ids"]
    pad = tokenizer.convert_tokens_to_ids(rl.ppo_pad_token(tokenizer))
    assert pad not in (end, tokenizer.bos_token_id)
    # As trl's PPO hands it over: prompt, reply, end-of-turn token, padding.
    sequence = torch.tensor([prompt + reply + [end, pad, pad]])
    _, score, _ = get_reward(rl.ppo_reward_model(rl.single_logit_model(reward_dir), end).eval(), sequence, pad,
                             len(prompt))
    model = rl.single_logit_model(reward_dir).eval()
    with torch.no_grad():
        expected = model(torch.tensor([prompt + reply])).logits[0, 0]
        at_end = model.score(model.model(torch.tensor([prompt + reply + [end]])).last_hidden_state)[0, -1, 0]
    assert score.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(at_end.item() - expected.item()) > 1e-3  # what trl would have read without the shift


def test_the_value_head_shares_the_reward_backbone_and_training_it_leaves_the_reward_alone(reward_dir):
    from trl.experimental.utils import get_reward

    tokenizer = build_tokenizer()
    pad = tokenizer.convert_tokens_to_ids(rl.ppo_pad_token(tokenizer))
    sequence = torch.tensor([tokenizer("Hello, I changed my view", add_special_tokens=False)["input_ids"] + [pad]])
    value = rl.single_logit_model(reward_dir)
    reward = rl.ppo_reward_model(value, tokenizer.eos_token_id).eval().requires_grad_(False)
    value.requires_grad_(False).score.requires_grad_(True)
    assert reward.backbone is value.model and reward.score is not value.score
    before = get_reward(reward, sequence, pad, 2)[1].item()
    with torch.no_grad():
        value.score.weight.add_(1.0)  # as a value-head update would
    assert get_reward(reward, sequence, pad, 2)[1].item() == before
    assert value.score.weight.requires_grad and not any(p.requires_grad for p in reward.parameters())


def test_reward_model_with_another_tokenizer_is_one_line(workdir, tiny_model_dir):
    other = save_tiny_reward_model(workdir / "other", build_tokenizer(vocab_size=300))
    with pytest.raises(StageError, match=r"^judges\.style_rm\.model \S+other: its tokenizer differs from the policy's "
                                         r"\(vocab 300 vs 384\); PPO feeds policy token ids .* rl\.algorithm: grpo \| rloo$"):
        run(workdir, tiny_model_dir, other, algorithm="ppo")
    assert not (workdir / "out").exists() and not (workdir / "metrics.json").exists()


@pytest.mark.parametrize("section, message", [
    ({"trainer": {"ppo": {"num_ppo_epoch": 2}}},
     r"^rl\.trainer\.ppo\.num_ppo_epoch: unknown key \(did you mean 'num_ppo_epochs'\?\)$"),
    ({"algorithm": "grpo", "trainer": {"grpo": {"kl_coef": 0.1}}}, r"^rl\.trainer\.grpo\.kl_coef: unknown key"),
    ({"trainer": {"ppo": {"learning_rate": 0.1}}},
     r"^rl\.trainer\.ppo: learning_rate comes from rl\.learning_rate; set it there$"),
    ({"trainer": {"rloo": {"output_dir": "x"}}}, r"^rl\.trainer\.rloo: output_dir is set by the stage, not in params$"),
    ({"trainer": {"sgd": {}}}, r"^rl\.trainer\.sgd: unknown key"),
    ({"algorithm": "rloo", "num_generations": 1}, r"^rl\.num_generations: must be at least 2 for rloo"),
    ({"algoritm": "ppo"}, r"^rl\.algoritm: unknown key \(did you mean 'algorithm'\?\)$"),
    ({"rewards": [{"judge": "nobody", "weight": 1.0}]}, r"^rl\.rewards\[0\]\.judge: unknown judge 'nobody' \(have: "),
    ({"rewards": [{"judge": "llm_persuasion", "weight": 1.0}]},
     r"^rl\.rewards\[0\]\.judge: judge 'llm_persuasion' is pairwise_llm, which compares two replies"),
    ({"rewards": [{"judge": "style_rm", "weight": 1.0}, {"judge": "repetition", "weight": -1.0}]},
     r"^rl\.rewards: ppo feeds policy token ids to one reward model"),
    ({"rewards": []}, r"^rl\.rewards: must name at least one judge$"),
    ({"eval_prompts": 62}, r"^rl\.eval_prompts: 62 holds out every one of the 62 starters in \S+starters\.jsonl$"),
    ({"batch_size": 61}, r"^rl\.batch_size: 61 is more than the 60 training starters in \S+starters\.jsonl"),
])
def test_bad_params_are_one_line(workdir, tiny_model_dir, reward_dir, section, message):
    with pytest.raises(StageError, match=message):
        run(workdir, tiny_model_dir, reward_dir, **section)
    assert not (workdir / "out").exists() and not (workdir / "metrics.json").exists()


@pytest.mark.parametrize("lines, message", [
    ([], r"starters\.jsonl: no starters$"),
    (['{"id": 1, "prompt": "hi"}', '{"id": 2, "prompt": "yo"}', '{"id": "3", "prompt": "hey"}'],
     r"starters\.jsonl:3: 'id' must be an integer, got '3'$"),
    (['{"id": 1, "prompt": "hi"}', '', '{"id": 2, "prompt": "  "}'], r"starters\.jsonl:3: 'prompt' must be a non-empty string$"),
    (['{"id": 1, "prompt": "hi"}', '{"id": 1, "prompt": "yo"}'], r"starters\.jsonl:2: duplicate id 1 \(first on line 1\)$"),
    (['{"id": 1, "text": "hi"}'], r"starters\.jsonl:1: record missing required field 'prompt'$"),
    (['{"id": 1, "prompt": "hi"'], r"starters\.jsonl:1: malformed JSON"),
])
def test_bad_starters_are_one_line(workdir, tiny_model_dir, reward_dir, lines, message):
    prompts = workdir / "starters.jsonl"
    prompts.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(StageError, match=message):
        run(workdir, tiny_model_dir, reward_dir, prompts=prompts)
    assert not (workdir / "out").exists() and not (workdir / "metrics.json").exists()


def test_shipped_starters_split_by_seed():
    starters = read_starters(STARTERS)
    assert len(starters) >= 50 and len({s["id"] for s in starters}) == len(starters)
    train, held_out = split_starters(starters, 42, 8, 8, STARTERS)
    assert len(held_out) == 8 and len(train) == len(starters) - 8
    assert {s["id"] for s in train}.isdisjoint(s["id"] for s in held_out)
    assert (train, held_out) == split_starters(starters, 42, 8, 8, STARTERS)
    assert held_out != split_starters(starters, 1, 8, 8, STARTERS)[1]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_qlora_trains_an_adapter_on_4bit_weights(workdir, qlora_model_dir, reward_dir, algorithm):
    metrics = run(workdir, qlora_model_dir, reward_dir, algorithm=algorithm, method="qlora")
    check_run(workdir, metrics, algorithm, qlora_model_dir)
    assert metrics["method"] == "qlora" and "4-bit" in (workdir / "out" / "README.md").read_text()
    assert json.loads((workdir / "out" / "adapter_config.json").read_text())["r"] == 4
