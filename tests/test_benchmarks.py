"""The benchmarks run end to end at their smallest setting (their timings are measurements, not asserted)."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.chats import chat, tool_chat, write_jsonl
from tests.conftest import REPO_ROOT, params_file
from tests.pipeline import tiny_overrides
from tests.tiny import build_tokenizer

BENCHMARKS = REPO_ROOT / "benchmarks"
# Every script in benchmarks/ and the test below that runs it: a new script without a test fails here.
TESTED = {"attention.py", "data_scale.py", "generation.py", "matmul.py", "pipeline.py", "sft_throughput.py", "token_analysis.py",
          "gpu.sh"}

DATA_SCALE_ROWS = ["persona_dataset", "cmv_preprocess", "p4g_preprocess", "sft_dataset", "tau2_make",
                   "tau2_to_openai", "token_analysis@persona", "token_analysis@persuasion", "token_analysis@agent",
                   "pool_dealing"]
NUMBER = r"[\d,]+(?:\.\d+)?"
BOUND = rf"bound {NUMBER} tok/s \({NUMBER} GFLOP/s (?:bfloat16|float32) matmul / \({{factor}} x {NUMBER}M params\)\)"


def run_benchmark(script: str, *args, timeout: int = 300) -> list[str]:
    """The lines the benchmark printed; a non-zero exit fails with its output."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def result_line(lines: list[str], name: str) -> str:
    found = [line for line in lines if line.startswith(f"{name}: ")]
    assert len(found) == 1, lines
    return found[0]


@pytest.fixture
def chats(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(8)] + [tool_chat(i) for i in range(4)])


def test_every_benchmark_script_runs_in_the_suite():
    assert {path.name for path in BENCHMARKS.iterdir() if path.suffix in (".py", ".sh")} == TESTED


def test_data_scale_runs_every_data_stage_on_the_sample_sized_corpora(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(str(tokenizer))
    lines = run_benchmark("data_scale.py", "--sizes", "1", "--tokenizer", tokenizer, "--keep", tmp_path / "runs")
    rows = [line.split() for line in lines if line.startswith("data_scale ")]
    assert [row[1] for row in rows] == DATA_SCALE_ROWS
    assert all(row[2] == "1x" and " s " in " ".join(row) and "MB" in row for row in rows)


def test_attention_prints_its_share_and_the_ceiling_it_leaves(tiny_model_dir):
    line = result_line(run_benchmark("attention.py", "--model", tiny_model_dir, "--length", 32, "--repeats", 1),
                       "attention")
    assert re.match(rf"attention: at 32 tokens, attention takes \d+% of a step whose matmuls run at peak: ceiling "
                    rf"{NUMBER} tok/s = {NUMBER}% of bound \| attention {NUMBER} ms \(2 layers x ", line), line


def test_matmul_prints_the_measured_flops():
    line = result_line(run_benchmark("matmul.py", "--size", 64, "--repeats", 2), "matmul")
    assert re.match(rf"matmul: {NUMBER} GFLOP/s (bfloat16|float32) on (cpu|cuda) \| 64\^3, best of 3 x 2 \| ", line)


def test_token_analysis_compares_the_stage_with_its_limit_and_the_naive_loops(tiny_model_dir, chats):
    line = result_line(run_benchmark("token_analysis.py", "--data", chats, "--tokenizer", tiny_model_dir,
                                     "--min-examples", 24, "--naive-examples", 4, "--repeats", 1), "token_analysis")
    assert re.match(rf"token_analysis: {NUMBER}x of limit \(target >= 0.50\), {NUMBER}x naive \(target >= 3\), "
                    rf"{NUMBER}x naive-once \| stage {NUMBER} tok/s, limit {NUMBER} tok/s, naive {NUMBER} tok/s, "
                    rf"naive-once {NUMBER} tok/s \| 24 conversations, {NUMBER} tokens \(naive: first 4\)", line), line


def test_sft_throughput_runs_the_stage_and_trl_defaults_against_the_bound(tiny_model_dir, chats, tmp_path):
    line = result_line(run_benchmark("sft_throughput.py", "--model", tiny_model_dir, "--data", chats,
                                     "--params", params_file(tmp_path / "params.yaml"), "--steps", 1),
                       "sft_throughput")
    assert re.match(rf"sft_throughput: {NUMBER}x trl defaults \(target >= 1.5\), {NUMBER}% of bound \(target >= 50%\), "
                    rf"peak RSS {NUMBER} GB \(target <= 4\) \| stage {NUMBER} tok/s \(\d+ tokens, batch \d+, "
                    rf"(bf16|fp32), .*\), defaults {NUMBER} tok/s \(.*\), {BOUND.format(factor=4)} \| 1 steps, "
                    rf"\d+ conversations <= 256 tokens", line), line


def test_generation_compares_batched_sampling_with_the_loop_and_the_prompt_pass_with_the_bound(tiny_model_dir,
                                                                                              tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {**chat(i), "metadata": {"source": "cmv", "conversation_id": f"c{i // 2}", "utterance_id": f"u{i}"}}
        for i in range(4)])
    line = result_line(run_benchmark("generation.py", "--model", tiny_model_dir, "--prompts", prompts, "--count", 3,
                                     "--max-new-tokens", 4, "--params", params_file(tmp_path / "params.yaml")),
                       "generation")
    assert re.match(rf"generation: {NUMBER}x one-prompt-one-response loop \(target >= 8\), prompt pass {NUMBER}% of "
                    rf"bound \| batched {NUMBER} generated tok/s \(\d+ tokens, batch \d+ prompts x 2, twice\), "
                    rf"loop {NUMBER} "
                    rf"tok/s \(\d+ tokens\), prompt pass {NUMBER} tok/s \([1-9]\d* tokens in .*\), "
                    rf"{BOUND.format(factor=2)} \| 3 prompts, max_new_tokens 4", line), line


def test_pipeline_times_scratch_noop_and_a_change_on_the_tiny_model(tiny_model_dir):
    # The smallest pipeline: the tiny base model and one dataset stage (tests/test_pipeline.py runs all of it).
    settings = [arg for key, value in tiny_overrides(tiny_model_dir).items()
                for arg in ("--set", f"{key}={json.dumps(value)}")]
    lines = run_benchmark("pipeline.py", *settings, "--targets", "persona_dataset", timeout=600)
    for label in ("scratch", "no-op", "dpo.defaults.trainer.beta=0.2"):
        assert re.match(rf"{re.escape(label)}: {NUMBER} s \({NUMBER} min\), \d+ stages ran; target ",
                        result_line(lines, label))
    assert "2 stages ran" in result_line(lines, "scratch") and "0 stages ran" in result_line(lines, "no-op")


def test_gpu_script_is_valid_bash():
    script = str(BENCHMARKS / "gpu.sh")
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
