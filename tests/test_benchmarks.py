"""The benchmarks run end to end at their smallest setting (their timings are measurements, not asserted)."""

import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.tiny import build_tokenizer

DATA_SCALE_ROWS = ["persona_dataset", "cmv_preprocess", "p4g_preprocess", "sft_dataset", "tau2_make",
                   "tau2_to_openai", "token_analysis@persona", "token_analysis@persuasion", "token_analysis@agent",
                   "pool_dealing"]


def test_data_scale_runs_every_data_stage_on_the_sample_sized_corpora(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(str(tokenizer))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "data_scale.py"), "--sizes", "1", "--tokenizer", str(tokenizer),
         "--keep", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("data_scale ")]
    assert [row[1] for row in rows] == DATA_SCALE_ROWS
    assert all(row[2] == "1x" and " s " in " ".join(row) and "MB" in row for row in rows)
