import json

import pytest

from stages import compare, report
from stages.lib import StageError
from stages.lib.reward import load_reward_fn
from stages.lib.scorers import repeated_trigrams
from tests.chats import write_jsonl
from tests.conftest import params_file
from tests.tiny import build_tokenizer, save_tiny_reward_model

SYSTEM = {"role": "system", "content": "Change their mind."}
MODELS = ("base", "dpo_rlaif")


def pool_row(i: int) -> dict:
    return {"prompt": [SYSTEM, {"role": "user", "content": f"OP: claim {i}. " + "because " * (i % 3)}],
            "response_1": f"sft one {i} " + "reason " * (i % 4), "response_2": f"sft two {i}",
            "metadata": {"prompt_id": f"p{i}", "pool": "eval", "conversation_id": f"c{i}"}}


ROWS = [pool_row(i) for i in range(6)]
REPLIES = {"base": [f"base says {i} " + "so so so so " * (i % 2) for i in range(6)],
           "dpo_rlaif": [f"here is why {i} " + "evidence and reasons " * (i % 3 + 1) for i in range(6)]}


def people_pair(i: int, preference: str) -> dict:
    first, second = f"people saw first {i}", f"people saw second {i} " + "more " * i
    chosen, rejected = (second, first) if preference == "2" else (first, second)
    return {"prompt": ROWS[i]["prompt"], "chosen": chosen, "rejected": rejected,
            "metadata": {**ROWS[i]["metadata"], "grader": "human", "preference": "2" if preference == "2" else "1",
                         "is_equal": preference == "tie", "labeller": "tester"}}


