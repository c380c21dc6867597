import pytest

from stages.lib import StageError
from stages.lib.judges import content_hash, identity, load_judge, resolve_judges
from tests.conftest import params_file
from tests.tiny import build_tokenizer, save_tiny_reward_model

PROMPTS = [[{"role": "user", "content": f"starter {i}"}] for i in range(4)]
REPLIES = ["hello there", "a much longer reply with several words in it", "ok", "hello there"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("reward") / "reward", build_tokenizer())


def table(tmp_path, reward_dir, model_dir, **extra):
    judges = {"rm": {"kind": "reward_model", "model": str(reward_dir), "criterion": "tiny  reward\n model"},
              "pair": {"kind": "pairwise_llm", "model": str(model_dir), "criterion": "Which is better?",
                       "max_context_tokens": 32, "swap": True},
              "rating": {"kind": "scalar_llm", "model": str(model_dir), "criterion": "How good?",
                         "max_context_tokens": 32, "scale": 5}, **extra}
    return params_file(tmp_path / "params.yaml", {"judges": judges})


def test_scalar_llm_judge_scores_the_expected_rating(tmp_path, reward_dir, tiny_model_dir):
    [ref] = resolve_judges(table(tmp_path, reward_dir, tiny_model_dir), [("k", "rating")], scalar=True)
    judge = load_judge(ref, batch_size=3)
    scores = judge.score(PROMPTS, REPLIES)
    assert all(1 <= s <= 5 for s in scores) and len(set(round(s, 6) for s in scores)) > 1
    one_by_one = load_judge(ref, batch_size=1).score(PROMPTS, REPLIES)
    assert one_by_one == pytest.approx(scores, abs=2e-3)  # bf16 on CPUs that have it: batches round differently
    # A scalar judge compares two replies by their scores.
    pairs = judge.pairs(PROMPTS[:2], REPLIES[:2], REPLIES[2:])
    assert pairs.orders_agree is None
    assert [a for a, _ in pairs.scores] == pytest.approx(scores[:2], abs=1e-4)


def test_pairwise_judge_in_both_orders_is_symmetric(tmp_path, reward_dir, tiny_model_dir):
    [ref] = resolve_judges(table(tmp_path, reward_dir, tiny_model_dir), [("k", "pair")])
    judge = load_judge(ref, batch_size=4)
    forward = judge.pairs(PROMPTS, REPLIES, REPLIES[::-1])
    backward = judge.pairs(PROMPTS, REPLIES[::-1], REPLIES)
    for (a, b), (c, d) in zip(forward.scores, backward.scores):
        assert a + b == pytest.approx(1) and (a, b) == pytest.approx((d, c), abs=1e-5)
    assert forward.orders_agree == backward.orders_agree


def test_identity_pins_kind_model_hash_and_criterion(tmp_path, reward_dir, tiny_model_dir, monkeypatch):
    params = table(tmp_path, reward_dir, tiny_model_dir)
    [ref] = resolve_judges(params, [("k", "rm")])
    info = identity(ref)
    assert info == {"name": "rm", "kind": "reward_model", "criterion": "tiny reward model", "model": str(reward_dir),
                    "hash": content_hash(reward_dir), "hash_of": "files"}
    # Inside a DVC project the hash is the one dvc.lock recorded for the stage output.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  reward_model@x:\n    outs:\n    - path: {reward_dir}\n"
                                       f"      md5: 0123456789abcdef0123456789abcdef.dir\n")
    assert identity(ref)["hash"] == "0123456789abcdef0123456789abcdef.dir" and identity(ref)["hash_of"] == "dvc.lock"
    # Another version of the files has another hash.
    before = content_hash(reward_dir)
    save_tiny_reward_model(tmp_path / "other", build_tokenizer(), seed=1)
    assert content_hash(tmp_path / "other") != before


def test_resolving_checks_every_judge_before_loading(tmp_path, reward_dir, tiny_model_dir):
    params = table(tmp_path, reward_dir, tiny_model_dir,
                   notrm={"kind": "reward_model", "model": str(tiny_model_dir), "criterion": "x"})
    with pytest.raises(StageError, match=r"^judges\.notrm\.model: '.*' is not a reward model directory"):
        resolve_judges(params, [("a.judge", "rm"), ("a.judge", "notrm")])
    with pytest.raises(StageError, match=r"^x\.judges\[1\]: judge 'pair' is pairwise_llm"):
        resolve_judges(params, [("x.judges[0]", "rm"), ("x.judges[1]", "pair")], scalar=True)
    with pytest.raises(StageError, match=r"^judges\.rating\.scale: must be 2 to 9"):
        resolve_judges(table(tmp_path, reward_dir, tiny_model_dir, rating={
            "kind": "scalar_llm", "model": str(tiny_model_dir), "criterion": "x", "max_context_tokens": 32,
            "scale": 10}), [("k", "rating")])
