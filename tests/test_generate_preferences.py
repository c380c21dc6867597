import contextlib
import json

import pytest

from stages import generate_preferences
from stages.lib import StageError
from stages.lib.generation import (CandidateSampler, PromptPrefixes, candidate_sampling, decode_attention,
                                   generate_batches, grouped_decode_attention, prompt_cache, reply_logprobs, sample_pairs,
                                   sample_replies, shared_prompts, token_batches)
from stages.lib.policy import load_policy
from tests.chats import write_jsonl
from tests.conftest import params_file


def persuasion_record(conversation: int, turn: int) -> dict:
    return {"messages": [
        {"role": "system", "content": "Change their mind."},
        {"role": "user", "content": f"OP: thread {conversation}, turn {turn}: tipping should go."},
        {"role": "assistant", "content": "Consider the workers who rely on it."},
    ], "metadata": {"source": "cmv", "conversation_id": f"t3_{conversation}", "utterance_id": f"t1_{conversation}_{turn}"}}


@pytest.fixture
def prompt_files(tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [persuasion_record(c, t) for c in range(6) for t in range(2)])
    test = write_jsonl(tmp_path / "test.jsonl", [persuasion_record(c, t) for c in range(6, 10) for t in range(3)])
    return val, test


def run(tmp_path, model, files, **section):
    section = {"ai_pool_size": 6, "human_pool_size": 3, "eval_pool_size": 4, "max_new_tokens": 8,
               "batch_size": 3, **section}
    params = params_file(tmp_path / "params.yaml", {"generate_preferences": section})
    return generate_preferences.main(["--params", str(params), "--model", str(model), "--prompts", *map(str, files),
                                      "--out", str(tmp_path / "prefs"), "--metrics", str(tmp_path / "metrics.json")])


def read_pool(tmp_path, pool):
    return [json.loads(line) for line in (tmp_path / "prefs" / f"{pool}.jsonl").read_text().splitlines()]


def test_pools_are_disjoint_by_conversation_with_two_responses_each(tmp_path, tiny_model_dir, prompt_files):
    metrics = run(tmp_path, tiny_model_dir, prompt_files)
    pools = {pool: read_pool(tmp_path, pool) for pool in ("ai", "human", "eval")}
    assert {pool: len(rows) for pool, rows in pools.items()} == {"ai": 6, "human": 3, "eval": 4}
    conversations = {pool: {r["metadata"]["conversation_id"] for r in rows} for pool, rows in pools.items()}
    assert not conversations["ai"] & conversations["eval"] and not conversations["human"] & conversations["eval"]
    assert not conversations["ai"] & conversations["human"]
    for pool, rows in pools.items():
        for row in rows:
            assert row["metadata"]["pool"] == pool
            assert row["metadata"]["prompt_id"] == f"cmv:{row['metadata']['utterance_id']}"
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]  # the reference answer is not in the prompt
            assert isinstance(row["response_1"], str) and isinstance(row["response_2"], str)
    assert 0 < metrics["generated_tokens"] <= 2 * 13 * 8
    assert metrics["ai_prompts"] == 6 and metrics["generated_tokens_per_second"] > 0
    # Every prompt token but each prompt's last (generate reads that one) is either run or reused once.
    _, tokenizer = load_policy(tiny_model_dir)
    prompts = [row["prompt"] for rows in pools.values() for row in rows]
    lengths = [len(ids) for ids in tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=True)["input_ids"]]
    assert metrics["prompt_tokens_encoded"] + metrics["prompt_tokens_reused"] == sum(lengths) - len(lengths)
    assert metrics["prompt_tokens_encoded"] > 0


def test_same_seed_same_bytes_other_seed_other_pools(tmp_path, tiny_model_dir, prompt_files):
    run(tmp_path, tiny_model_dir, prompt_files)
    first = {p.name: p.read_bytes() for p in (tmp_path / "prefs").iterdir()}
    run(tmp_path, tiny_model_dir, prompt_files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "prefs").iterdir()} == first
    run(tmp_path, tiny_model_dir, prompt_files, seed=7)
    assert (tmp_path / "prefs" / "eval.jsonl").read_bytes() != first["eval.jsonl"]