PEOPLE = [people_pair(i, p) for i, p in enumerate(["1", "2", "tie", "2", "1", "2"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("compare")
    reward = save_tiny_reward_model(root / "reward", build_tokenizer())
    for model in MODELS:
        write_jsonl(root / "samples" / model / "persuasion.jsonl",
                    [{"task": "persuasion", "prompt_id": f"p{i}", "reply": r} for i, r in enumerate(REPLIES[model])])
        write_jsonl(root / "samples" / model / "style.jsonl", [
            {"task": "style", "prompt_id": k, "prompt": f"hi {k}", "replies": [f"hey {k}", f"hello there {k}"]}
            for k in (1, 2)])
    judges = {"rm": {"kind": "reward_model", "model": str(reward), "criterion": "tiny reward"},
              "pair": {"kind": "pairwise_llm", "model": str(tiny_model_dir), "criterion": "Which is better?",
                       "max_context_tokens": 64, "swap": True},
              "rating": {"kind": "scalar_llm", "model": str(tiny_model_dir), "criterion": "How good?",
                         "max_context_tokens": 64, "scale": 5},
              "repeats": {"kind": "callable", "function": "stages.lib.scorers:repeated_trigrams", "criterion": "repeats"}}
    return {"root": root, "reward": reward, "judges": judges,
            "pool": write_jsonl(root / "pool.jsonl", ROWS), "people": write_jsonl(root / "people.jsonl", PEOPLE)}


def run(tmp_path, setup, models=MODELS, extra_judges=None, **section):
    table = {**setup["judges"], **(extra_judges or {})}
    params = params_file(tmp_path / "params.yaml", {
        "judges": table, "label_ai": {"judge": "rm"}, "rl": {"rewards": [{"judge": "repeats", "weight": -1.0}]},
        "compare": {"judges": ["rm", "pair", "rating"], "style_judges": ["rm", "repeats"], "bootstrap_resamples": 300, "sft_samples": 2,
                    **section}})
    return compare.main(["--params", str(params), "--pool", str(setup["pool"]), "--samples",
                         str(setup["root"] / "samples"), "--models", *models, "--style-models", *models,
                         "--people", str(setup["people"]), "--out", str(tmp_path / "compare.json"),
                         "--details", str(tmp_path / "details")])


def test_each_reply_is_judged_against_both_sft_samples(tmp_path, setup):
    metrics = run(tmp_path, setup)
    reward_fn = load_reward_fn(setup["reward"])
    for model in MODELS:
        own = reward_fn(REPLIES[model])
        sft = [reward_fn([r["response_1"], r["response_2"]]) for r in ROWS]
        outcomes = [1.0 if o > s else 0.0 if o < s else 0.5 for o, pair in zip(own, sft) for s in pair]
        block = metrics["persuasion"][model]["rm"]
        assert (block["wins"], block["ties"], block["losses"]) == (outcomes.count(1.0), outcomes.count(0.5),
                                                                   outcomes.count(0.0))
        assert block["win_rate"] == pytest.approx(sum(outcomes) / 12, abs=1e-4)
        assert block["win_rate_low"] <= block["win_rate"] <= block["win_rate_high"]
        assert block["mean_words"] == pytest.approx(sum(len(r.split()) for r in REPLIES[model]) / 6, abs=0.05)
        assert 0 <= block["lc_win_rate"] <= 1 and "orders_agree" not in block
        pair = metrics["persuasion"][model]["pair"]
        assert pair["wins"] + pair["ties"] + pair["losses"] == 12 and 0 <= pair["orders_agree"] <= 1
    verdicts = [json.loads(line) for line in (tmp_path / "details" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 3 * 2 * 12
    assert all(v["outcome"] == 0.5 for v in verdicts if v["judge"] == "pair" and v["orders_agree"] is False)
    assert json.loads((tmp_path / "compare.json").read_text()) == metrics


def test_judges_are_checked_against_people_and_pinned(tmp_path, setup):
    from sklearn.metrics import cohen_kappa_score

    metrics = run(tmp_path, setup)
    rm = metrics["judges"]["rm"]
    assert rm["kind"] == "reward_model" and rm["model"] == str(setup["reward"]) and len(rm["hash"]) == 32
    assert rm["trained_on"].startswith("labelled the RLAIF training pairs") and metrics["judges"]["pair"]["trained_on"] is None
    assert metrics["judges"]["repeats"]["trained_on"].startswith("rewarded the RL policy")
    decided = [p for p in PEOPLE if not p["metadata"]["is_equal"]]
    reward_fn = load_reward_fn(setup["reward"])
    people, ai = [], []
    for pair in decided:
        first, second = (pair["chosen"], pair["rejected"]) if pair["metadata"]["preference"] == "1" else (
            pair["rejected"], pair["chosen"])
        a, b = reward_fn([first, second])
        people.append(pair["metadata"]["preference"]), ai.append("1" if a > b else "2")
    assert rm["people"]["pairs"] == 5 and rm["people"]["people_ties"] == 1
    assert rm["people"]["agreement"] == pytest.approx(sum(p == a for p, a in zip(people, ai)) / 5, abs=1e-4)
    expected_kappa = cohen_kappa_score(people, ai) if len(set(people) | set(ai)) > 1 else 1.0
    assert rm["people"]["kappa"] == pytest.approx(expected_kappa, abs=1e-4)
    assert 0 <= metrics["judges"]["pair"]["people"]["orders_agree"] <= 1


def test_style_replies_get_a_mean_score_per_judge(tmp_path, setup):
    metrics = run(tmp_path, setup)
    texts = ["hey 1", "hello there 1", "hey 2", "hello there 2"]
    block = metrics["style"]["base"]
    assert block["rm"]["mean_score"] == pytest.approx(sum(load_reward_fn(setup["reward"])(texts)) / 4, abs=1e-3)
    assert block["repeats"] == {"mean_score": sum(repeated_trigrams([], texts)) / 4, "replies": 4}


def test_length_controlled_win_rate_discounts_winning_by_length():
    # Long replies win, short ones lose: at equal length the win probability is near even.
    outcomes = [1.0] * 8 + [0.0] * 4
    gaps = [80.0] * 8 + [-80.0] * 4
    assert compare.length_controlled(outcomes, gaps) < 0.6 < sum(outcomes) / len(outcomes)
    # Wins regardless of length stay wins.
    assert compare.length_controlled([1.0] * 6, [50.0, -50.0] * 3) == 1.0


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0] * 7 + [0.0] * 3
    low, high = compare.bootstrap_interval(values, 2000, 0)
    assert 0.3 < low < 0.7 < high <= 1.0 and (low, high) == compare.bootstrap_interval(values, 2000, 0)
    assert compare.bootstrap_interval([1.0] * 5, 100, 0) == (1.0, 1.0)


@pytest.mark.parametrize("section, judges, message", [
    ({"judges": ["nobody"]}, None, r"^compare\.judges\[0\]: unknown judge 'nobody' \(have: "),
    ({"style_judges": ["pair"]}, None, r"^compare\.style_judges\[0\]: judge 'pair' is pairwise_llm, which compares"),
    ({}, {"rm": {"kind": "reward_model", "model": "nowhere", "criterion": "x"}},
     r"^judges\.rm\.model: reward model directory 'nowhere' not found$"),
    ({"judges": ["bad"]}, {"bad": {"kind": "callable", "function": "no_such_module:f", "criterion": "x"}},
     r"^judges\.bad\.function: cannot import 'no_such_module' \(ModuleNotFoundError"),
    ({"judges": ["bad"]}, {"bad": {"kind": "callable", "function": "stages.lib.scorers:nothing", "criterion": "x"}},
     r"^judges\.bad\.function: 'stages\.lib\.scorers' has no function 'nothing'$"),
    ({"judges": ["bad"]}, {"bad": {"kind": "callable", "function": "builtins:sorted", "criterion": "x"}},
     r"^judges\.bad\.function: calling it failed \(TypeError: "),
    ({"judges": ["bad"]}, {"bad": {"kind": "callable", "function": "builtins:zip", "criterion": "x"}},
     r"^judges\.bad\.function: the function must return numbers"),
    ({"judges": ["bad"]}, {"bad": {"kind": "callable", "function": "tests.test_compare:one_score", "criterion": "x"}},
     r"^judges\.bad\.function: the function returned 1 scores for 2 replies$"),
    ({"judges": ["bad"]}, {"bad": {"kind": "scalar_llm", "model": "m", "criterion": "x"}},
     r"^judges\.bad\.max_context_tokens: missing required key$"),
    ({"judges": ["bad"]}, {"bad": {"kind": "oracle"}}, r"^judges\.bad\.kind: must be one of reward_model, "),
    ({"sft_samples": 3}, None, r"^compare\.sft_samples: must be 1 or 2, got 3$"),
])
def test_bad_judges_are_one_line_before_any_model_loads(tmp_path, setup, section, judges, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, setup, extra_judges=judges, **section)
    assert not (tmp_path / "compare.json").exists() and not (tmp_path / "details").exists()


def one_score(prompts, replies):
    return [0.0]


def test_a_model_without_samples_is_named(tmp_path, setup):
    with pytest.raises(StageError, match=r"^--samples: \S+rl/persuasion\.jsonl not found \(run `dvc repro evaluate@rl`\)$"):
        run(tmp_path, setup, models=("base", "rl"))


def test_report_opens_with_the_study_table(tmp_path, setup):
    run(tmp_path, setup)
    evals = []
    for name in MODELS:
        evals.append(tmp_path / f"{name}.json")
        evals[-1].write_text(json.dumps({"model": name, "path": f"models/{name}", "persuasion": {
            "prompts": 6, "mean_words": 4.0, "empty_replies": 0}, "perplexity": {"perplexity": 10.5}}))
    result = report.main(["--evals", *map(str, evals), "--compare", str(tmp_path / "compare.json"), "--samples",
                          str(setup["root"] / "samples"), "--pool", str(setup["pool"]), "--out", str(tmp_path / "reports")])
    assert result == {"models": 2, "plots": ["win_rate.png"]}
    summary = (tmp_path / "reports" / "summary.md").read_text()
    metrics = json.loads((tmp_path / "compare.json").read_text())
    study = summary.index("## The persuasion study")
    assert study < summary.index("| approach |") < summary.index("## Held-out perplexity")
    rlaif = metrics["persuasion"]["dpo_rlaif"]["rm"]
    assert (f"| RLAIF (DPO on AI labels) | {rlaif['win_rate']:.2f} [{rlaif['win_rate_low']:.2f}, "
            f"{rlaif['win_rate_high']:.2f}] | {rlaif['lc_win_rate']:.2f} |") in summary
    assert "`rm` † win rate" in summary and "`pair` win rate" in summary
    kappa = metrics["judges"]["rm"]["people"]["kappa"]
    assert f"| `rm` | reward_model ({setup['reward']}) | tiny reward | labelled the RLAIF" in summary
    assert f"| {report.cell(kappa)} | 5 |" in summary
    assert "**p0**" in summary and f"| Base | {REPLIES['base'][0].strip()} |" in summary
    assert "## Style RL" in summary
    tsv = (tmp_path / "reports" / "win_rate.tsv").read_text().splitlines()
    assert tsv[0] == "label\tmodel\tjudge\twin_rate\tlow\thigh" and len(tsv) == 1 + 2 * 3
    assert (tmp_path / "reports" / "win_rate.png").read_bytes()[:4] == b"\x89PNG"
