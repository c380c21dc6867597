"""The stage entry point: one-line errors, and no bitsandbytes in stages that never load 4-bit weights."""

import subprocess
import sys

from tests.conftest import REPO_ROOT

PROBE = """
import importlib.util, sys
from stages.lib import StageError, run_stage

def main(argv):
    try:
        import bitsandbytes  # noqa: F401
        imported = "imported"
    except ImportError:
        imported = "absent"
    print(imported, importlib.util.find_spec("bitsandbytes") is not None)
    if sys.argv[2:] == ["fail"]:
        raise StageError("stage.key:  expected a number,\\n got 'x'")

run_stage(main, quantized=sys.argv[1] == "quantized")
"""


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_a_stage_that_never_quantizes_runs_without_bitsandbytes():
    result = probe("plain")
    assert (result.returncode, result.stdout) == (0, "absent False\n"), result.stderr


def test_a_quantizing_stage_imports_it():
    result = probe("quantized")
    assert (result.returncode, result.stdout) == (0, "imported True\n"), result.stderr


def test_a_stage_error_ends_the_process_with_one_line():
    result = probe("plain", "fail")
    assert result.returncode == 1 and result.stderr == "error: stage.key: expected a number, got 'x'\n"