def test_batched_samples_differ_between_the_two_responses(tmp_path, tiny_model_dir, prompt_files):
    metrics = run(tmp_path, tiny_model_dir, prompt_files, max_new_tokens=12, temperature=1.5)
    rows = [r for pool in ("ai", "human", "eval") for r in read_pool(tmp_path, pool)]
    assert sum(r["response_1"] != r["response_2"] for r in rows) >= len(rows) - 1
    assert metrics["identical_pairs"] == sum(r["response_1"] == r["response_2"] for r in rows)


def test_asking_for_more_prompts_than_exist_says_how_many(tmp_path, tiny_model_dir, prompt_files):
    with pytest.raises(StageError, match=r"^generate_preferences: the pools ask for 40 prompts \(human 5 \+ eval 5 \+ ai 30\) "
                                         r"but only 24 prompts in 10 conversations exist"):
        run(tmp_path, tiny_model_dir, prompt_files, ai_pool_size=30, human_pool_size=5, eval_pool_size=5)
    assert not (tmp_path / "prefs").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("section, message", [
    ({"top_p": 0}, r"^generate_preferences\.top_p: must be in \(0, 1\], got 0.0$"),
    ({"temperature": -1}, r"^generate_preferences\.temperature: must be positive"),
    ({"ai_pool_size": -1}, r"^generate_preferences\.ai_pool_size: must not be negative"),
    ({"pool_size": 3}, r"^generate_preferences\.pool_size: unknown key"),
])
def test_bad_params(tmp_path, tiny_model_dir, prompt_files, section, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, tiny_model_dir, prompt_files, **section)


