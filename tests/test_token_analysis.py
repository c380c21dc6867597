import json

import numpy as np
import pytest

from stages import token_analysis
from stages.lib import StageError
from stages.lib.chat import CHATML_TEMPLATE
from stages.lib.models import load_tokenizer
from stages.lib.token_lengths import max_length_for_loss, token_counts, truncation_loss_curve
from tests.chats import chat, tool_chat, write_jsonl
from tests.conftest import params_file


def run(tmp_path, data, tiny_model_dir, extra=(), **section):
    params = params_file(tmp_path / "params.yaml", {"token_analysis": section})
    return token_analysis.main(["--params", str(params), "--data", str(data), "--tokenizer", str(tiny_model_dir),
                                "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "metrics.json"), *extra])


def plot_data(out, name) -> list[dict]:
    return json.loads((out / "plots" / "custom" / f"{name}.json").read_text())


def reference_counts(records, tokenizer):
    """Per-example counts straight from transformers' own assistant mask."""
    totals, assistants, positions = [], [], []
    for r in records:
        out = tokenizer.apply_chat_template(r["messages"], tools=r.get("tools"), chat_template=CHATML_TEMPLATE,
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        mask = np.array(out["assistant_masks"])
        totals.append(len(mask))
        assistants.append(int(mask.sum()))
        positions.extend(np.nonzero(mask)[0].tolist())
    return np.array(totals), np.array(assistants), np.array(positions)


def test_counts_match_the_tokenizers_own_assistant_mask(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    records = [{"tools": None, **chat(i)} for i in range(12)] + [tool_chat(i) for i in range(5)]
    counts, positions = token_counts(records, tokenizer, CHATML_TEMPLATE)
    totals, assistants, ref_positions = reference_counts(records, tokenizer)
    assert counts["total"].tolist() == totals.tolist()
    assert counts["assistant"].tolist() == assistants.tolist()
    assert sorted(positions.tolist()) == sorted(ref_positions.tolist())
    system_only = [len(tokenizer.apply_chat_template(r["messages"][:1], tools=r.get("tools"), return_dict=True,
                                                     chat_template=CHATML_TEMPLATE, tokenize=True)["input_ids"])
                   for r in records]
    assert counts["system"].tolist() == system_only
    assert (counts["without_system"] == counts["total"] - counts["system"]).all()


def test_truncation_curve_matches_recounting_every_cut(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    records = [{"tools": None, **chat(i)} for i in range(10)]
    counts, positions = token_counts(records, tokenizer, CHATML_TEMPLATE)
    grid = np.arange(16, counts["total"].max() + 16, 16)
    curve = truncation_loss_curve(positions, counts["total"], grid)
    for point in curve:
        lost = 0
        for r in records:
            mask = tokenizer.apply_chat_template(r["messages"], chat_template=CHATML_TEMPLATE, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
            lost += sum(mask[point["max_length"]:])
        assert point["assistant_tokens_lost"] == lost
    assert curve[-1]["assistant_tokens_lost"] == 0 and curve[-1]["examples_truncated_pct"] == 0


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.5])
def test_cutoff_is_the_smallest_length_within_the_loss_budget(fraction):
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 500, size=2000)
    cutoff = max_length_for_loss(positions, fraction)
    budget = fraction * len(positions)
    assert (positions >= cutoff).sum() <= budget
    assert (positions >= cutoff - 1).sum() > budget


def test_stage_writes_curves_plot_and_metrics(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [chat(i) for i in range(20)])
    write_jsonl(data / "val.jsonl", [chat(i) for i in range(20, 25)])
    metrics = run(tmp_path, data, tiny_model_dir, step=32)
    assert metrics["examples"] == 25
    curve = plot_data(tmp_path / "out", "truncation_loss")
    assert list(curve[0]) == ["max_length", "assistant_tokens_lost", "assistant_tokens_lost_pct",
                              "examples_truncated_pct"]
    lost = [point["assistant_tokens_lost"] for point in curve]
    assert lost == sorted(lost, reverse=True) and lost[-1] == 0 and lost[0] > 0
    assert curve[0]["max_length"] == 32
    assert (tmp_path / "out" / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    percentiles = plot_data(tmp_path / "out", "length_percentiles")
    assert len(percentiles) == 21 and list(percentiles[0])[:3] == ["percentile", "total", "system"]
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["lengths.png", "plots/custom/length_percentiles.json", "plots/custom/truncation_loss.json"]
    assert metrics["total_p100"] >= metrics["total_p50"] > metrics["assistant_p50"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_remove_system_messages_and_sampling(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(i) for i in range(30)])
    with_system = run(tmp_path, data, tiny_model_dir)
    without = run(tmp_path, data, tiny_model_dir, remove_system_messages=True)
    assert without["system_p100"] == 0
    assert without["tokens"] < with_system["tokens"]
    assert without["assistant_tokens"] == with_system["assistant_tokens"]
    sampled = run(tmp_path, data, tiny_model_dir, num_samples=7, seed=3)
    assert sampled["examples"] == 7
    again = run(tmp_path, data, tiny_model_dir, num_samples=7, seed=3)
    assert again.pop("peak_rss_mb") > 0 and sampled.pop("peak_rss_mb") > 0  # the run's memory, not its result
    assert again == sampled


def test_outputs_are_deterministic(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(i) for i in range(8)] + [tool_chat(1)])
    run(tmp_path, data, tiny_model_dir)
    plot_files = sorted((tmp_path / "out" / "plots").rglob("*.json"))
    first = {p: p.read_bytes() for p in plot_files}
    run(tmp_path, data, tiny_model_dir)
    assert len(first) == 2 and {p: p.read_bytes() for p in plot_files} == first


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', r"data\.jsonl:2: malformed JSON"),
    ('{"text": "no messages"}\n', r"data\.jsonl:1: record missing required field 'messages'"),
    ('{"messages": []}\n', r"data\.jsonl:1: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}\n', r"data\.jsonl:1: messages\[0\] must be an object with a role"),
    ('{"messages": [{"role": "user", "content": 5}]}\n', r"data\.jsonl:1: messages\[0\]\.content must be a string or null"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tools": "lookup"}\n', r"data\.jsonl:1: 'tools' must be a list"),
    ('{"messages": [{"role": "user", "content": "no answer"}]}\n', r"data\.jsonl: no assistant tokens in 1 conversations"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    with pytest.raises(StageError, match=message):
        run(tmp_path, data, tiny_model_dir)
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("section, message", [
    ({"step": 0}, r"^token_analysis\.step: must be at least 1, got 0$"),
    ({"chat_template": "model"}, r"^token_analysis\.chat_template: the model's chat template cannot mark assistant tokens"),
    ({"chat_template": "no/such.jinja"}, r"^token_analysis\.chat_template: expected auto, model, chatml or a template file"),
    ({"num_sample": 3}, r"^token_analysis\.num_sample: unknown key \(did you mean 'num_samples'\?\)$"),
    ({"step!": None}, r"^token_analysis\.step: missing required key$"),
])
def test_bad_params(tmp_path, tiny_model_dir, section, message):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(0)])
    with pytest.raises(StageError, match=message):
        run(tmp_path, data, tiny_model_dir, **section)
    assert not (tmp_path / "out").exists()


def test_missing_data_is_named(tmp_path, tiny_model_dir):
    with pytest.raises(StageError, match=r"nothing: no JSONL files found"):
        run(tmp_path, tmp_path / "nothing", tiny_model_dir)


def test_lengths_file_holds_the_percentiles_and_no_measurement_of_the_run(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat(i) for i in range(9)])
    lengths = tmp_path / "lengths.json"
    metrics = run(tmp_path, data, tiny_model_dir, extra=["--lengths", str(lengths)], step=16)
    written = json.loads(lengths.read_text())
    assert written["examples"] == metrics["examples"] == 9
    assert written["assistant_p100"] == metrics["assistant_p100"] >= written["assistant_p50"] > 0
    assert {key: metrics[key] for key in written} == written
    assert "peak_rss_mb" in metrics and "peak_rss_mb" not in written and "max_length_for_loss" not in written
    first = lengths.read_bytes()
    run(tmp_path, data, tiny_model_dir, extra=["--lengths", str(lengths)], step=32)  # another plot grid
    assert lengths.read_bytes() == first
