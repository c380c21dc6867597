"""The stage entry point: one-line errors, and no bitsandbytes in stages that never load 4-bit weights."""

import subprocess
import sys

from tests.conftest import REPO_ROOT

PROBE = """
import importlib.util, sys
from stages.lib import StageError, run_stage
from stages.lib.errors import skip_bitsandbytes

def main(argv):
    if sys.argv[2:] == ["lora"]:
        skip_bitsandbytes()
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


def test_a_quantizing_stage_whose_params_say_lora_skips_it_after_all():
    result = probe("quantized", "lora")
    assert (result.returncode, result.stdout) == (0, "absent False\n"), result.stderr


def test_skipping_leaves_a_process_alone_once_peft_or_transformers_looked_for_it():
    code = ("import sys, transformers, stages.lib.errors as e; e._STAGE_PROCESS = True; e.skip_bitsandbytes(); "
            "print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.stdout == "False\n", result.stderr


def test_a_caller_of_main_keeps_bitsandbytes(monkeypatch):
    from stages.lib import errors

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    errors.skip_bitsandbytes()
    assert "bitsandbytes" not in sys.modules


def test_a_stage_error_ends_the_process_with_one_line():
    result = probe("plain", "fail")
    assert result.returncode == 1 and result.stderr == "error: stage.key: expected a number, got 'x'\n"