def test_prompts_need_provenance(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": persuasion_record(0, 0)["messages"], "metadata": {}}])
    with pytest.raises(StageError, match=r"bad\.jsonl:1: metadata needs conversation_id and utterance_id$"):
        run(tmp_path, tiny_model_dir, [bad])


def test_shared_prompt_cache_gives_what_plain_generation_gives(tiny_model_dir):
    import torch

    model, tokenizer = load_policy(tiny_model_dir)
    prompts = [persuasion_record(c, 0)["messages"][:2] for c in range(5)]
    prompts[2][1]["content"] += " A much longer question, so the batch needs left padding." * 3
    near_greedy = {"temperature": 1e-6, "top_p": 1.0, "max_new_tokens": 6, "batch_size": 3}
    encoded = tokenizer.apply_chat_template(prompts[:3], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    width = max(len(ids) for ids in encoded)
    with torch.no_grad():
        cache = prompt_cache(model, encoded, 2, width + 6)
    # Every prompt but its last token, left-padded to the longest, once per sample.
    assert cache.get_seq_length() == width - 1
    assert tuple(cache.layers[0].keys.shape[::2]) == (6, width + 6)
    pairs, _ = sample_pairs(model, tokenizer, prompts, **near_greedy)
    for prompt, pair in zip(prompts, pairs):
        inputs = tokenizer.apply_chat_template([prompt], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert pair == (expected, expected)


def conversation_turns(tokenizer) -> list[list[int]]:
    """Three prompts of one conversation (each the one before, its reply and a new question) and one of another."""
    turns, messages = [], [{"role": "system", "content": "Change their mind."}]
    for turn in range(3):
        messages = messages + [{"role": "user", "content": f"Turn {turn}: why should tipping go? " * 3}]
        turns.append(messages)
        messages = messages + [{"role": "assistant", "content": f"Reply {turn}: consider the workers. " * 2}]
    turns.append([{"role": "user", "content": "Another thread altogether, about cities and cars."}])
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def test_a_later_turn_is_encoded_after_the_keys_of_the_turn_before(tiny_model_dir):
    import torch

    model, tokenizer = load_policy(tiny_model_dir)
    encoded = conversation_turns(tokenizer)
    prefixes = PromptPrefixes(min_shared=4)
    with torch.no_grad():
        kept = [prefixes.encode(model, ids) for ids in encoded]
        alone = [model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values.layers for ids in encoded]
    # Turn 2 begins with all of turn 1, turn 1 with all of turn 0; the other thread shares only the template's opening.
    assert prefixes.reused == len(encoded[0]) + len(encoded[1])
    assert prefixes.encoded == sum(len(ids) for ids in encoded) - prefixes.reused
    for mine, reference in zip(kept, alone):
        for (keys, values), layer in zip(mine, reference):
            torch.testing.assert_close(keys, layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(values, layer.values, atol=1e-5, rtol=1e-4)
    # Each turn extended the one before whole, so only the last turn and the other thread stay kept.
    assert [len(ids) for ids, _ in prefixes.kept] == [len(encoded[2]), len(encoded[3])]
    # A prompt that is the beginning of a kept one runs nothing through the model.
    before = prefixes.encoded
    with torch.no_grad():
        again = prefixes.encode(model, encoded[1])
    assert prefixes.encoded == before and again[0][0].shape[-2] == len(encoded[1])


def test_kept_prompts_stay_within_their_memory(tiny_model_dir):
    import torch

    model, tokenizer = load_policy(tiny_model_dir)
    encoded = conversation_turns(tokenizer)
    with torch.no_grad():
        one = sum(k.nbytes + v.nbytes for k, v in PromptPrefixes().encode(model, encoded[3]))
        prefixes = PromptPrefixes(max_bytes=one * 2)
        for ids in (encoded[3], encoded[0], [5] * 40, [6] * 40):
            prefixes.encode(model, ids)
    assert prefixes.nbytes() <= one * 2 < sum(len(ids) for ids, _ in prefixes.kept) * one
    assert prefixes.kept[-1][0].tolist() == [6] * 40  # the least recently used went first


def test_sampling_reuses_the_turns_of_a_conversation_and_gives_what_plain_generation_gives(tiny_model_dir):
    import torch

    model, tokenizer = load_policy(tiny_model_dir)
    encoded = conversation_turns(tokenizer)
    prefixes = PromptPrefixes(min_shared=4)
    with torch.no_grad():
        got = {i: new for batch, news in generate_batches(model, tokenizer, encoded, 2, 5, 2, prefixes=prefixes,
                                                          do_sample=False) for i, new in zip(batch, news[::2])}
        for i, ids in enumerate(encoded):
            output = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=5,
                                    pad_token_id=tokenizer.pad_token_id)
            assert got[i].tolist()[:5] == output[0, len(ids):].tolist()
    assert prefixes.reused > 0


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.9, 50, 0.95), (1.3, 8, 0.5), (0.7, 50, 1.0), (1.0, 1, 0.9)])
def test_candidate_sampler_draws_from_the_distribution_of_generates_own_warpers(temperature, top_k, top_p):
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 300) * 3
    warped = TemperatureLogitsWarper(temperature)(None, scores.clone())
    warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = torch.softmax(warped, -1)
    sampler = CandidateSampler(temperature, top_k, top_p)
    indices, probs = sampler.candidates(scores)
    got = torch.zeros_like(expected).scatter_(-1, indices, probs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # Each call leaves exactly one finite score per row, on a token the distribution allows.
    out = sampler(None, scores)
    chosen = out.argmax(-1)
    assert (torch.isfinite(out).sum(-1) == 1).all() and (expected.gather(-1, chosen[:, None]) > 0).all()
    # Drawn often enough, the tokens follow the distribution.
    counts = torch.zeros(300)
    for _ in range(4000):
        counts[sampler(None, scores[1:2]).argmax(-1)] += 1
    assert (counts / 4000 - expected[1]).abs().max() < 0.03


def test_candidate_sampling_takes_generates_defaults_and_leaves_greedy_and_full_vocabulary_alone(tiny_model_dir):
    model, _ = load_policy(tiny_model_dir)
    kwargs = candidate_sampling(model, {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "max_new_tokens": 3})
    sampler = kwargs["logits_processor"][0]
    assert (kwargs["do_sample"], kwargs["max_new_tokens"]) == (False, 3)
    assert (sampler.temperature, sampler.top_k, sampler.top_p) == (0.5, 50, 0.9)  # top_k: generate's default
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    assert candidate_sampling(model, greedy) is greedy
    full = {"do_sample": True, "temperature": 1.0, "top_k": 0}
    assert candidate_sampling(model, full) is full
    with pytest.raises(ValueError, match="temperature"):
        CandidateSampler(0.0, 50, 1.0)


def test_grouped_decode_attention_equals_sdpa_at_one_query_token():
    import torch
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    query, key, value = torch.randn(4, 6, 1, 8), torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    mask = torch.ones(4, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    mask[2, ..., 7:] = False  # unwritten slots of a static cache
    for attention_mask in (mask, None):
        got, _ = grouped_decode_attention(module, query, key, value, attention_mask, scaling=0.3)
        expected, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.3)
        assert got.shape == (4, 1, 6, 8)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rows_that_sample_one_prompt_read_its_slots_once_and_attend_as_sdpa_does():
    import torch
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    # 2 prompts x 3 samples: row r * 2 + j samples prompt j; the first 7 of 10 slots hold the prompts.
    query, key, value = torch.randn(6, 6, 1, 8), torch.randn(6, 2, 10, 8), torch.randn(6, 2, 10, 8)
    key[:, :, :7], value[:, :, :7] = key[:2, :, :7].repeat(3, 1, 1, 1), value[:2, :, :7].repeat(3, 1, 1, 1)
    mask = torch.ones(6, 1, 1, 10, dtype=torch.bool)
    mask[1::2, ..., :3] = False  # prompt 1 is left-padded
    mask[:, ..., 9:] = False  # not yet written
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    read = []
    original = torch.matmul

    def matmul(a, b):
        read.append(b.shape)
        return original(a, b)

    key_shared, value_shared = key.clone(), value.clone()
    key_shared[2:, :, :7], value_shared[2:, :, :7] = float("nan"), float("nan")  # rows 2-5 never read their copies
    with shared_prompts(3, 7), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "matmul", matmul)
        got, _ = grouped_decode_attention(module, query, key_shared, value_shared, mask, scaling=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The slots once per prompt, through the first block of rows; each row reads only the 2 slots written after the
    # prompt (of 3).
    assert sorted(read) == [(2, 2, 8, 10), (2, 2, 10, 8), (6, 2, 2, 8), (6, 2, 8, 2)]
    additive = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))  # as a float mask
    with shared_prompts(3, 7):
        got, _ = grouped_decode_attention(module, query, key_shared, value_shared, additive, scaling=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Outside the context, or where the rows do not split into the blocks, every row reads its own slots.
    for context in (contextlib.nullcontext(), shared_prompts(4, 7)):
        with context:
            got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_applies_while_generating_only(tiny_model_dir):
    model, _ = load_policy(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"
    with decode_attention(model):
        assert model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_batches_hold_similar_lengths_within_the_prompt_and_token_budgets():
    lengths = [50, 10, 40, 20, 30, 400]
    # By length; at most 3 prompts; no budget.
    assert token_batches(lengths, 3) == [[1, 3, 4], [2, 0, 5]]
    # Two rows a prompt, each as wide as the batch's longest prompt + 10 new tokens, at most 200 tokens of cache:
    # 10+20 -> 2 x 2 x 30 = 120; adding 30 would be 3 x 2 x 40 = 240. The 400-token prompt alone exceeds it.
    assert token_batches(lengths, 3, repeats=2, max_new_tokens=10, max_batch_tokens=200) == [
        [1, 3], [4, 2], [0], [5]]
    assert sorted(i for b in token_batches(lengths, 2, 1, 0, 60) for i in b) == list(range(6))


def test_a_token_budget_splits_batches_without_changing_the_replies(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    prompts = [persuasion_record(c, 0)["messages"][:2] for c in range(4)]
    prompts[3][1]["content"] += " A longer question." * 4
    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    budget = 2 * 2 * (max(len(ids) for ids in encoded) + 6)  # two prompts of two rows at most

    def new_tokens(max_batch_tokens):
        rows, batches = {}, 0
        for indices, new in generate_batches(model, tokenizer, encoded, 2, 6, 4, max_batch_tokens, do_sample=False,
                                             temperature=None, top_p=None, top_k=None):
            batches += 1
            for j, i in enumerate(indices):  # up to the first EOS: what follows is padding
                for row in new[2 * j:2 * j + 2].tolist():
                    rows.setdefault(i, []).append(row[:row.index(tokenizer.eos_token_id) + 1]
                                                  if tokenizer.eos_token_id in row else row)
        return rows, batches

    whole, one = new_tokens(None)
    split, two = new_tokens(budget)
    assert (one, two) == (1, 2) and split == whole and any(len(r) > 1 for rows in whole.values() for r in rows)


def test_reply_logprobs_in_row_chunks_over_reply_positions_equal_the_whole_computation(tiny_model_dir):
    import torch
    from types import SimpleNamespace

    model, tokenizer = load_policy(tiny_model_dir)
    sampling = SimpleNamespace(seed=3, temperature=0.7, response_length=5, eval_generations=2)
    replies = sample_replies(model, tokenizer, ["Hello there", "Why do you think so, friend?", "Hi"], sampling)
    positions = (replies.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=replies.sequences, attention_mask=replies.attention_mask,
                       position_ids=positions).logits[:, replies.prompt_length - 1:-1].float()
    logprobs = torch.log_softmax(logits / 0.7, -1).gather(-1, replies.sequences[:, replies.prompt_length:, None])
    expected = (logprobs.squeeze(-1) * replies.reply_mask).sum(1).tolist()
    assert len(expected) == 6 and replies.reply_mask.sum() > 6
    assert reply_logprobs(model, replies, 0.7, rows=4) == pytest.approx(expected, abs=1e-4)


def test_sliding_window_model_encodes_the_padded_batch_and_still_matches_plain_generation():
    """A sliding-window cache keeps a window, not the whole prompt: the stage falls back to the padded batch."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=512,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    prompts = [persuasion_record(c, 0)["messages"][:2] for c in range(3)]
    prompts[1][1]["content"] += " A much longer question, so the batch needs left padding." * 3
    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    with torch.no_grad():
        assert prompt_cache(model, encoded, 2, 64) is None
    near_greedy = {"temperature": 1e-6, "top_p": 1.0, "max_new_tokens": 5, "batch_size": 3}
    pairs, generated = sample_pairs(model, tokenizer, prompts, **near_greedy)
    for prompt, pair in zip(prompts, pairs):
        inputs = tokenizer.apply_chat_template([prompt], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
        assert pair[0] == pair[1] == tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True).strip()
    assert 0 < generated <= 3 * 2 * 5


def test_growing_the_ai_pool_moves_neither_the_human_nor_the_eval_pool(tmp_path, tiny_model_dir, prompt_files):
    run(tmp_path, tiny_model_dir, prompt_files, ai_pool_size=2)
    before = {pool: [r["metadata"]["prompt_id"] for r in read_pool(tmp_path, pool)] for pool in ("human", "eval", "ai")}
    run(tmp_path, tiny_model_dir, prompt_files, ai_pool_size=12)
    after = {pool: [r["metadata"]["prompt_id"] for r in read_pool(tmp_path, pool)] for pool in ("human", "eval", "ai")}
    assert after["human"] == before["human"] and after["eval"] == before["eval"]
    assert len(after["ai"]) == 12 and not set(after["ai"]) & set(after["human"] + after["eval"])
