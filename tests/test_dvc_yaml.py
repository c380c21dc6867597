"""dvc.yaml declares, for every stage, the code it runs: its script and each stages/lib module it imports."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def lib_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """stages/lib modules `path` imports, directly or through other lib modules."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages.lib"):
            parts = node.module.split(".")
            module = REPO_ROOT.joinpath(*parts).with_suffix(".py") if len(parts) > 2 else REPO_ROOT / "stages/lib/__init__.py"
            if module not in seen:
                seen.add(module)
                lib_imports(module, seen)
    return seen


def stage_definitions():
    for name, stage in DVC_YAML["stages"].items():
        yield name, stage.get("do", stage)


@pytest.mark.parametrize("name, stage", list(stage_definitions()), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_the_code_it_runs(name, stage):
    script = REPO_ROOT / "stages" / f"{name}.py"
    deps = {REPO_ROOT / d for d in stage["deps"] if "$" not in d}
    assert script in deps
    missing = sorted(str(p.relative_to(REPO_ROOT)) for p in lib_imports(script) if p not in deps)
    assert not missing, f"{name} imports {missing} but dvc.yaml does not list them as deps"
    if REPO_ROOT / "stages/lib/chat.py" in lib_imports(script):
        assert REPO_ROOT / "stages/lib/templates" in deps  # chat.py reads the training template from there
